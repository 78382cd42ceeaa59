"""Round-to-nearest weight-only quantization: int8 or int4, per channel or group-wise."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.adapters import adapter_for, decoder_linears, set_submodule
from compress.errors import UserError
from compress.formats import grid
from compress.formats.int4 import Int4Linear
from compress.formats.int8 import Int8Linear
from compress.passes import register_pass

FORMAT_BY_BITS = {8: Int8Linear, 4: Int4Linear}


@dataclass
class WeightQuantConfig:
    """Fields every weight-only integer quantizer shares (RTN, GPTQ, AWQ)."""

    bits: int = 8
    group_size: int | None = None   # None: 0 (per output channel) for 8 bits, 64 for 4 bits
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in FORMAT_BY_BITS:
            raise UserError(f"bits must be one of 4, 8; got {self.bits}")
        if self.group_size is None:
            self.group_size = 64 if self.bits == 4 else 0
        if self.group_size < 0:
            raise UserError(f"group_size must be 0 (per channel) or positive, got {self.group_size}")


@dataclass
class RTNConfig(WeightQuantConfig):
    pass


def check_widths(model: nn.Module, group_size: int, bits: int = 8
                 ) -> list[tuple[str, nn.Linear]]:
    """Every decoder linear, after checking the group size divides each input width (and, for
    int4, that the width is even)."""
    linears = decoder_linears(model)
    for name, linear in linears:
        if not isinstance(linear, nn.Linear):
            raise UserError(f"{name} is already compressed ({type(linear).__name__}); "
                            "weight quantization needs a float nn.Linear")
        grid.check_group_size(name, linear.in_features, group_size, bits)
    return linears


def quantized_linear(linear: nn.Linear, bits: int, group_size: int, symmetric: bool,
                     weight: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                     zero: torch.Tensor | None = None):
    """The Int8Linear/Int4Linear for `linear`. `weight` (default: the layer's) is rounded on the
    grid given by (scale, zero), computed from it by min/max when not given."""
    w = linear.weight.data if weight is None else weight
    if scale is None:
        scale, zero = grid.compute_qparams(w, bits, symmetric, group_size,
                                           storage_dtype=linear.weight.dtype)
    q = grid.quantize(w, scale, zero, bits, group_size)
    bias = None if linear.bias is None else linear.bias.data
    return FORMAT_BY_BITS[bits].from_codes(q, scale, zero, group_size, symmetric, bias,
                                           linear.weight.dtype)


@register_pass("rtn", RTNConfig)
def rtn(model: nn.Module, config: RTNConfig, calib=None) -> nn.Module:
    for name, linear in check_widths(model, config.group_size, config.bits):
        set_submodule(model, name, quantized_linear(linear, config.bits, config.group_size,
                                                    config.symmetric))
    return model


@dataclass
class LMHeadConfig(WeightQuantConfig):
    """Round-to-nearest of the output projection (lm_head), which every decode step reads whole:
    for Llama-3-8B 1.05 GB of bf16, a fifth of an int4 model's step. A tied lm_head is untied
    first: the embedding keeps its float table (a step gathers only a few of its rows) and the
    lm_head gets its own quantized copy."""


@register_pass("lm-head", LMHeadConfig)
def quantize_lm_head(model: nn.Module, config: LMHeadConfig, calib=None) -> nn.Module:
    adapter = adapter_for(model)
    head = adapter.lm_head(model)
    if not isinstance(head, nn.Linear):
        raise UserError(f"lm_head is already compressed ({type(head).__name__}); the lm-head pass "
                        "needs a float nn.Linear")
    grid.check_group_size("lm_head", head.in_features, config.group_size, config.bits)
    # A copy: when tied, head.weight is the embedding's table, which stays float and unchanged.
    quantized = quantized_linear(head, config.bits, config.group_size, config.symmetric,
                                 weight=head.weight.data.clone())
    set_submodule(model, adapter.lm_head_path, quantized)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # saved with the checkpoint: reloads untied
    return model
