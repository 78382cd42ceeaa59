"""Int8 weight-only linear layer: int8 codes, per-group scales, optional zero points.

Storage: `qweight` int8 [out, in] holding (q - 128); `scales` [out, groups] in the model dtype;
`zeros` [out, groups] (asymmetric only) holding (zero - 128). Kernels:
- CUDA, one row inside a compiled step: `fused_gemv` (the codes are read once, dequantized in
  registers): 6.7 ms/token for the Llama-3-8B shape on an H200, bf16 5.8. Not
  `torch._weight_int8pack_mm`: it took 56 ms there (torch 2.11).
- CPU: `torch._weight_int8pack_mm` for symmetric per-channel layers where it wins
  (`cpu_kernel_wins`).
- Otherwise the reference: dequantize (one fused kernel on CUDA), then matmul.
"""
from __future__ import annotations

import torch

from compress.formats import grid
from compress.formats.base import QuantizedLinear, autocast_input, cpu_kernel_wins
from compress.formats.compiled import fused_on_cuda

OFFSET = 128


class Int8Linear(QuantizedLinear):
    format = "int8"
    fused_gemv_rows = 1
    kernel_choices = ("auto", "triton")

    def _register_storage(self, dtype: torch.dtype) -> None:
        groups = grid.group_count(self.in_features, self.group_size)
        self.register_buffer("qweight", torch.zeros(self.out_features, self.in_features,
                                                    dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(self.out_features, groups, dtype=dtype))
        self.register_buffer("zeros", None if self.symmetric else
                             torch.zeros(self.out_features, groups, dtype=torch.int8))

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   symmetric: bool, bias: torch.Tensor | None, dtype: torch.dtype) -> "Int8Linear":
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, 8, group_size, symmetric, bias is not None, dtype)
        layer.qweight.copy_((q.to(torch.int16) - OFFSET).to(torch.int8))
        layer.scales.copy_(scale.to(dtype))
        if not symmetric:
            layer.zeros.copy_((zero.to(torch.int16) - OFFSET).to(torch.int8))
        if bias is not None:
            layer.bias.data.copy_(bias.to(dtype))
        return layer.to(q.device)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, zero) as unsigned codes, the inverse of `from_codes`."""
        return int8_codes(self.qweight, self.scales, self.zeros)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales, self.zeros, self.group_size,
                               dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        out = self.chosen_forward(x)
        if out is not None:
            return out
        if self.symmetric and self.group_size == 0 and x.dtype == self.scales.dtype and \
                x.device.type == "cpu" and cpu_kernel_wins(x):
            self.label("torch._weight_int8pack_mm", x)
            flat = x.reshape(-1, self.in_features).contiguous()  # the kernel needs unit stride
            out = torch._weight_int8pack_mm(flat, self.qweight, self.scales[:, 0])
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        self.label("reference", x)
        return self.reference_forward(x)


def int8_codes(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, zero) as unsigned codes from the stored buffers (zeros None: symmetric)."""
    q = qweight.to(torch.int16) + OFFSET
    zero = (torch.full_like(scales, OFFSET, dtype=torch.int16) if zeros is None
            else zeros.to(torch.int16) + OFFSET)
    return q, zero


@fused_on_cuda
def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int, dtype: torch.dtype) -> torch.Tensor:
    q, zero = int8_codes(qweight, scales, zeros)
    return grid.dequantize(q, scales, zero, group_size, dtype)
