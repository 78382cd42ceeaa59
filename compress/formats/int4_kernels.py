"""Fast int4 matmuls built from Int4Linear's stored buffers; the stored format does not change.

Stored: w = (q - zero) * scale with q, zero unsigned 4-bit codes. PyTorch's tinygemm kernels
(`torch._weight_int4pack_mm` on CUDA, `torch._weight_int4pack_mm_for_cpu` on CPU) compute
w = (q - 8) * scale + offset with a float offset per group, so offset = (8 - zero) * scale:
an exact re-parametrization (up to the rounding of the offset to the activation dtype).
Layouts (checked against torch/_meta_registrations.py and torch/testing/_internal/
common_quantization.py of torch 2.13):
- CUDA: `_convert_weight_to_int4pack(uint8 [N, K/2], inner_k_tiles)` with column 2j in the HIGH
  nibble (ours keeps it in the low one), N % 8 == 0, K % (16 * inner_k_tiles) == 0; bf16
  activations on sm80+.
- CPU: `_convert_weight_to_int4pack_for_cpu(int32 [N, K] codes, 1)` with N % 16 == 0; used
  only for the few rows where it beats dequantize + matmul (`CPU_KERNEL_MAX_ROWS`).
- Both: group size 32, 64, 128 or 256; scales_and_zeros [groups, N, 2] in the activation dtype.
Anything else returns None and the layer keeps its reference forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats.base import CPU_KERNEL_MAX_ROWS, CUDA_KERNEL_MAX_ROWS

GROUPS = (32, 64, 128, 256)


@dataclass
class Int4Fast:
    kernel: str                  # the name `Int4Linear.kernel` reports
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int
    out_features: int
    dtype: torch.dtype
    device: torch.device
    max_rows: int | None         # None: use the kernel at every size

    def accepts(self, x: torch.Tensor) -> bool:
        rows_ok = self.max_rows is None or x.numel() // x.shape[-1] <= self.max_rows
        return x.dtype == self.dtype and x.device == self.device and rows_ok

    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous: the kernels reject strided rows, such as the last position of each prompt
        # that a batched prefill (`logits_to_keep=1`) hands to a quantized lm_head.
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        if self.device.type == "cuda":
            out = torch._weight_int4pack_mm(flat, self.packed, self.group_size,
                                            self.scales_and_zeros)
        else:
            out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                    self.scales_and_zeros)
        return out.reshape(*x.shape[:-1], self.out_features)


def unsupported(out_features: int, in_features: int, group_size: int, dtype: torch.dtype,
                device: torch.device) -> str | None:
    """Why no fast kernel fits this shape / dtype / device, or None when one does."""
    if group_size not in GROUPS:
        return f"group size {group_size} (kernels take {GROUPS})"
    if device.type == "cuda":
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
            return "this torch has no _weight_int4pack_mm"
        if dtype != torch.bfloat16:
            return f"CUDA tinygemm needs bfloat16 activations, got {dtype}"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "CUDA tinygemm needs compute capability 8.0+"
        if out_features % 8:
            return f"output width {out_features} not a multiple of 8"
        if _inner_k_tiles(in_features) is None:
            return f"input width {in_features} not a multiple of 32"
        return None
    if device.type == "cpu":
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "this torch has no _weight_int4pack_mm_for_cpu"
        if dtype not in CPU_KERNEL_MAX_ROWS:
            return f"no CPU kernel for {dtype} activations"
        if out_features % 16:
            return f"output width {out_features} not a multiple of 16"
        return None
    return f"no int4 kernel for device {device.type}"


def build(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group_size: int,
          dtype: torch.dtype) -> Int4Fast | None:
    """The kernel layout of codes q [N, K] (uint8 in [0, 15]) with zero, scale [N, groups]."""
    device = q.device
    out_features, in_features = q.shape
    if unsupported(out_features, in_features, group_size, dtype, device):
        return None
    offset = (8.0 - zero.float()) * scale.float()
    scales_and_zeros = torch.stack((scale.float(), offset), dim=-1).transpose(0, 1)
    scales_and_zeros = scales_and_zeros.contiguous().to(dtype)
    if device.type == "cuda":
        q = q.to(torch.uint8)
        high_first = (q[:, 0::2] << 4) | q[:, 1::2]
        tiles = _inner_k_tiles(in_features)
        packed = torch._convert_weight_to_int4pack(high_first.contiguous(), tiles)
        kernel, max_rows = "torch._weight_int4pack_mm", CUDA_KERNEL_MAX_ROWS
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        kernel, max_rows = "torch._weight_int4pack_mm_for_cpu", CPU_KERNEL_MAX_ROWS[dtype]
    return Int4Fast(kernel, packed, scales_and_zeros, group_size, out_features, dtype, device,
                    max_rows)


def _inner_k_tiles(in_features: int) -> int | None:
    # Larger tiles read the weight in wider chunks; the kernel takes 2, 4 or 8.
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    return None
