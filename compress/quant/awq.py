"""AWQ: activation-aware weight quantization (Lin et al., 2023), then int4/int8 round-to-nearest.

A weight column that multiplies a large activation matters more. For linears reading the same
input x, scaling their columns by s and the producer of x by 1/s leaves the float function
unchanged, y = (x / s)(W diag(s))^T, but rounds salient columns on a finer relative grid. Per
group of linears sharing an input, s = mean|x|^alpha (normalized by sqrt(max * min)), with alpha
grid-searched in [0, 1] to minimize the group's output error after fake quantization. Then a
clipping ratio per (output row, weight group) is searched the same way, and the weights are
rounded to the ordinary Int4Linear / Int8Linear format.

Both searches measure the output error ||X W^T - X W_q^T||^2 exactly from the Gram matrix
X^T X (tr(D G D^T) with D = W - W_q) on every calibration token: a few small matmuls per
candidate instead of a pass over the tokens, so no token subsampling is needed. Three deliberate
departures from llm-awq: the scale search minimizes the output error of the group's linears
rather than of the whole attention / MLP block; alpha = 1 is a candidate besides 0..0.95; and
layer i + 1 is calibrated on the outputs of the quantized layer i (the one calibration driver,
as GPTQ does), where llm-awq feeds it the scaled float layer's.
As in llm-awq, q and k are not clipped (their error goes through softmax, where the linear
output error is a poor guide).

Groups in a Llama layer (producer -> consumers):
  input norm -> q, k, v;   post-attention norm -> gate, up;   up (rows) -> down;
  v (rows) -> o, with one scale per key/value channel shared by the query heads that read it
  (grouped-query attention), skipped when the head layout does not allow it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from compress.adapters import adapter_for, set_submodule
from compress.calibration import CalibrationData, collect_linear_inputs, run_layerwise
from compress.errors import UserError
from compress.formats import grid
from compress.passes import register_pass
from compress.prune.common import attach_report
from compress.quant.rtn import WeightQuantConfig, check_widths, quantized_linear
from compress.quant.stats import InputStats

MIN_SCALE = 1e-4      # as llm-awq: a channel that never fires is not blown up by 0^alpha


@dataclass
class AWQConfig(WeightQuantConfig):
    bits: int = 4
    n_grid: int = 20          # alpha candidates i / n_grid for i = 0..n_grid (0 is plain RTN)
    clip: bool = True         # search a clipping ratio per output row and weight group
    max_shrink: float = 0.5   # clip ratios tried: 1, 1 - 1/n_grid, ... while above 1 - max_shrink

    def __post_init__(self):
        super().__post_init__()
        if self.n_grid < 1:
            raise UserError(f"n_grid must be a positive number of grid points, got {self.n_grid}")
        if not 0 <= self.max_shrink < 1:
            raise UserError(f"max_shrink must be in [0, 1) (0.5: clip at most half the range), "
                            f"got {self.max_shrink}")


# ---- pure functions ---------------------------------------------------------------------------

def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """||X delta^T||^2 = sum over rows of delta G delta^T, from G = X^T X (float32 scalar)."""
    delta = delta.float()
    return (delta @ gram).mul_(delta).sum()


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, floored, divided by sqrt(max(s) * min(s)) so that s stays near 1."""
    s = x_mean.float().pow(alpha).clamp(min=MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def search_scales(weight: torch.Tensor, gram: torch.Tensor, x_mean: torch.Tensor, bits: int,
                  group_size: int, symmetric: bool, n_grid: int
                  ) -> tuple[torch.Tensor, float, list[float]]:
    """The AWQ scale for `weight` (the consumers' rows stacked) and its alpha, and the output
    error of every candidate. Candidate alpha = 0 gives s = 1: plain round-to-nearest."""
    w = weight.float()
    best, errors = None, []
    for i in range(n_grid + 1):
        alpha = i / n_grid
        s = awq_scales(x_mean, alpha)
        w_q = grid.fake_quantize(w * s, bits, symmetric, group_size,
                                 storage_dtype=weight.dtype) / s
        errors.append(float(output_error(w - w_q, gram)))
        if best is None or errors[-1] < best[0]:
            best = (errors[-1], s, alpha)
    return best[1], best[2], errors


def clip_ratios(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int,
                symmetric: bool, max_shrink: float, n_grid: int) -> torch.Tensor:
    """Clip ratio per (output row, weight group) [out, groups] minimizing that group's share of
    the output error, ||X_g (w_g - q_g)||^2, with X_g the group's input columns."""
    w = weight.float()
    out_features, columns = w.shape
    size = group_size or columns
    groups = columns // size
    # The diagonal blocks of the Gram matrix: [groups, size, size].
    idx = torch.arange(groups, device=w.device)
    blocks = gram.reshape(groups, size, groups, size)[idx, :, idx, :]
    best_err = best_ratio = None
    # Every 1 - i/n_grid above 1 - max_shrink: i < max_shrink * n_grid (rounded first, so that
    # 0.29 * 100 = 28.999999999999996 still counts as 29).
    for i in range(max(1, math.ceil(round(max_shrink * n_grid, 9)))):
        ratio = 1.0 - i / n_grid
        scale, zero = grid.compute_qparams(w, bits, symmetric, group_size, ratio, weight.dtype)
        w_q = grid.dequantize(grid.quantize(w, scale, zero, bits, group_size), scale, zero,
                              group_size)
        d = (w - w_q).reshape(out_features, groups, size).transpose(0, 1)    # [groups, out, size]
        err = torch.bmm(d, blocks).mul_(d).sum(-1).T                         # [out, groups]
        if best_err is None:
            best_err, best_ratio = err, torch.ones_like(err)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(err, ratio), best_ratio)
    return best_ratio


