"""What every quantized linear layer shares: its spec (saved in compress.json) and a reference forward."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from compress.formats.compiled import (FUSED_GEMV, fused_gemv, fused_on_cuda, lazily_compiled,
                                       rows_of)
# Kernel names only: the module imports Triton itself lazily, at a kernel's first use.
from compress.formats.triton_kernels import TRITON_GEMM, TRITON_GEMV

# The float dtypes a user may name (--dtype, --calib-dtype, bnb compute_dtype), by name.
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# On the CPU, the most rows (tokens) for which torch's int8 / int4 weight-only kernels beat
# dequantize + matmul, per activation dtype (torch 2.13, SmolLM2 shapes, 2-core machine). Half
# precision: decode rows. float32: one row only. At 8 rows they lose or tie and at 1024 they are
# 30-60x slower, but at 1 row dequantizing the whole weight for one token costs more: float32
# decode at batch 1 of random:smollm2-135m, median ms/token of 31 steps in three interleaved
# rounds, reference then kernel: int4 g64 236-251 -> 141-168, int8 118-133 -> 88-101 (float32
# weights 72-77; reports/smollm2-135m-cpu-bf16-speed/fp32-decode-ab).
CPU_KERNEL_MAX_ROWS = {torch.bfloat16: 64, torch.float16: 64, torch.float32: 1}
# Above this many rows (tokens) CUDA's int4 tinygemm loses to dequantize + cuBLAS: issue 5
# measured its prefill many times slower than bf16.
CUDA_KERNEL_MAX_ROWS = 64


# Kernel layouts a layer builds from its stored buffers when first run (int4 tinygemm packing):
# not in the state dict, rebuilt on the next forward once dropped. Not the Triton plan
# (`_triton`): it is the kernel a user chose, and it reads the buffers at each call.
KERNEL_CACHES = ("_fast", "_fast_key")


def drop_kernel_layouts(module: nn.Module) -> None:
    """Forget `module`'s kernel layouts (after its buffers changed, or to free their memory)."""
    for cached in KERNEL_CACHES:
        if cached in module.__dict__:
            setattr(module, cached, None)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """`x` in the dtype an nn.Linear would compute in: under autocast (a float16 model calibrated
    in bfloat16, say) the autocast dtype. A quantized layer that answered in x's own dtype would
    hand the next op one half dtype beside the other, which autocast cannot reconcile."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device))
    return x


def cpu_kernel_wins(x: torch.Tensor) -> bool:
    """Whether a CPU weight-only kernel is worth running on activations `x`."""
    return x.numel() // x.shape[-1] <= CPU_KERNEL_MAX_ROWS.get(x.dtype, 0)


class QuantizedLinear(nn.Module):
    """Base for Int8Linear, Int4Linear, ...: explicit buffers, `dequantize` and a reference forward.

    Subclasses define `format` (a name), `_register_storage`, `dequantize` and may override
    `forward` with a fast kernel; `kernel` names what the last eager forward ran, and
    `compiled_kernel` what a compiled forward of the same rows runs (where that differs).
    """

    format = "base"
    fused_gemv_rows = 0  # rows that a compiled CUDA forward runs through `fused_gemv`
    kernel_choices = ("auto",)  # what set_kernel accepts
    triton_gemm_min_rows = 2  # with 'triton': rows from here on take its GEMM (one row its GEMV)
    _triton = None  # the Triton kernels' launch plans, once chosen
    # Floating buffers whose dtype is part of the format (FP8 codes, float32 scales): a cast of
    # the model (`.to(bfloat16)`, a checkpoint reloaded in another dtype) moves them but keeps
    # their dtype; `nn.Module.to(dtype)` would convert every floating buffer, float8 included.
    fixed_dtype_buffers: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 symmetric: bool, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self._register_storage(dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) \
            if bias else None
        self.kernel = "reference"
        self.compiled_kernel: str | None = None

    def _register_storage(self, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        # A move or cast invalidates the kernel layouts: rebuilt on the next forward.
        drop_kernel_layouts(self)
        order = list(self._buffers)
        fixed = {name: self._buffers.pop(name) for name in self.fixed_dtype_buffers
                 if self._buffers.get(name) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in fixed.items():
                # Where `fn` sends tensors, from an empty probe: only the device is taken.
                self._buffers[name] = tensor.to(fn(tensor.new_empty(0)).device)
            self._buffers = OrderedDict((name, self._buffers[name]) for name in order)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        # New buffer contents make the kernel layouts built from the old ones stale.
        drop_kernel_layouts(self)
        super()._load_from_state_dict(*args, **kwargs)

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
        x = autocast_input(x)
        self.kernel = "reference"
        return self.reference_forward(x)

    def set_kernel(self, name: str) -> None:
        """'auto' (the kernels measurements chose) or, where the format has them, 'triton'
        (compress/formats/triton_kernels.py: a GEMV for one row, a dequantizing GEMM for
        `triton_gemm_min_rows` rows or more; slower than 'auto' on an H100, see there) or
        'fused-gemv' (`fused_gemv` for one row inside a compiled CUDA step, where 'auto' runs
        another kernel)."""
        from compress.errors import UserError, choices

        if name not in self.kernel_choices:
            raise UserError(f"{self.format} layers have no kernel {name!r} "
                            f"({choices(self.kernel_choices)})")
        self._triton = None
        self.__dict__.pop("fused_gemv_rows", None)  # back to the class's measured choice
        if name == "fused-gemv":
            self.fused_gemv_rows = 1
        if name == "triton":
            from compress.formats import triton_kernels

            reason = triton_kernels.available(self.qweight.device)
            if reason:
                raise UserError(f"kernel 'triton' unavailable: {reason}")
            try:
                self._triton = triton_kernels.plan(
                    self.out_features, self.in_features, self.bits, self.group_size,
                    self.qweight.device, gemm_min_rows=self.triton_gemm_min_rows,
                    dtype=self.scales.dtype, has_zeros=self.zeros is not None, tune=True)
            except ValueError as exc:
                raise UserError(f"kernel 'triton' unavailable: {exc}") from None

    def chosen_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output of the Triton kernels where they were chosen and take these rows, else of
        `fused_gemv` where a compiled forward runs it; None leaves `x` to the format's own path."""
        out = self.triton_forward(x)
        return out if out is not None else self.compiled_gemv(x)

    def compiled_gemv(self, x: torch.Tensor) -> torch.Tensor | None:
        """`fused_gemv`'s output when this forward is being compiled and `x` fits it, else None."""
        if torch.compiler.is_compiling() and self.fused_gemv_fits(x):
            return fused_gemv(x, self.dequantize(torch.float32), self.bias)
        return None

    def triton_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The Triton kernels' output when they were chosen and take these rows, else None."""
        if self._triton is None:
            return None
        out = self._triton(x, self.qweight, self.scales, self.zeros)
        if out is None:
            return None
        kernel = TRITON_GEMV if rows_of(x) == 1 else TRITON_GEMM
        self.label(kernel, x, compiled=kernel)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def label(self, eager: str, x: torch.Tensor, compiled: str | None = None) -> None:
        """Record the kernel an eager forward ran on `x`, and the one a compiled forward of the
        same rows runs (a compiled step cannot update these labels itself)."""
        if not torch.compiler.is_compiling():
            self.kernel = eager
            fused = self.fused_gemv_fits(x)
            self.compiled_kernel = compiled or (FUSED_GEMV if fused else eager)

    def fused_gemv_fits(self, x: torch.Tensor) -> bool:
        """Whether a compiled forward of `x` runs `fused_gemv`: on CUDA, few enough rows."""
        return x.is_cuda and rows_of(x) <= self.fused_gemv_rows

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


