"""bitsandbytes passes: LLM.int8 (`bnb-int8`) and 4-bit NF4 / FP4 (`bnb-nf4`, `bnb-fp4`).

No calibration: bitsandbytes quantizes weights by round-to-nearest on its own grids; LLM.int8
finds its outlier columns at run time from each batch of activations.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compress.adapters import set_submodule
from compress.errors import check_number
from compress.formats.bnb import (BnbFP4Linear, BnbInt8Linear, BnbNF4Linear, bnb_functional,
                                  check_4bit_options)
from compress.passes import register_pass
from compress.quant.rtn import check_widths


@dataclass
class BnbInt8Config:
    threshold: float = 6.0      # |activation| at or above which an input column stays in float

    def __post_init__(self):
        check_number("threshold", self.threshold, 0,
                     note=" (0 disables the outlier decomposition)")


@dataclass
class Bnb4bitConfig:
    blocksize: int = 64                 # weights per absmax, over the flattened [out, in] weight
    double_quant: bool = False          # also quantize the absmax values to 8 bits (QLoRA)
    compute_dtype: str | None = None    # float32, bfloat16, float16; None: the model's dtype

    def __post_init__(self):
        check_4bit_options(self.blocksize, self.compute_dtype)


@register_pass("bnb-int8", BnbInt8Config)
def bnb_int8(model: nn.Module, config: BnbInt8Config, calib=None) -> nn.Module:
    bnb_functional()    # fail with the install hint before touching any layer
    for name, linear in check_widths(model, 0):
        set_submodule(model, name, BnbInt8Linear.from_float(linear, config.threshold))
    return model


def _four_bit(model: nn.Module, config: Bnb4bitConfig, cls) -> nn.Module:
    bnb_functional()
    for name, linear in check_widths(model, 0):
        set_submodule(model, name, cls.from_float(linear, config.blocksize, config.double_quant,
                                                  config.compute_dtype))
    return model


@register_pass("bnb-nf4", Bnb4bitConfig)
def bnb_nf4(model: nn.Module, config: Bnb4bitConfig, calib=None) -> nn.Module:
    return _four_bit(model, config, BnbNF4Linear)


@register_pass("bnb-fp4", Bnb4bitConfig)
def bnb_fp4(model: nn.Module, config: Bnb4bitConfig, calib=None) -> nn.Module:
    return _four_bit(model, config, BnbFP4Linear)