def tie_heads(x: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Average a per-channel vector of o_proj's input over the query heads that share a key/value
    head, and expand it back: any scale computed from it elementwise can be folded into v_proj."""
    rep = num_heads // num_kv_heads
    tied = x.reshape(num_kv_heads, rep, -1).mean(dim=1, keepdim=True)
    return tied.expand(num_kv_heads, rep, tied.shape[-1]).reshape(-1)


# ---- applying it to modules -------------------------------------------------------------------

def fold_(producer: nn.Module, producer_s: torch.Tensor, consumers: list[nn.Module],
          consumer_s: torch.Tensor) -> None:
    """In place: the producer's output channels (weight rows, bias) / producer_s, the consumers'
    input columns * consumer_s (the same scales, laid out per consumer channel)."""
    shape = (-1,) + (1,) * (producer.weight.dim() - 1)
    producer.weight.data.copy_(producer.weight.data.float() / producer_s.reshape(shape))
    if getattr(producer, "bias", None) is not None:
        producer.bias.data.copy_(producer.bias.data.float() / producer_s)
    for consumer in consumers:
        consumer.weight.data.copy_(consumer.weight.data.float() * consumer_s[None, :])


def scale_groups(adapter, heads: tuple[int, int] | None):
    """(producer, consumers, tied o_proj heads or None) in a decoder layer; the first consumer's
    input is the one observed. `heads` (query, key/value) when v -> o can be folded."""
    a, m = adapter.attention, adapter.mlp
    groups = [(adapter.input_norm, (f"{a}.{adapter.q}", f"{a}.{adapter.k}", f"{a}.{adapter.v}"),
               None)]
    if heads is not None:
        groups.append((f"{a}.{adapter.v}", (f"{a}.{adapter.o}",), heads))
    groups += [(adapter.post_attention_norm, (f"{m}.{adapter.gate}", f"{m}.{adapter.up}"), None),
               (f"{m}.{adapter.up}", (f"{m}.{adapter.down}",), None)]
    return groups


def foldable_heads(model: nn.Module) -> tuple[int, int] | None:
    """(query heads, key/value heads) when o_proj's input channels map onto v_proj's rows."""
    config, adapter = model.config, adapter_for(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = adapter.layers(model)[0].get_submodule(adapter.attention)
    v, o = getattr(attention, adapter.v), getattr(attention, adapter.o)
    if heads % kv_heads or v.out_features != kv_heads * head_dim or \
            o.in_features != heads * head_dim:
        return None
    return heads, kv_heads


def scale_layer(layer: nn.Module, adapter, stats: dict[str, InputStats], config: AWQConfig,
                heads: tuple[int, int] | None) -> tuple[dict, dict[str, float]]:
    """Search and fold the AWQ scales of one decoder layer (its float function is unchanged).

    Returns the Gram matrix of each scaled linear's new input (x / s) and alpha per group."""
    get = layer.get_submodule
    grams, alphas = {}, {}
    for producer, consumers, tied in scale_groups(adapter, heads):
        observed = stats[consumers[0]]
        x_mean = observed.mean_abs()
        if tied is not None:
            x_mean = tie_heads(x_mean, *tied)
        linears = [get(name) for name in consumers]
        weight = torch.cat([linear.weight.data for linear in linears])
        s, alpha, _ = search_scales(weight, observed.sum_xx, x_mean, config.bits,
                                    config.group_size, config.symmetric, config.n_grid)
        producer_s = s if tied is None else s.reshape(tied[1], tied[0] // tied[1], -1)[:, 0]
        fold_(get(producer), producer_s.reshape(-1), linears, s)
        alphas[consumers[0].rsplit(".", 1)[-1]] = alpha
        for name in consumers:
            grams[name] = observed.sum_xx / (s[:, None] * s[None, :])
    return grams, alphas


def quantize_layer(layer: nn.Module, adapter, grams: dict[str, torch.Tensor],
                   config: AWQConfig) -> None:
    """Clip (where searched) and round every linear of the layer to Int4Linear / Int8Linear."""
    no_clip = {f"{adapter.attention}.{adapter.q}", f"{adapter.attention}.{adapter.k}"}
    for name in adapter.linear_names():
        linear = layer.get_submodule(name)
        scale = zero = None
        if config.clip and name not in no_clip:
            ratio = clip_ratios(linear.weight.data, grams[name], config.bits, config.group_size,
                                config.symmetric, config.max_shrink, config.n_grid)
            scale, zero = grid.compute_qparams(linear.weight.data, config.bits, config.symmetric,
                                               config.group_size, ratio, linear.weight.dtype)
        set_submodule(layer, name, quantized_linear(linear, config.bits, config.group_size,
                                                    config.symmetric, scale=scale, zero=zero))


@register_pass("awq", AWQConfig, needs_calibration=True)
def awq(model: nn.Module, config: AWQConfig, calib: CalibrationData) -> nn.Module:
    check_widths(model, config.group_size, config.bits)
    adapter = adapter_for(model)
    heads = foldable_heads(model)
    a = adapter.attention
    watched = [f"{a}.{adapter.q}", f"{a}.{adapter.o}", f"{adapter.mlp}.{adapter.gate}",
               f"{adapter.mlp}.{adapter.down}"]
    chosen: list[dict[str, float]] = []

    def compress_layer(_index, layer, forward):
        stats = {name: InputStats(track_abs=True) for name in watched}
        collect_linear_inputs({name: layer.get_submodule(name) for name in watched}, forward,
                              lambda name, x: stats[name].add(x))
        grams, alphas = scale_layer(layer, adapter, stats, config, heads)
        # o_proj keeps its own input when v -> o could not be folded.
        grams.setdefault(watched[1], stats[watched[1]].sum_xx)
        quantize_layer(layer, adapter, grams, config)
        chosen.append(alphas)

    run_layerwise(model, calib.samples, compress_layer, calib.device, calib.batch_size,
                  desc="awq", compute_dtype=calib.compute_dtype)
    attach_report(model, "awq", {"alpha": {k: [c[k] for c in chosen] for k in chosen[0]},
                                 "v_to_o_scaled": heads is not None})
    return model
