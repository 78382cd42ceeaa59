"""GPTQ: weight-only integer quantization that corrects each rounding error on the columns not yet
quantized, using the Hessian of the layer's output error (Frantar et al., 2022).

The math is `gptq_quantize` (pure, on tensors); the pass streams calibration samples through one
decoder layer at a time with compress.calibration.run_layerwise. Codes, scales and zero points
come out on the same grid as RTN (compress.formats.grid), so the result is an ordinary
Int4Linear / Int8Linear.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from compress.adapters import adapter_for, set_submodule
from compress.calibration import (CalibrationData, collect_linear_inputs, full_precision,
                                  one_cpu_thread, run_layerwise)
from compress.errors import UserError
from compress.formats import grid
from compress.passes import register_pass
from compress.prune.common import was_pruned
from compress.quant.rtn import FORMAT_BY_BITS, WeightQuantConfig, check_widths
from compress.quant.stats import InputStats, input_groups


# true_sequential over at most this many calibration tokens runs as one forward of every sample
# at once (the fastest: SmolLM2's 64 x 512 protocol is 32,768 tokens). Beyond it, the whole
# set's activations of one layer would not fit (Llama-3-8B on 128 x 2048 tokens: ~7.5 GB per
# bf16 MLP activation), so each group calibrates in its own forward, in calibration batches.
ONE_FORWARD_MAX_TOKENS = 65536


@dataclass
class GPTQConfig(WeightQuantConfig):
    bits: int = 4
    # Quantize columns by decreasing Hessian diagonal, with static groups. On by default, as in
    # llm-compressor (actorder "static") and GPTQModel (desc_act): SmolLM2-135M int4 g64 sym
    # reaches 14.70 with it and 15.51 without (reports/smollm2-135m-calibrated).
    act_order: bool = True
    # Group qparams from the weights before any error feedback (AutoGPTQ's static_groups)
    # instead of from the corrected weights when a group starts; updated weights outside that
    # range are clamped to it. Implied by act_order; alone it was worse on SmolLM2 (16.43).
    static_groups: bool = False
    damp: float = 0.01           # added to the Hessian diagonal, as a fraction of its mean
    block_size: int = 128        # columns per lazy-batch update
    # True: later linears calibrate on the outputs of already quantized ones (q/k/v, then o,
    # gate/up, down): one forward of all samples when they are few (ONE_FORWARD_MAX_TOKENS),
    # else one batched forward per group. False: one batched forward with float linears, then a
    # second forward of the quantized layer.
    true_sequential: bool = True
    # In a pruned model (a sparsity pass ran on it, in this recipe or before its checkpoint was
    # saved) the zeros stay exactly zero: error feedback would otherwise re-fill them and break
    # the sparsity pattern. Never in a dense model, whatever its zeros: a model de-quantized
    # from GGUF Q4_0 has ~12% (code 8 is 0.0), and holding them only constrains GPTQ.
    keep_zeros: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.damp <= 1:
            raise UserError(f"damp must be in (0, 1] (a fraction of the mean Hessian diagonal), "
                            f"got {self.damp}")
        if self.block_size < 1:
            raise UserError(f"block_size must be a positive number of columns, got {self.block_size}")


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, so that U^T U = H^-1.

    Row i of U holds what GPTQ needs after column i is quantized: U[i, i] scales the error and
    U[i, i:] spreads it over the remaining columns (the OBS update in Cholesky form)."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    for dtype in (torch.float32, torch.float64):     # float64 only when float32 is not enough
        lower, info = torch.linalg.cholesky_ex(h.to(dtype))
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper.float()
    raise UserError(f"the GPTQ Hessian is not positive definite with damp={damp}; "
                    "use a larger damp (allowed: 0 < damp <= 1)")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  keep: torch.Tensor | None = None, static_groups: bool = False,
                  storage_dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize w [out, in] against the Hessian h [in, in] of its inputs.

    Returns (codes uint8 [out, in] in the original column order, scale, zero [out, groups]) with
    w ~= (codes - zero) * scale per group, exactly as compress.formats.grid lays them out.

    Without act_order, each group's qparams come from the error-corrected weights when the first
    column of the group is reached. With act_order, columns are processed by decreasing Hessian
    diagonal, and the group qparams are computed up front from the full weight ('static groups'),
    so groups stay contiguous in the original column order and the Int4Linear layout is valid.

    `keep` (bool [out, in], optional): weights where it is False are held at exactly zero, as if
    the mask were re-applied after every error-feedback update. Zero is a grid point of both the
    symmetric and the (integer zero point) asymmetric grid, so they quantize to exact zeros.

    `storage_dtype`: the dtype the layer stores scales in; codes are chosen against the scale as
    stored (grid.compute_qparams).
    """
    out_features, columns = w.shape
    if h.shape != (columns, columns):
        raise UserError(f"GPTQ Hessian shape {tuple(h.shape)} does not match the weight's "
                        f"{columns} input columns")
    w = w.float().clone()
    h = h.float().clone()
    # Columns whose input is always zero carry no signal: any value is exact, use zero.
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if keep is not None:
        w.mul_(keep)

    size = group_size or columns
    static = act_order or static_groups or group_size == 0
    if static:
        scale, zero = grid.compute_qparams(w, bits, symmetric, group_size,
                                           storage_dtype=storage_dtype)
    else:
        scale = w.new_empty(out_features, columns // size)
        zero = w.new_empty(out_features, columns // size)
        # Blocks never split a group, so a group's qparams see every update made before it.
        block_size = max(size, block_size // size * size)

    perm = torch.argsort(h.diagonal(), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
        keep = None if keep is None else keep[:, perm]
    group_of = ((perm if perm is not None else torch.arange(columns)) // size).tolist()
    hinv = inverse_hessian_factor(h, damp)

    # Work on W^T: a column of W is then a contiguous row, and the rank-1 updates run as one
    # BLAS call on contiguous memory (on a strided view of W they are ~100x slower on CPU).
    wt = w.T.contiguous()
    keep_t = None if keep is None else keep.T.to(w.dtype).contiguous()
    # Per-group (scale, zero) as [out] rows, so the column loop only indexes.
    scale_t, zero_t = scale.T.contiguous(), zero.T.contiguous()
    maxq = 2 ** bits - 1
    codes = torch.empty(columns, out_features, dtype=torch.uint8, device=w.device)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        block = wt[i1:i2]                   # a view: updates land in wt
        errors = torch.empty_like(block)
        hblock = hinv[i1:i2, i1:i2]
        with one_cpu_thread(w.device):
            for i in range(i2 - i1):
                col = i1 + i
                g = group_of[col]
                if not static and col % size == 0:
                    if keep_t is not None:   # qparams must not see re-filled pruned weights
                        block[i:i + size].mul_(keep_t[col:col + size])
                    s, z = grid.compute_qparams(block[i:i + size].T, bits, symmetric, 0,
                                                storage_dtype=storage_dtype)
                    scale_t[g], zero_t[g] = s[:, 0], z[:, 0]
                x = block[i]
                if keep_t is not None:
                    # Updates are additive and depend only on quantized columns' errors, so
                    # zeroing a column just before it is quantized equals re-masking after each.
                    x.mul_(keep_t[col])
                s, z = scale_t[g], zero_t[g]
                # The same float32 ops as grid.quantize / grid.dequantize, one column at a time.
                q = torch.round(x / s).add_(z).clamp_(0, maxq)
                codes[col] = q
                err = x.sub_(q.sub_(z).mul_(s)).div_(hblock[i, i])
                block[i + 1:].addr_(hblock[i, i + 1:], err, alpha=-1)
                errors[i] = err
        # Lazy batch: the columns after this block get all of its corrections in one matmul.
        wt[i2:].addmm_(hinv[i1:i2, i2:].T, errors, alpha=-1)

    codes = codes.T
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.contiguous(), scale_t.T.contiguous(), zero_t.T.contiguous()


def quantize_group(layer: nn.Module, names: tuple[str, ...], h: torch.Tensor,
                   config: GPTQConfig) -> dict[str, nn.Module]:
    """GPTQ on linears that share one input (and so one Hessian): their rows are stacked and
    quantized in one call, which is exact since GPTQ treats rows independently."""
    linears = [layer.get_submodule(name) for name in names]
    w = torch.cat([linear.weight.data for linear in linears])
    keep = (w != 0) if config.keep_zeros else None
    codes, scale, zero = gptq_quantize(w, h, config.bits, config.group_size, config.symmetric,
                                       config.act_order, config.damp, config.block_size, keep,
                                       config.static_groups, linears[0].weight.dtype)
    out, start = {}, 0
    for name, linear in zip(names, linears):
        rows = slice(start, start + linear.out_features)
        start = rows.stop
        bias = None if linear.bias is None else linear.bias.data
        out[name] = FORMAT_BY_BITS[config.bits].from_codes(
            codes[rows], scale[rows], zero[rows], config.group_size, config.symmetric, bias,
            linear.weight.dtype)
    return out


def _quantize_in_place(layer: nn.Module, names, h: torch.Tensor,
                       config: GPTQConfig) -> dict[str, nn.Module]:
    """Quantize one group, but keep its float linears with the dequantized weights written in,
    so that later groups calibrate on quantized outputs; the quantized modules, to swap in once
    the layer is done."""
    quantized = quantize_group(layer, names, h, config)
    for name, qlinear in quantized.items():
        linear = layer.get_submodule(name)
        linear.weight.data.copy_(qlinear.dequantize(linear.weight.dtype))
    return quantized


def _sequential_in_one_forward(layer: nn.Module, groups, config: GPTQConfig, forward):
    """Quantize each group from a hook as the single forward (all samples, one batch) reaches it.

    The hook writes the dequantized weights into the float linear before it runs, so everything
    downstream in this forward sees the quantized group; the outputs are then exactly those of
    the quantized layer and the driver needs no second forward."""
    replaced: dict[str, nn.Module] = {}

    @full_precision
    def hook(_module, args, names):
        if names[0] in replaced:
            raise RuntimeError("true_sequential GPTQ expects one batch per layer forward")
        replaced.update(_quantize_in_place(layer, names,
                                           InputStats.from_input(args[0]).hessian(), config))

    handles = [layer.get_submodule(names[0]).register_forward_pre_hook(
        lambda m, args, names=names: hook(m, args, names)) for names in groups]
    try:
        outputs = forward()
    finally:
        for handle in handles:
            handle.remove()
    for name, qlinear in replaced.items():
        set_submodule(layer, name, qlinear)
    return outputs


def _sequential_in_batches(layer: nn.Module, groups, config: GPTQConfig, forward) -> None:
    """One batched forward per group: group k's Hessian comes from a forward in which the groups
    before it already compute with their dequantized weights. Activation memory is that of one
    calibration batch; the driver then re-runs the quantized layer."""
    replaced: dict[str, nn.Module] = {}
    for names in groups:
        stats = InputStats()
        collect_linear_inputs({names[0]: layer.get_submodule(names[0])}, forward,
                              lambda _name, x: stats.add(x))
        replaced.update(_quantize_in_place(layer, names, stats.hessian(), config))
    for name, qlinear in replaced.items():
        set_submodule(layer, name, qlinear)


@register_pass("gptq", GPTQConfig, needs_calibration=True)
def gptq(model: nn.Module, config: GPTQConfig, calib: CalibrationData) -> nn.Module:
    check_widths(model, config.group_size, config.bits)
    config = dataclasses.replace(config, keep_zeros=config.keep_zeros and was_pruned(model))
    groups = input_groups(adapter_for(model))
    samples = calib.samples
    one_forward = config.true_sequential and samples.numel() <= ONE_FORWARD_MAX_TOKENS

    def compress_layer(_index, layer, forward):
        if one_forward:
            return _sequential_in_one_forward(layer, groups, config, forward)
        if config.true_sequential:
            return _sequential_in_batches(layer, groups, config, forward)
        stats = {names[0]: InputStats() for names in groups}
        collect_linear_inputs({names[0]: layer.get_submodule(names[0]) for names in groups},
                              forward, lambda name, x: stats[name].add(x))
        for names in groups:
            for name, qlinear in quantize_group(layer, names, stats[names[0]].hessian(),
                                                config).items():
                set_submodule(layer, name, qlinear)
        return None

    batch = len(samples) if one_forward else calib.batch_size
    run_layerwise(model, samples, compress_layer, calib.device, batch, desc="gptq",
                  compute_dtype=calib.compute_dtype)
    return model
