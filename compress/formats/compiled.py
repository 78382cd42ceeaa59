"""Compiling the element-wise chains around quantized kernels (dequantizing a weight, quantizing
activations, a GEMM's epilogue) with inductor: per shape, lazily, on CUDA only."""
from __future__ import annotations

import functools

import torch

# Inside a compiled decode step on CUDA, a layer class with `fused_gemv_rows` > 0 runs that many
# rows or fewer as one inductor reduction that reads the stored codes and dequantizes them in
# registers (`fused_gemv`). Measured on an H200, Llama-3-8B shape, batch-1 decode, compiled with
# CUDA graphs (reports/h200-llama3-8b): int8 6.74 ms/token with it against 56.4 with
# _weight_int8pack_mm (bf16: 5.78), so Int8Linear uses it for one row; int4 14.5 ms with it
# against 3.79 with tinygemm, so Int4Linear does not (but that int4 figure predates the fix in
# `unpack_int4`, see there). With more rows each row re-reads the codes.
FUSED_GEMV = "inductor fused dequantize-GEMV (compiled)"


def fused_on_cuda(fn=None, *, dynamic_rows: bool = False):
    """`fn` compiled by inductor on its first eager call on CUDA: a chain of element-wise ops
    (dequantizing a weight, quantizing activations) becomes one kernel instead of several full
    passes over memory. Inside a compiled region (the outer compile fuses it anyway) and on the
    CPU it is `fn` itself. The first argument must be a tensor; compiled lazily, not on import.

    Every size is a constant of the kernel (`compile_for_shapes`), except with `dynamic_rows` the
    first argument's rows (tokens: one kernel serves every prompt length)."""
    def wrap(fn):
        compiled = lazily_compiled(fn, dynamic_rows)

        @functools.wraps(fn)
        def call(*args):
            if not args[0].is_cuda or torch.compiler.is_compiling():
                return fn(*args)
            return compiled(*args)

        return call

    return wrap if fn is None else wrap(fn)


def lazily_compiled(fn, dynamic_rows: bool = False):
    """`compile_for_shapes(fn, dynamic_rows)`, built at the first call rather than on import."""
    compiled = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = compile_for_shapes(fn, dynamic_rows)
        return compiled(*args)

    return call


def compile_for_shapes(fn, dynamic_rows: bool, backend="inductor"):
    """torch.compile(fn) specialised to each shape it meets (a weight's, or an activation's
    columns), with the first argument's first dimension symbolic where `dynamic_rows`.

    torch.compile's default turns a dimension symbolic once it has seen two sizes of it and tries
    its newest kernel first, so from a model's third weight shape on every weight ran one kernel
    whose index arithmetic divides by runtime sizes. In the H100 profile of a 2048-token prefill
    of the Llama-3-8B shape, the int4 dequantization took 53.7 ms, 9x what its 17.5 GB of traffic
    needs at the measured copy bandwidth (reports/h100-llama3-8b; the likely cause, not measured
    again since). A model has a handful of weight shapes, within dynamo's recompile limit (8 per
    function; past it, `fn` runs eagerly).
    """
    compiled = torch.compile(fn, dynamic=False, backend=backend)
    if not dynamic_rows:
        return compiled

    def call(first, *rest):
        rows = first.shape[0]
        for arg in (first, *rest):   # and the per-row tensors beside it, e.g. scales [rows, 1]
            if isinstance(arg, torch.Tensor) and arg.dim() == first.dim() and \
                    arg.shape[0] == rows:
                torch._dynamo.maybe_mark_dynamic(arg, 0)   # 0 / 1 rows stay specialised
        return compiled(first, *rest)

    return call


def rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T as a multiply-and-sum in float32. Meant for a compiled region only, where
    inductor fuses the dequantization that produced `weight` into the reduction (eagerly it
    would materialize [rows, out, in])."""
    flat = x.reshape(-1, x.shape[-1]).float()
    out = (flat[:, None, :] * weight.float()[None]).sum(-1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
