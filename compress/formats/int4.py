"""Int4 weight-only linear layer: two 4-bit codes per byte, group-wise scales and zero points.

Storage: `qweight` uint8 [out, in/2], column 2j in the low nibble and 2j+1 in the high one;
`scales` [out, groups] in the model dtype; `zeros` uint8 [out, groups] (asymmetric only; the
symmetric zero point is 8). Kernels: up to CUDA_KERNEL_MAX_ROWS rows, tinygemm
(compress/formats/int4_kernels.py, its own layout built from these buffers); more rows dequantize
(one fused kernel on CUDA) and run the float matmul. Inductor's fused dequantize-GEMV was 3.8x
slower than tinygemm for the Llama-3-8B shape on an H200, but that run's `unpack_int4` made it
read five times the bytes it needs; `set_kernel("fused-gemv")` runs it again for a new measurement.
"""
from __future__ import annotations

import torch

from compress.formats import grid
from compress.formats.base import CUDA_KERNEL_MAX_ROWS, QuantizedLinear, autocast_input
from compress.formats.compiled import fused_on_cuda

SYMMETRIC_ZERO = 8


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] codes in [0, 15] -> [out, in/2] bytes. `in` must be even."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even input width, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: [out, in/2] bytes -> [out, in] codes in [0, 15] (uint8).

    One broadcast shift, not `stack((low, high))`: inductor lowers a stack to a concatenation
    that writes both nibble planes to memory before the dequantization reads them back, which
    made the compiled dequantize two kernels and the fused dequantize-GEMV read 2.5 bytes per
    weight instead of 0.5 (tests/test_kernel_fusion.py checks the generated code).
    """
    # arange, not torch.tensor([0, 4]): inductor computes it in the kernel instead of reading
    # a constant buffer it may have to create first.
    shifts = torch.arange(0, 8, 4, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & 0x0F
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


class Int4Linear(QuantizedLinear):
    format = "int4"
    kernel_choices = ("auto", "triton", "fused-gemv")
    triton_gemm_min_rows = CUDA_KERNEL_MAX_ROWS + 1  # tinygemm serves 2-64 rows (1.39x at 8)

    def _register_storage(self, dtype: torch.dtype) -> None:
        groups = grid.group_count(self.in_features, self.group_size)
        self.register_buffer("qweight", torch.zeros(self.out_features, self.in_features // 2,
                                                    dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(self.out_features, groups, dtype=dtype))
        self.register_buffer("zeros", None if self.symmetric else
                             torch.zeros(self.out_features, groups, dtype=torch.uint8))

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   symmetric: bool, bias: torch.Tensor | None, dtype: torch.dtype) -> "Int4Linear":
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, 4, group_size, symmetric, bias is not None, dtype)
        layer.qweight.copy_(pack_int4(q))
        layer.scales.copy_(scale.to(dtype))
        if not symmetric:
            layer.zeros.copy_(zero.to(torch.uint8))
        if bias is not None:
            layer.bias.data.copy_(bias.to(dtype))
        return layer.to(q.device)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        return int4_codes(self.qweight, self.scales, self.zeros)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size,
                               dtype or self.scales.dtype)

    # Fast path (compress/formats/int4_kernels.py): a kernel layout built lazily from the buffers
    # above, kept out of the state dict so the saved format never changes.
    def prepare_fast(self, dtype: torch.dtype) -> None:
        """Build the kernel layout for activations of `dtype` on this layer's device, if any."""
        from compress.formats import int4_kernels

        q, zero = self.codes()
        self._fast = int4_kernels.build(q, zero, self.scales, self.group_size, dtype)
        self._fast_key = (self.qweight.device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        out = self.chosen_forward(x)
        if out is not None:
            return out
        if not torch.compiler.is_compiling() and \
                getattr(self, "_fast_key", None) != (self.qweight.device, x.dtype):
            self.prepare_fast(x.dtype)
        fast = getattr(self, "_fast", None)
        if fast is not None and fast.accepts(x):
            kernel, out = fast.kernel, fast(x)
            # In the kernel's dtype: a float32 bias would promote a bfloat16 (autocast) output.
            out = out if self.bias is None else out + self.bias.to(out.dtype)
        else:
            kernel, out = "reference", self.reference_forward(x)
        self.label(kernel, x)
        return out


def int4_codes(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, zero) as unsigned codes from the stored buffers (zeros None: symmetric)."""
    zero = (torch.full_like(scales, SYMMETRIC_ZERO, dtype=torch.uint8) if zeros is None
            else zeros)
    return unpack_int4(packed), zero


@fused_on_cuda
def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int, dtype: torch.dtype) -> torch.Tensor:
    q, zero = int4_codes(packed, scales, zeros)
    return grid.dequantize(q, scales, zero, group_size, dtype)
