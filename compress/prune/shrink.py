"""Structured pruning math and tensor surgery, as pure functions.

Scores measure what a unit adds to the residual stream on calibration data; compensation
re-fits the consuming matrix (down_proj, o_proj) so the kept units also carry what the removed
ones did, in the least-squares sense. All take H = mean of X^T X (any positive scale) of the
consuming matrix's input.
"""
from __future__ import annotations

import torch
from torch import nn

from compress.errors import UserError


def column_energy(weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per input column j: mean ||X_j W[:, j]||^2 = H_jj * ||W[:, j]||^2 (one channel alone)."""
    return torch.diag(h).float() * weight.float().pow(2).sum(0)


def head_energy(weight: torch.Tensor, h: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per head: mean ||X_h W_h^T||^2 = trace(W_h H_hh W_h^T) over the head's input columns."""
    out, cols = weight.shape
    if cols % head_dim:
        raise UserError(f"o_proj input width {cols} is not a multiple of head_dim {head_dim}")
    heads = cols // head_dim
    w = weight.float().reshape(out, heads, head_dim)
    blocks = h.float().reshape(heads, head_dim, heads, head_dim).diagonal(dim1=0, dim2=2)
    blocks = blocks.permute(2, 0, 1)                       # [heads, head_dim, head_dim]
    return torch.einsum("ohd,hde,ohe->h", w, blocks, w)


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the `count` lowest scores (ties: the lower index goes first)."""
    if not 0 <= count <= scores.numel():
        raise UserError(f"cannot remove {count} of {scores.numel()} units")
    order = torch.sort(scores, stable=True).indices[:count]
    return order.sort().values


def keep_indices(total: int, removed: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(total, dtype=torch.bool)
    keep[removed.cpu()] = False
    return keep.nonzero().flatten()


def compensate(weight: torch.Tensor, h: torch.Tensor, keep: torch.Tensor,
               damp: float = 0.01) -> torch.Tensor:
    """New weight [out, len(keep)] of the kept input columns that best replaces the full layer.

    Solves min ||X_K D^T - X_R W_R^T||^2 + lambda ||D||^2 for the correction D of the kept
    columns (ridge regression on the removed columns' contribution): W'_K = W_K + W_R H_RK
    (H_KK + lambda I)^-1. When the removed columns never fire or are zero, D is exactly 0.
    """
    cols = weight.shape[1]
    keep = keep.to(weight.device)
    mask = torch.zeros(cols, dtype=torch.bool, device=weight.device)
    mask[keep] = True
    removed = (~mask).nonzero().flatten()
    w = weight.float()
    h = h.float().to(weight.device)
    h_kk = h[keep][:, keep]
    lam = damp * torch.diag(h_kk).mean().clamp_min(1e-12)
    rhs = w[:, removed] @ h[removed][:, keep]              # [out, kept]
    chol, info = torch.linalg.cholesky_ex(h_kk + lam * torch.eye(len(keep), device=h.device))
    if int(info):
        raise UserError(f"structured compensation: H is not positive definite with damp={damp}; "
                        "raise damp")
    correction = torch.cholesky_solve(rhs.t(), chol).t()
    return (w[:, keep] + correction).to(weight.dtype)


def slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear with the given output rows / input columns (or an explicit new weight)."""
    w = linear.weight.data if weight is None else weight
    if weight is None and rows is not None:
        w = w[rows.to(w.device)]
    if weight is None and cols is not None:
        w = w[:, cols.to(w.device)]
    bias = linear.bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if bias is not None:
        new.bias.data.copy_(bias.data if rows is None else bias.data[rows.to(bias.device)])
    return new


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row/column indices covered by the given heads, in order."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of 1 - cos(h_in, h_out), and the token count (ShortGPT's influence)."""
    a = x_in.reshape(-1, x_in.shape[-1]).float()
    b = x_out.reshape(-1, x_out.shape[-1]).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float((1 - cos).sum()), a.shape[0]


def global_keep_counts(scores: list[torch.Tensor], ratio: float, min_keep: int) -> list[int]:
    """Per-layer kept units when the lowest `ratio` of all units (all layers together) goes,
    keeping at least `min_keep` units in every layer."""
    flat = torch.cat([s.flatten().float() for s in scores])
    remove = int(round(ratio * flat.numel()))
    order = torch.sort(flat, stable=True).indices
    layer_of = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    removed = torch.zeros(len(scores), dtype=torch.long)
    for idx in order.tolist():
        if remove == 0:
            break
        layer = int(layer_of[idx])
        if scores[layer].numel() - removed[layer] > min_keep:
            removed[layer] += 1
            remove -= 1
    if remove:
        most = sum(max(s.numel() - min_keep, 0) for s in scores) / flat.numel()
        raise UserError(f"ratio {ratio} would leave a layer fewer than {min_keep} units; with "
                        f"scope global the ratio can be at most {most:.4f} here")
    return [s.numel() - int(r) for s, r in zip(scores, removed)]
