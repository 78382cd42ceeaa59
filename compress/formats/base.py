"""What every quantized linear layer shares: its spec (saved in compress.json) and a reference forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# On the CPU, torch's int8 / int4 weight-only kernels beat dequantize + matmul only for
# half-precision activations and few rows (decode); with float32 activations they are 30-60x
# slower at 1024 rows, and slower at 1 row too (torch 2.13, SmolLM2 shapes, 2-core machine).
CPU_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
CPU_KERNEL_MAX_ROWS = 64


def cpu_kernel_wins(x: torch.Tensor) -> bool:
    """Whether a CPU weight-only kernel is worth running on activations `x`."""
    return x.dtype in CPU_KERNEL_DTYPES and x.numel() // x.shape[-1] <= CPU_KERNEL_MAX_ROWS


class QuantizedLinear(nn.Module):
    """Base for Int8Linear, Int4Linear, ...: explicit buffers, `dequantize` and a reference forward.

    Subclasses define `format` (a name), `_register_storage`, `dequantize` and may override
    `forward` with a fast kernel; `kernel` names what the last forward ran.
    """

    format = "base"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 symmetric: bool, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self._register_storage(dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) \
            if bias else None
        self.kernel = "reference"

    def _register_storage(self, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def spec(self) -> dict:
        return {"format": self.format, "in_features": self.in_features,
                "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric,
                "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> "QuantizedLinear":
        return cls(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                   spec["symmetric"], spec["bias"], dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kernel = "reference"
        return self.reference_forward(x)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")