class RowScaledLinear(QuantizedLinear):
    """W8A8 layers: weights with one float32 scale per output channel, activations quantized at
    run time with one scale per token; only the code type and the kernel differ (int8, FP8).

    Subclasses set `code_dtype`, `fast_kernel` and `description`, and define `quantize_rows`
    (2-D float -> codes, float32 scales [rows, 1]), `fast_fits(device, rows)` and `fast_forward`.
    """

    code_dtype = torch.int8
    fast_kernel = "none"
    description = ""
    fixed_dtype_buffers = ("qweight", "scales")
    kernel_choices = ("auto", "inductor")
    whole_graph = False  # set_kernel("inductor"): the fast forward of prefill rows as one graph

    @staticmethod
    def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def fast_fits(self, device: torch.device, rows: int) -> bool:
        raise NotImplementedError

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _register_storage(self, dtype: torch.dtype) -> None:
        self.register_buffer("qweight", torch.zeros(self.out_features, self.in_features,
                                                    dtype=self.code_dtype))
        # float32 whatever the model dtype: the scale multiplies an exact (or fp32) accumulation.
        self.register_buffer("scales", torch.zeros(self.out_features, 1, dtype=torch.float32))

    @classmethod
    def from_float(cls, linear: nn.Module, weight: torch.Tensor | None = None) -> "RowScaledLinear":
        """Quantize `weight` (default: the linear's own) per output channel."""
        w = linear.weight.data if weight is None else weight
        dtype = linear.weight.dtype
        layer = cls(linear.in_features, linear.out_features, 8, 0, True,
                    linear.bias is not None, dtype)
        q, scale = cls.quantize_rows(w)
        layer.qweight.copy_(q)
        layer.scales.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data.to(dtype))
        return layer.to(w.device)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.qweight.float() * self.scales).to(dtype or torch.float32)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Round-tripped activations times the dequantized weight, in float32."""
        q, scale = self.quantize_rows(x.reshape(-1, self.in_features))
        out = F.linear(q.float() * scale, self.dequantize(torch.float32))
        return self._finish(out, x)

    def set_kernel(self, name: str) -> None:
        """'auto', or 'inductor': from WHOLE_GRAPH_MIN_ROWS rows on (prefill), the activations'
        quantization, the GEMM and the rescale run as one inductor graph per weight shape
        (`fast_forward_in_one_graph`), outside a compiled region too. For int8, inductor then
        times cuBLAS against its own Triton GEMM templates and keeps the faster (torch 2.11
        offers the templates for int8 without max-autotune), and a Triton winner can take the
        rescale as its epilogue. Eagerly, `_int_mm` ran an Ampere CUTLASS kernel on the H100,
        1.15x bf16 at 2048 rows (reports/h100-llama3-8b). Not the default until a GPU measures
        it (evaluate/kernel_bench.py times both). The first call of each shape compiles, inside
        a benchmark's warm-up."""
        super().set_kernel(name)
        self.whole_graph = name == "inductor"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        rows = x.numel() // self.in_features
        if self.fast_fits(x.device, rows):
            if self.whole_graph and rows >= WHOLE_GRAPH_MIN_ROWS and \
                    not torch.compiler.is_compiling():
                self.kernel = f"{self.fast_kernel} {WHOLE_GRAPH}"
                flat = fast_forward_in_one_graph(x.reshape(-1, self.in_features), self)
                return flat.reshape(*x.shape[:-1], self.out_features)
            self.kernel = self.fast_kernel
            return self.fast_forward(x)
        self.kernel = "reference"
        return self.reference_forward(x)

    def _finish(self, out: torch.Tensor, x: torch.Tensor, row_scale: torch.Tensor | None = None,
                col_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Scales and bias in float32, then back to the activations' dtype and shape."""
        if out.dtype != x.dtype or row_scale is not None or col_scale is not None or \
                self.bias is not None:
            out = rescale_output(out, row_scale, col_scale, self.bias, x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.description}"


@fused_on_cuda(dynamic_rows=True)  # [tokens, out]: rows vary with the prompt
def rescale_output(acc: torch.Tensor, row_scale: torch.Tensor | None,
                   col_scale: torch.Tensor | None, bias: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """A W8A8 GEMM's epilogue: acc [rows, out] (int32 or float) times the per-row (activation)
    and per-column (weight) scales, plus bias, in float32, cast to `dtype`. One kernel on CUDA
    instead of four full passes over [rows, out] in float32: for a 2048-token prefill of the
    Llama-3-8B shape, 17 GB moved instead of about 85 GB."""
    out = acc.float()
    if row_scale is not None:
        out = out * row_scale
    if col_scale is not None:
        out = out * col_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


# RowScaledLinear's 'inductor' kernel: for this many rows or more (prefill; decode rows run inside
# the engine's compiled step, which traces the same code), and what its label adds. The same 17
# as w8a8.CUDA_MIN_ROWS on purpose: below it W8A8's product takes its zero-padded branch, which
# would be a second graph per weight shape and overrun dynamo's limit of 8.
WHOLE_GRAPH_MIN_ROWS = 17
WHOLE_GRAPH = "in one inductor graph (GEMM timed against Triton's, rescale fused)"


def _fast_forward(x: torch.Tensor, layer: RowScaledLinear) -> torch.Tensor:
    return layer.fast_forward(x)


# One graph per weight shape (the layer's buffers are its inputs, so the layers of one shape
# share it), rows symbolic: a Llama model has four weight shapes, within dynamo's limit of 8.
fast_forward_in_one_graph = lazily_compiled(_fast_forward, dynamic_rows=True)
