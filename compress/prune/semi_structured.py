"""Materializing a 2:4 mask as torch's semi-structured sparse weight (CUDA sparse tensor cores).

Choosing the mask is compress.prune.masks / sparsegpt; this only converts weights that already
have the 2:4 pattern (saved checkpoints keep dense zeros, which load anywhere). The fast-inference
benchmark calls `materialize_2of4(model)` on CUDA when asked (`compress bench --semi-structured`,
`compress sweep --bench-semi-structured`) and the model is 2:4 (`is_2of4_model`).
"""
from __future__ import annotations

import torch
from torch import nn

from compress.adapters import decoder_linears
from compress.errors import UserError
from compress.prune.masks import is_nm


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


def materialize_2of4(model: nn.Module) -> list[str]:
    """Swap the weight of every 2:4 decoder nn.Linear for its semi-structured form, in place.

    All are checked before any is converted, so a model is never left half converted. Returns
    the converted names; F.linear then dispatches to the sparse kernels.
    """
    linears = [(name, m) for name, m in decoder_linears(model) if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("no float nn.Linear in the decoder layers to make semi-structured")
    for name, linear in linears:
        check_2of4(linear.weight, name)
    converted = [(name, linear, to_semi_structured(linear.weight, name))
                 for name, linear in linears]
    for _, linear, sparse in converted:
        linear.weight = nn.Parameter(sparse, requires_grad=False)
    return [name for name, _, _ in converted]
