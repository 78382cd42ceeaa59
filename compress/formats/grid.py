"""Integer quantization grids shared by every weight quantizer (RTN, GPTQ, AWQ).

Pure functions on tensors. A weight of shape [out, in] is split into groups of `group_size`
consecutive input columns (group_size 0: one group per output row, i.e. per channel). Each group
gets a scale and an integer zero point; codes are unsigned in [0, 2**bits - 1]:

    w ~= (q - zero) * scale

Symmetric: zero = 2**(bits-1) and scale = max|w| / ((2**bits - 1) / 2), so the grid spans
[-amax * 16/15, amax * 14/15] for 4 bits: +amax clamps half a step down (the convention of
llm-compressor and GPTQ's `sym`).
Asymmetric: the grid spans [min(w, 0), max(w, 0)] with an integer zero point.
"""
from __future__ import annotations

import torch

from compress.errors import UserError


def group_count(in_features: int, group_size: int) -> int:
    return 1 if group_size == 0 else in_features // group_size


def check_group_size(name: str, in_features: int, group_size: int, bits: int = 8) -> None:
    if bits == 4 and in_features % 2:
        raise UserError(f"int4 packs two columns per byte: the input width {in_features} of "
                        f"{name} is odd; use 8 bits for it")
    if group_size < 0:
        raise UserError(f"group size must be 0 (per channel) or a positive divisor of the input "
                        f"width, got {group_size}")
    if group_size and in_features % group_size:
        divisors = [d for d in (16, 32, 64, 128, 256) if in_features % d == 0]
        raise UserError(f"group size {group_size} does not divide the input width {in_features} of "
                        f"{name}; allowed: 0 (per channel) or a divisor such as "
                        f"{', '.join(map(str, divisors)) or 'none of 16..256'}")


def compute_qparams(w: torch.Tensor, bits: int, symmetric: bool, group_size: int,
                    clip_ratio: float = 1.0, storage_dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group: both of shape [out, groups], computed in float32.

    `clip_ratio` < 1 shrinks the range (AWQ's clipping search); 1.0 is plain min/max.
    `storage_dtype`: the dtype the layer will store the scale in. The scale is rounded to it
    first, so that codes are chosen against the scale the layer computes with (in bfloat16 a
    float32 scale moves by up to 2**-9 of itself: +165% weight error for int8 per channel).
    """
    grouped = _grouped(w.float(), group_size)                 # [out, groups, size]
    maxq = 2 ** bits - 1
    if symmetric:
        amax = grouped.abs().amax(dim=-1) * clip_ratio
        scale = _stored(amax / (maxq / 2), storage_dtype)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = grouped.amin(dim=-1).clamp(max=0) * clip_ratio
        hi = grouped.amax(dim=-1).clamp(min=0) * clip_ratio
        scale = _stored((hi - lo) / maxq, storage_dtype)
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def _stored(scale: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The float32 value of `scale` as stored in `dtype`, never zero (an all-zero group). The
    floor is `dtype`'s smallest subnormal, not its smallest normal: float16's is 6.1e-5, which
    put a row of small weights on a grid coarser than it needs."""
    smallest = 1e-8
    if dtype is not None:   # tiny * eps: the smallest subnormal of an IEEE-like format
        smallest = max(smallest, torch.finfo(dtype).tiny * torch.finfo(dtype).eps)
    scale = scale.clamp(min=smallest)
    return scale if dtype is None else scale.to(dtype).float()


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
             group_size: int) -> torch.Tensor:
    """Integer codes (uint8 holding [0, 2**bits-1]) of shape [out, in]."""
    grouped = _grouped(w.float(), group_size)
    q = torch.round(grouped / scale[..., None]) + zero[..., None]
    return q.clamp(0, 2 ** bits - 1).reshape(w.shape).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    grouped = _grouped(q.float(), group_size)
    w = (grouped - zero[..., None].float()) * scale[..., None].float()
    return w.reshape(q.shape).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, symmetric: bool, group_size: int,
                  clip_ratio: float = 1.0, storage_dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
    """Round-trip through the grid, in w's dtype: what the quantized layer will compute with
    when it stores its scales in `storage_dtype` (default: w's dtype)."""
    scale, zero = compute_qparams(w, bits, symmetric, group_size, clip_ratio,
                                  storage_dtype or w.dtype)
    return dequantize(quantize(w, scale, zero, bits, group_size), scale, zero, group_size, w.dtype)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = w.shape
    size = in_features if group_size == 0 else group_size
    return w.reshape(out_features, in_features // size, size)
