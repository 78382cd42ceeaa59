"""FP8 W8A8 linear layer: e4m3 weights with one scale per output channel, e4m3 activations with one
dynamic scale per token.

Storage: `qweight` float8_e4m3fn [out, in]; `scales` float32 [out, 1]. A value is stored as
x / scale with scale = amax / 448 (the largest finite e4m3), so each row uses the full range.

Fast path: `torch._scaled_mm` with row-wise scales, on CUDA GPUs with FP8 tensor cores (compute
capability 8.9: Ada, 9.0: Hopper, and later). Elsewhere the reference runs: fp8 round trip of
the activations, dequantized weight, float32 matmul. It gives the same numbers (up to float
summation order), so quality can be measured on a CPU; speed cannot.
"""
from __future__ import annotations

import torch

from compress.formats.base import RowScaledLinear
from compress.formats.compiled import fused_on_cuda

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max      # 448.0
EPS = 1e-12
MIN_CAPABILITY = (8, 9)


@fused_on_cuda(dynamic_rows=True)  # activations at every forward: one kernel, not five
def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scaled e4m3 of a 2-D tensor: values float8 [rows, cols], scales float32 [rows, 1]."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=EPS)
    # Clamp before the cast: e4m3fn has no infinity, values past 448 would become NaN.
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fake_quantize_rows_fp8(x: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_rows_fp8(x)
    return q.float() * scale


def fp8_capable(device: torch.device | str) -> bool:
    """Whether `device` has FP8 tensor cores that `torch._scaled_mm` can use."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def scaled_mm_ok(device: torch.device, k: int, n: int) -> bool:
    """cuBLASLt FP8 GEMMs need the inner and output widths to be multiples of 16."""
    return fp8_capable(device) and k % 16 == 0 and n % 16 == 0


class FP8Linear(RowScaledLinear):
    format = "fp8-e4m3"
    code_dtype = FP8
    fast_kernel = "torch._scaled_mm"
    description = "e4m3 per channel, a8 per token"
    quantize_rows = staticmethod(quantize_rows_fp8)

    def fast_fits(self, device: torch.device, rows: int) -> bool:
        return scaled_mm_ok(device, self.in_features, self.out_features)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`torch._scaled_mm` with row-wise scales (on CPU too in recent torch, emulated; torch
        2.11's CPU version takes per-tensor scales only, and the CPU test then skips).

        The weight is [out, in] row-major, so `.t()` is the column-major [in, out] operand cuBLASLt
        wants. Row-wise scaling on CUDA returns bfloat16 only in many torch builds, hence the
        bfloat16 output there, cast back afterwards.
        """
        qx, sx = quantize_rows_fp8(x.reshape(-1, self.in_features))
        out_dtype = torch.bfloat16 if x.device.type == "cuda" else torch.float32
        out = torch._scaled_mm(qx, self.qweight.t(), scale_a=sx, scale_b=self.scales.t(),
                               out_dtype=out_dtype)
        return self._finish(out, x)
