"""SmoothQuant W8A8 (`smoothquant`): migrate activation outliers into the weights, then int8 both.

For a linear y = x W^T with per-input-channel factors s, y = (x / s)(W * s)^T exactly. Dividing x
by s happens for free by dividing the weight of the RMSNorm that produces x (or the rows of the
linear that produces it); multiplying W's columns by s happens once, offline. Choosing

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

evens out the per-channel ranges of activations and weights, so per-token int8 activations lose
much less (Xiao et al. 2023). Smoothed pairs in a Llama layer:
  q, k, v    <- input norm
  gate, up   <- post-attention norm
  down       <- up's output rows (the SwiGLU product is linear in up's output), optional
o_proj is left alone: its input comes from softmax(QK) V, where a per-channel factor could only be
folded into v_proj per key/value head, not per channel of every query head.
Unlike the reference code, which takes every layer's activation maxima from one float forward,
layer i's maxima come from the calibration driver's inputs: the outputs of the W8A8 layers
before it, which is what layer i will see at inference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.adapters import adapter_for
from compress.calibration import collect_linear_inputs, run_layerwise
from compress.errors import UserError
from compress.formats.w8a8 import W8A8Linear
from compress.passes import register_pass
from compress.quant.rtn import check_widths

MIN_SCALE = 1e-5     # as in the SmoothQuant reference code: no channel is blown up by 1/0


@dataclass
class SmoothQuantConfig:
    alpha: float = 0.5          # migration strength: 0 keeps activations, 1 moves all to weights
    smooth_down: bool = True    # also smooth down_proj through up_proj's output rows

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"alpha must be between 0 and 1 (0.5 is the usual choice); "
                            f"got {self.alpha}")


# ---- pure functions ---------------------------------------------------------------------------

def update_channel_absmax(running: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Running per-input-channel max |x| over the rows of a 2-D activation batch, in float32."""
    batch = x.detach().abs().amax(dim=0).float()
    return batch if running is None else torch.maximum(running, batch)


def weight_channel_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """Per-input-channel max |W| over every weight that reads the same input."""
    return torch.cat([w.float() for w in weights], dim=0).abs().amax(dim=0)


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), floored at MIN_SCALE; 1 where a channel is dead."""
    act = act_max.float().clamp(min=MIN_SCALE)
    wmax = weight_max.float().clamp(min=MIN_SCALE)
    s = (act.pow(alpha) / wmax.pow(1.0 - alpha)).clamp(min=MIN_SCALE)
    # A channel never active in calibration carries no information: leave it untouched.
    return torch.where(act_max > 0, s, torch.ones_like(s))


def fold_scales(producer: torch.Tensor, consumers: list[torch.Tensor],
                s: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """New (producer, consumers): producer / s along its output channels, consumer columns * s.

    `producer` is a norm weight [in] or a linear weight [in, k] whose rows make the channels.
    """
    shape = (-1,) + (1,) * (producer.dim() - 1)
    new_producer = (producer.float() / s.reshape(shape)).to(producer.dtype)
    new_consumers = [(w.float() * s[None, :]).to(w.dtype) for w in consumers]
    return new_producer, new_consumers


# ---- applying it to modules -------------------------------------------------------------------

def smooth_(producer: nn.Module, consumers: list[nn.Module], act_max: torch.Tensor,
            alpha: float, producer_bias: bool = False) -> torch.Tensor:
    """Compute the scales for `consumers` and fold them in place; returns s."""
    weights = [c.weight.data for c in consumers]
    s = smoothing_scales(act_max.to(weights[0].device), weight_channel_absmax(weights), alpha)
    new_producer, new_weights = fold_scales(producer.weight.data, weights, s)
    producer.weight.data.copy_(new_producer)
    for consumer, w in zip(consumers, new_weights):
        consumer.weight.data.copy_(w)
    if producer_bias and getattr(producer, "bias", None) is not None:
        producer.bias.data.copy_((producer.bias.data.float() / s).to(producer.bias.dtype))
    return s


def smooth_layer(layer: nn.Module, adapter, act_max: dict[str, torch.Tensor], alpha: float,
                 smooth_down: bool) -> None:
    a, m = adapter.attention, adapter.mlp
    get = layer.get_submodule
    smooth_(get(adapter.input_norm), [get(f"{a}.{n}") for n in (adapter.q, adapter.k, adapter.v)],
            act_max["attention"], alpha)
    smooth_(get(adapter.post_attention_norm), [get(f"{m}.{adapter.gate}"), get(f"{m}.{adapter.up}")],
            act_max["mlp"], alpha)
    if smooth_down:
        smooth_(get(f"{m}.{adapter.up}"), [get(f"{m}.{adapter.down}")], act_max["down"], alpha,
                producer_bias=True)


def quantize_layer(layer: nn.Module, adapter) -> None:
    """Swap every linear of the decoder layer for a W8A8Linear."""
    for rel in adapter.linear_names():
        parent, _, name = rel.rpartition(".")
        setattr(layer.get_submodule(parent), name, W8A8Linear.from_float(layer.get_submodule(rel)))


@register_pass("smoothquant", SmoothQuantConfig, needs_calibration=True)
def smoothquant(model: nn.Module, config: SmoothQuantConfig, calib) -> nn.Module:
    adapter = adapter_for(model)
    check_widths(model, 0)
    a, m = adapter.attention, adapter.mlp
    # q/k/v share one input, gate/up another: one hook each is enough.
    watched = {"attention": f"{a}.{adapter.q}", "mlp": f"{m}.{adapter.gate}",
               "down": f"{m}.{adapter.down}"}

    def compress_layer(index: int, layer: nn.Module, forward) -> None:
        act_max: dict[str, torch.Tensor] = {}

        def accumulate(key: str, x: torch.Tensor) -> None:
            act_max[key] = update_channel_absmax(act_max.get(key), x)

        collect_linear_inputs({k: layer.get_submodule(p) for k, p in watched.items()},
                              forward, accumulate)
        smooth_layer(layer, adapter, act_max, config.alpha, config.smooth_down)
        quantize_layer(layer, adapter)

    run_layerwise(model, calib.samples, compress_layer, calib.device, calib.batch_size,
                  desc="smoothquant", compute_dtype=calib.compute_dtype)
    return model
