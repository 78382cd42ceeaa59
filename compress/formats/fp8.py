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
import torch.nn.functional as F

from compress.formats.base import QuantizedLinear

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max      # 448.0
EPS = 1e-12
MIN_CAPABILITY = (8, 9)


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


class FP8Linear(QuantizedLinear):
    format = "fp8-e4m3"

    def _register_storage(self, dtype: torch.dtype) -> None:
        self.register_buffer("qweight", torch.zeros(self.out_features, self.in_features, dtype=FP8))
        self.register_buffer("scales", torch.zeros(self.out_features, 1, dtype=torch.float32))

    @classmethod
    def from_float(cls, linear: torch.nn.Module, weight: torch.Tensor | None = None) -> "FP8Linear":
        w = linear.weight.data if weight is None else weight
        dtype = linear.weight.dtype
        layer = cls(linear.in_features, linear.out_features, 8, 0, True,
                    linear.bias is not None, dtype)
        q, scale = quantize_rows_fp8(w)
        layer.qweight.copy_(q)
        layer.scales.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data.to(dtype))
        return layer.to(w.device)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.qweight.float() * self.scales).to(dtype or torch.float32)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = fake_quantize_rows_fp8(x.reshape(-1, self.in_features))
        out = F.linear(flat, self.dequantize(torch.float32))
        return self._finish(out, x)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`torch._scaled_mm` with row-wise scales (also runs, emulated, on CPU in torch >= 2.8).

        The weight is [out, in] row-major, so `.t()` is the column-major [in, out] operand cuBLASLt
        wants. Row-wise scaling on CUDA returns bfloat16 only in many torch builds, hence the
        bfloat16 output there, cast back afterwards.
        """
        qx, sx = quantize_rows_fp8(x.reshape(-1, self.in_features))
        out_dtype = torch.bfloat16 if x.device.type == "cuda" else torch.float32
        out = torch._scaled_mm(qx, self.qweight.t(), scale_a=sx, scale_b=self.scales.t(),
                               out_dtype=out_dtype)
        return self._finish(out.float(), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if scaled_mm_ok(x.device, self.in_features, self.out_features):
            self.kernel = "torch._scaled_mm"
            return self.fast_forward(x)
        self.kernel = "reference"
        return self.reference_forward(x)

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, e4m3 per channel, a8 per token"
