"""Materializing a 2:4 mask as torch's semi-structured sparse weight (CUDA sparse tensor cores).

Choosing the mask is compress.prune.masks / sparsegpt; this only converts weights that already
have the 2:4 pattern (saved checkpoints keep dense zeros, which load anywhere). The fast-inference
benchmark calls `materialize_2of4_where_faster(model, rows, timer)` on CUDA when asked (`compress
bench --semi-structured`, `compress sweep --bench-semi-structured`) and the model is 2:4
(`is_2of4_model`): the sparse kernels are taken only at the row counts where they were measured
to beat the dense matmul (an H100 measured them at 0.76x of dense even at 2048 tokens).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.adapters import decoder_linears, set_submodule
from compress.errors import UserError
from compress.prune.masks import is_nm

SPARSE_KERNEL = "semi-structured 2:4 (cuSPARSELt / CUTLASS)"
DENSE_KERNEL = "torch.nn.functional.linear (dense: 2:4 measured slower here)"


def check_2of4(weight: torch.Tensor, name: str = "weight") -> None:
    """Every group of 4 consecutive input columns holds at most 2 non-zeros (any device).

    The conversion itself would silently keep only 2 of them, so a wrong pattern is an error.
    """
    if weight.dim() != 2:
        raise UserError(f"semi-structured sparsity needs a 2-D weight, got {name} of shape "
                        f"{tuple(weight.shape)}")
    if not is_nm(weight != 0, 2, 4, exact=False):
        raise UserError(f"{name} is not 2:4 sparse (some group of 4 input columns keeps more "
                        "than 2 non-zeros); prune it with pattern 2:4 first")


def to_semi_structured(weight: torch.Tensor, name: str = "weight"):
    """A 2:4-pruned float16/bfloat16 CUDA weight [out, in] -> SparseSemiStructuredTensor."""
    check_2of4(weight, name)
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise UserError(f"semi-structured 2:4 needs float16 or bfloat16, got {name} in "
                        f"{weight.dtype}")
    if not weight.is_cuda:
        raise UserError("semi-structured 2:4 weights need a CUDA device; allowed: a CUDA tensor "
                        "(on CPU keep the dense zeros)")
    from torch.sparse import to_sparse_semi_structured

    try:
        return to_sparse_semi_structured(weight.detach())
    except RuntimeError as exc:   # shape limits of the kernels (minimum rows/columns)
        raise UserError(f"{name} of shape {tuple(weight.shape)} cannot be semi-structured: "
                        f"{str(exc).splitlines()[0]}") from exc


def is_2of4_model(model: nn.Module) -> bool:
    """Whether every float nn.Linear of the decoder layers has the 2:4 pattern (and one exists)."""
    linears = [m for _, m in decoder_linears(model) if isinstance(m, nn.Linear)]
    return bool(linears) and all(is_nm(m.weight != 0, 2, 4, exact=False) for m in linears)


def _checked_2of4_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every float nn.Linear of the decoder layers, all checked before any is converted, so that
    a model is never left half converted."""
    linears = [(name, m) for name, m in decoder_linears(model) if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("no float nn.Linear in the decoder layers to make semi-structured")
    for name, linear in linears:
        check_2of4(linear.weight, name)
    return linears


def materialize_2of4(model: nn.Module) -> list[str]:
    """Swap the weight of every 2:4 decoder nn.Linear for its semi-structured form, in place,
    whatever the speed. Returns the converted names; F.linear then dispatches to the sparse
    kernels."""
    converted = [(name, linear, to_semi_structured(linear.weight, name))
                 for name, linear in _checked_2of4_linears(model)]
    for _, linear, sparse in converted:
        linear.weight = nn.Parameter(sparse, requires_grad=False)
    return [name for name, _, _ in converted]


class SemiStructuredLinear(nn.Module):
    """A 2:4 linear that keeps both forms: the semi-structured weight from `min_rows` rows on,
    where it was measured faster, and the dense weight below (decode, typically). Storing both is
    the memory price of taking the sparse kernels only where they win; `unread_weight` names the
    form a forward of so many rows leaves alone (decode rooflines leave it out)."""

    def __init__(self, linear: nn.Linear, sparse: torch.Tensor, min_rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.sparse_weight = nn.Parameter(sparse, requires_grad=False)
        self.min_rows = min_rows
        self.kernel = DENSE_KERNEL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sparse = x.numel() // x.shape[-1] >= self.min_rows
        if not torch.compiler.is_compiling():
            self.kernel = SPARSE_KERNEL if sparse else DENSE_KERNEL
        return F.linear(x, self.sparse_weight if sparse else self.weight, self.bias)

    def unread_weight(self, rows: int) -> torch.Tensor:
        """The form a forward of `rows` rows does not read."""
        return self.weight if rows >= self.min_rows else self.sparse_weight

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, 2:4 from {self.min_rows} rows"


def sparse_wins_from(times: dict[int, tuple[float, float]]) -> int | None:
    """From {rows: (dense seconds, sparse seconds)}: the smallest row count from which sparse
    is faster at it and at every larger one measured; None where it does not win at the largest."""
    start = None
    for rows in sorted(times, reverse=True):
        dense, sparse = times[rows]
        if sparse >= dense:
            break
        start = rows
    return start


def _timed(timer, weight: torch.Tensor, rows: int) -> tuple[float, str | None]:
    try:
        return timer(weight, rows)
    except Exception:  # a row count the sparse kernels refuse (or fail at): they do not win there
        return float("inf"), None


def _compared(dense: tuple[float, str], sparse: tuple[float, str | None]) -> dict:
    """One row count's timings in microseconds. Sparse counts as not winning (None) where it
    failed, or was timed on another clock than dense (CUDA-graph replay against back-to-back
    launches, when capture failed for one of them): those times do not compare."""
    (d, d_clock), (s, s_clock) = dense, sparse
    comparable = s_clock == d_clock
    return {"dense": d * 1e6, "sparse": s * 1e6 if comparable else None,
            "clock": d_clock if comparable or s_clock is None else f"dense: {d_clock}; "
                                                                   f"sparse: {s_clock}"}


def materialize_2of4_where_faster(model: nn.Module, rows: list[int],
                                  timer: Callable[[torch.Tensor, int], tuple[float, str]],
                                  convert: Callable = to_semi_structured) -> dict:
    """Semi-structured weights only where they win, in place. For each shape of linear, the
    first layer's weight is timed dense and sparse at each of `rows` (`timer(weight, rows)` ->
    (seconds per product, the clock that timed it)); every linear of that shape then runs sparse
    at all rows (a plain sparse weight: smaller), from some row count on
    (`SemiStructuredLinear`: both weights), or never (left dense). Returns the measurements and
    the choice per shape and per linear."""
    linears = [(name, linear, f"{linear.out_features}x{linear.in_features}")
               for name, linear in _checked_2of4_linears(model)]
    shapes: dict[str, dict] = {}
    timed: dict[str, torch.Tensor] = {}  # the sparse weight each timed linear will keep
    for name, linear, shape in linears:
        if shape not in shapes:
            sparse = timed[name] = convert(linear.weight, name)
            us = {r: _compared(timer(linear.weight, r), _timed(timer, sparse, r))
                  for r in sorted(set(rows))}
            times = {r: (t["dense"], float("inf") if t["sparse"] is None else t["sparse"])
                     for r, t in us.items()}
            shapes[shape] = {"sparse_from_rows": sparse_wins_from(times), "us": us}
    choices = {}
    for name, linear, shape in linears:
        start = shapes[shape]["sparse_from_rows"]
        if start is None:
            choices[name] = "dense"
            continue
        sparse = timed[name] if name in timed else convert(linear.weight, name)
        if start == min(rows):
            linear.weight = nn.Parameter(sparse, requires_grad=False)
            choices[name] = "sparse"
        else:
            set_submodule(model, name, SemiStructuredLinear(linear, sparse, start))
            choices[name] = f"sparse from {start} rows"
    return {"shapes": shapes, "linears": choices}
