"""Materializing a 2:4 mask as torch's semi-structured sparse weight (CUDA sparse tensor cores).

Choosing the mask is compress.prune.masks / sparsegpt; this only converts a weight that already
has the 2:4 pattern. The fast-inference engine swaps such weights into its linears.
"""
from __future__ import annotations

import torch

from compress.errors import UserError
from compress.prune.masks import is_nm


def to_semi_structured(weight: torch.Tensor):
    """A 2:4-pruned float16/bfloat16 CUDA weight [out, in] -> SparseSemiStructuredTensor.

    Every group of 4 consecutive input columns must hold at most 2 non-zeros; the conversion
    itself would silently keep only 2 of them, so a wrong pattern is an error here.
    """
    if weight.dim() != 2:
        raise UserError(f"semi-structured sparsity needs a 2-D weight, got shape "
                        f"{tuple(weight.shape)}")
    if not weight.is_cuda:
        raise UserError("semi-structured 2:4 weights need a CUDA device; allowed: a CUDA tensor "
                        "(on CPU keep the dense zeros)")
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise UserError(f"semi-structured 2:4 needs float16 or bfloat16, got {weight.dtype}")
    if not is_nm(weight != 0, 2, 4, exact=False):
        raise UserError("weight is not 2:4 sparse (some group of 4 input columns keeps more than "
                        "2 non-zeros); prune it with pattern 2:4 first")
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight)
