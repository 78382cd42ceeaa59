"""SparseGPT (Frantar & Alistarh 2023) as pure functions: prune one weight matrix given the
Hessian of its layer-wise reconstruction loss, H = 2/n * sum X^T X over calibration tokens.

Columns are processed in blocks. Inside a block the mask is chosen adaptively from the weights
already updated by earlier columns (score w^2 / [H^-1]_jj^2, the OBS saliency), and each pruned
column's error is spread over the remaining columns of the block (rank-1 updates over all rows at
once); the block's accumulated error then updates every later column in one matmul. Rows are
independent given H, so matrices that share an input (q/k/v, gate/up) can be stacked and pruned
in one call; `row_groups` keeps their unstructured masks chosen per matrix.
"""
from __future__ import annotations

import torch

from compress.calibration import one_cpu_thread
from compress.errors import UserError
from compress.prune.masks import check_sparsity, prune_count


def accumulate_hessian(h: torch.Tensor | None, count: int, x: torch.Tensor
                       ) -> tuple[torch.Tensor, int]:
    """Running mean of 2 X^T X over tokens: returns (H, tokens seen). `x` is [tokens, in]."""
    x = x.reshape(-1, x.shape[-1]).float()
    tokens = x.shape[0]
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    h.mul_(count / (count + tokens))
    x = x * (2.0 / (count + tokens)) ** 0.5
    h.addmm_(x.t(), x)
    return h, count + tokens


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, and the mask of dead inputs.

    Inputs that never fire (zero diagonal) get a unit diagonal so H stays invertible; their
    weights carry no signal and are pruned first.
    """
    h = h.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    try:
        chol = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(chol)
        return torch.linalg.cholesky(hinv, upper=True), dead
    except torch.linalg.LinAlgError as exc:
        raise UserError(f"SparseGPT Hessian is not positive definite with damp={damp}; "
                        "raise damp (e.g. 0.1) or use more calibration samples") from exc


def _block_counts(sparsity: float, rows: int, cols: int, blocksize: int) -> list[int]:
    """Weights to prune per (row group, column block): cumulative rounding so the total over the
    matrix is exactly round(sparsity * rows * cols)."""
    counts, done = [], 0
    for end in range(blocksize, cols + blocksize, blocksize):
        target = prune_count(rows * min(end, cols), sparsity)
        counts.append(target - done)
        done = target
    return counts


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, h: torch.Tensor, sparsity: float = 0.5,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, damp: float = 0.01,
                    row_groups: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` [rows, cols] with reconstruction; returns (new weight, keep mask).

    Unstructured: each row group prunes exactly round(sparsity * its size) weights, chosen block
    by block. N:M (nm=(n, m)): every m consecutive columns of every row keep exactly n.
    """
    rows, cols = weight.shape
    if h.shape != (cols, cols):
        raise UserError(f"Hessian of shape {tuple(h.shape)} does not match {cols} input columns")
    row_groups = row_groups or [rows]
    if sum(row_groups) != rows:
        raise UserError(f"row groups {row_groups} do not add up to {rows} rows")
    if nm is not None:
        n, m = nm
        if cols % m or blocksize % m:
            raise UserError(f"N:M {n}:{m} needs input width ({cols}) and blocksize ({blocksize}) "
                            f"divisible by {m}")
    else:
        check_sparsity(sparsity)
    if blocksize < 1:
        raise UserError(f"blocksize must be positive, got {blocksize}")
    w = weight.detach().clone().float()
    hinv, dead = inverse_hessian_cholesky(h.to(w.device), damp)
    w[:, dead] = 0
    bounds = torch.tensor([0] + row_groups).cumsum(0).tolist()
    counts = [_block_counts(sparsity, g, cols, blocksize) for g in row_groups]
    with one_cpu_thread(w.device):
        keep = _prune_columns(w, hinv, nm, blocksize, bounds, counts)
    w[~keep] = 0
    return w.to(weight.dtype), keep


def _prune_columns(w: torch.Tensor, hinv: torch.Tensor, nm, blocksize: int, bounds: list[int],
                   counts: list[list[int]]) -> torch.Tensor:
    """The blocked OBS sweep over the columns of `w` (updated in place); returns the keep mask.
    `bounds` delimit the row groups, `counts[g][b]` is what group g prunes in column block b."""
    cols = w.shape[1]
    keep = torch.ones_like(w, dtype=torch.bool)
    for block, start in enumerate(range(0, cols, blocksize)):
        end = min(start + blocksize, cols)
        w1 = w[:, start:end].clone()
        hinv1 = hinv[start:end, start:end]
        diag = torch.diag(hinv1)
        err1 = torch.zeros_like(w1)
        keep1 = torch.ones_like(w1, dtype=torch.bool)
        if nm is None:
            saliency = w1 ** 2 / diag[None, :] ** 2
            for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                k = counts[g][block]
                if k:
                    flat = keep1[lo:hi].reshape(-1)
                    flat[saliency[lo:hi].reshape(-1).topk(k, largest=False).indices] = False
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                # N:M groups are chosen when the update reaches them, from the updated weights.
                sal = w1[:, i:i + nm[1]] ** 2 / diag[None, i:i + nm[1]] ** 2
                drop = sal.topk(nm[1] - nm[0], dim=1, largest=False).indices
                keep1[:, i:i + nm[1]].scatter_(1, drop, False)
            col = w1[:, i]
            err = torch.where(keep1[:, i], 0.0, col) / hinv1[i, i]
            # OBS update: removing w_i moves the other weights along row i of H^-1.
            w1[:, i:].sub_(err[:, None] * hinv1[i, i:][None, :])
            w1[:, i] = torch.where(keep1[:, i], w1[:, i], 0.0)
            err1[:, i] = err
        w[:, start:end] = w1
        keep[:, start:end] = keep1
        w[:, end:].sub_(err1 @ hinv[start:end, end:])
    return keep


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, h: torch.Tensor) -> float:
    """Mean over tokens of ||X W^T - X W'^T||^2 (SparseGPT's loss), from H = 2/n X^T X."""
    delta = (weight - new_weight).detach().float()
    return float(0.5 * torch.einsum("ij,jk,ik->", delta, h.float(), delta))
