"""W8A8 int8 linear layer (SmoothQuant): int8 weights per output channel, int8 activations per token.

Storage: `qweight` int8 [out, in] (symmetric, codes in [-127, 127]); `scales` float32 [out, 1].
Activations are quantized at run time, one symmetric scale per token (row), so nothing about
them is stored. Then

    y[t, o] = sx[t] * sw[o] * sum_i qx[t, i] * qw[o, i]

The sum is an exact int8 x int8 -> int32 matmul (`torch._int_mm`). The reference forward
computes the same thing in float: fake-quantized activations times the dequantized weight.
"""
from __future__ import annotations

import torch

from compress.formats.base import RowScaledLinear
from compress.formats.compiled import fused_on_cuda

QMAX = 127          # symmetric int8: -128 is never used, so negation never overflows
EPS = 1e-8          # scale floor: an all-zero row or token quantizes to zeros, not NaN
CUDA_MIN_ROWS = 17  # cuBLAS int8 GEMM behind torch._int_mm rejects m <= 16


@fused_on_cuda(dynamic_rows=True)  # activations at every forward: one kernel, not five
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a 2-D tensor: codes int8 [rows, cols] and scales float32 [rows, 1].

    Used for weights (rows = output channels) and for activations (rows = tokens).
    """
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / QMAX).clamp(min=EPS)
    q = torch.round(x / scale).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """Round trip through `quantize_rows`, in float32: what the int8 matmul sees."""
    q, scale = quantize_rows(x)
    return q.float() * scale


def int_mm_padded(qx: torch.Tensor, qw_t: torch.Tensor, min_rows: int) -> torch.Tensor:
    """`torch._int_mm(qx, qw_t)` for any number of rows: pads qx with zero rows up to `min_rows`
    and drops their (zero) outputs, so the real rows are exactly what an unpadded product gives."""
    rows = qx.shape[0]
    if rows >= min_rows:
        return torch._int_mm(qx, qw_t)
    padded = torch.zeros(min_rows, qx.shape[1], dtype=qx.dtype, device=qx.device)
    padded[:rows] = qx
    return torch._int_mm(padded, qw_t)[:rows]


def int_mm_ok(device: torch.device, m: int, k: int, n: int, cpu_fast: bool) -> bool:
    """Whether `torch._int_mm` is the fast choice for an [m, k] x [k, n] product here.

    CUDA (cuBLAS int8 GEMM) needs k, n multiples of 8 and m > 16; smaller m (decode) is padded
    with zero rows by `int_mm_padded`, which still reads int8 weights instead of a float32
    dequantized copy. On CPU `_int_mm` is exact for every shape, but without AVX-512 (VNNI) it
    is a scalar loop, tens of times slower than a float matmul (measured: 3.3 s vs 0.06 s for
    2048x576x1536 on an AVX2 EPYC), so the float reference is the faster path there.
    """
    if device.type == "cuda":
        return k % 8 == 0 and n % 8 == 0
    if device.type == "cpu":
        return cpu_fast
    return False


def cpu_has_fast_int8_matmul() -> bool:
    """AVX-512 or AMX: `_int_mm` beats the float reference on this CPU (see int_mm_ok)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


class W8A8Linear(RowScaledLinear):
    format = "w8a8-int8"
    code_dtype = torch.int8
    fast_kernel = "torch._int_mm"
    description = "w8 per channel, a8 per token"
    quantize_rows = staticmethod(quantize_rows)

    def _register_storage(self, dtype: torch.dtype) -> None:
        super()._register_storage(dtype)
        # Asked once here: dynamo cannot trace a string-valued query inside a compiled forward.
        self.cpu_fast_int8 = cpu_has_fast_int8_matmul()

    def fast_fits(self, device: torch.device, rows: int) -> bool:
        return int_mm_ok(device, rows, self.in_features, self.out_features, self.cpu_fast_int8)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The real int8 matmul: exact int32 accumulation, then both scales in float32."""
        qx, sx = quantize_rows(x.reshape(-1, self.in_features))
        min_rows = CUDA_MIN_ROWS if x.is_cuda else 1
        acc = int_mm_padded(qx, self.qweight.t(), min_rows)
        return self._finish(acc, x, sx, self.scales.t())
