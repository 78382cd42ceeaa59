"""Choosing what to prune, as pure functions on tensors: scores, masks and per-layer profiles.

A mask here is a `keep` tensor: True where a weight survives. Choosing a mask never touches a
model; materializing it (dense zeros, semi-structured 2:4, shrinking tensors) is done elsewhere.
Counts are exact: a ratio s over n weights prunes round(s * n) of them, never "about" that.
"""
from __future__ import annotations

import re

import torch

from compress.errors import UserError

UNSTRUCTURED = "unstructured"
PATTERN_HELP = "unstructured or N:M with 0 < N < M (e.g. 2:4, 4:8)"
SCOPES = ("row", "layer", "row-mass")
MASS_TOLERANCE = 1e-3   # row-mass: the matrix's sparsity may differ from the target by this
PROFILES = ("uniform", "owl")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for unstructured, (n, m) for an N:M pattern ('2:4' keeps 2 of every 4)."""
    if pattern == UNSTRUCTURED:
        return None
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise UserError(f"pattern must be {PATTERN_HELP}; got {pattern!r}")
    return int(match[1]), int(match[2])


def check_sparsity(sparsity: float, where: str = "sparsity") -> None:
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"{where} must be in [0, 1), got {sparsity}")


# ----- scores: larger means more important ------------------------------------------------------

def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2: `input_sq_norms[j]` is the sum over calibration tokens of X_j^2.

    Weighting by the input norm is what makes Wanda keep weights that see large activations
    (the outlier features of LLMs) even when the weights themselves are small.
    """
    if input_sq_norms.shape != (weight.shape[1],):
        raise UserError(f"input norms of shape {tuple(input_sq_norms.shape)} do not match a weight "
                        f"with {weight.shape[1]} input columns")
    return weight.detach().abs().float() * input_sq_norms.float().clamp_min(0).sqrt()[None, :]


# ----- masks ------------------------------------------------------------------------------------

def prune_count(numel: int, sparsity: float) -> int:
    return int(round(sparsity * numel))


def unstructured_mask(scores: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Keep-mask pruning exactly round(sparsity * numel) lowest scores.

    scope "row" compares weights within each output row (Wanda's choice: it keeps every output
    neuron alive); the remainder round(s * numel) - rows * floor(...) is spread one per row over
    the first rows so the total is exact. scope "layer" ranks the whole matrix at once.
    scope "row-mass" is `row_mass_mask` (Wanda's variant): not exact, within MASS_TOLERANCE.
    """
    check_sparsity(sparsity)
    if scope not in SCOPES:
        raise UserError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    if scope == "row-mass":
        return row_mass_mask(scores, sparsity)
    total = prune_count(scores.numel(), sparsity)
    if scope == "layer":
        flat = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
        flat[scores.flatten().argsort()[:total]] = False
        return flat.view_as(scores)
    rows, cols = scores.shape
    per_row = torch.full((rows,), total // rows, device=scores.device)
    per_row[: total % rows] += 1
    return _row_mask(scores, per_row)


def row_mass_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's variant (the `use_variant` option of the Wanda authors' code): each row prunes its
    lowest scores while their running sum stays within alpha times the row's total, one alpha
    per matrix, found by bisection so the matrix's sparsity is within MASS_TOLERANCE of the
    target (for continuous scores). Rows with many tiny scores thus prune more than rows with few.
    """
    check_sparsity(sparsity)
    cumulative = scores.float().sort(dim=1).values.cumsum(dim=1)
    budget = cumulative[:, -1:]

    def per_row(alpha: float) -> torch.Tensor:
        return (cumulative <= alpha * budget).sum(dim=1)

    def search(low: float, high: float) -> tuple[torch.Tensor, float]:
        alpha = (low + high) / 2
        counts = per_row(alpha)
        reached = float(counts.sum()) / scores.numel()
        while abs(reached - sparsity) > MASS_TOLERANCE and high - low >= 1e-7:
            if reached > sparsity:
                high, alpha = alpha, (alpha + low) / 2
            else:
                low, alpha = alpha, (alpha + high) / 2
            counts = per_row(alpha)
            reached = float(counts.sum()) / scores.numel()
        return counts, reached

    # The reference's search: start at 0.4 inside [0, 0.8] and halve the bracket until close.
    # It gives up at a bracket of 1e-3, which on skewed matrices can leave the sparsity percent
    # points off; a bracket of 1e-7 costs a dozen more sums and reaches the tolerance.
    counts, reached = search(0.0, 0.8)
    if reached < sparsity - MASS_TOLERANCE:
        # Past the reference's bracket (the lowest scores hold over 80% of a row's mass); at
        # alpha 1 every weight goes, so any target is reachable.
        counts, reached = search(0.8, 1.0)
    return _row_mask(scores, counts)


def _row_mask(scores: torch.Tensor, prune_per_row: torch.Tensor) -> torch.Tensor:
    """Prune the `prune_per_row[r]` lowest scores of each row r (one sort, then a scatter)."""
    order = scores.argsort(dim=1)
    position = torch.arange(scores.shape[1], device=scores.device)[None, :]
    keep_sorted = position >= prune_per_row[:, None]
    return torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive input columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise UserError(f"N:M pattern {n}:{m} needs input width divisible by {m}; got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def is_nm(keep: torch.Tensor, n: int, m: int, exact: bool = True) -> bool:
    """Whether every group of m consecutive columns keeps n weights (at most n if not exact)."""
    rows, cols = keep.shape
    if cols % m:
        return False
    kept = keep.reshape(rows, cols // m, m).sum(dim=2)
    return bool((kept == n).all() if exact else (kept <= n).all())


def select_mask(scores: torch.Tensor, sparsity: float, pattern: str = UNSTRUCTURED,
                scope: str = "row") -> torch.Tensor:
    nm = parse_pattern(pattern)
    return unstructured_mask(scores, sparsity, scope) if nm is None else nm_mask(scores, *nm)


# ----- per-layer profiles -----------------------------------------------------------------------

def uniform_profile(num_layers: int, sparsity: float) -> list[float]:
    check_sparsity(sparsity)
    return [sparsity] * num_layers


def outlier_ratio(scores: list[torch.Tensor], threshold: float = 5.0) -> float:
    """OWL's layer outlier ratio: fraction of scores above `threshold` times the layer's mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())


def check_owl_lambda(lam: float) -> None:
    if not 0 <= lam < 0.5:
        raise UserError(f"owl lambda must be in [0, 0.5), got {lam}")


def owl_profile(outlier_ratios: list[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL (Yin et al. 2024): layers with more outliers keep more weights.

    Outlier ratios are scaled linearly to a spread of 2*lam, then shifted so the mean sparsity
    is the target: sparsity_l = s - (r_l - mean r) scaled. Layers of equal size thus prune the
    same total as the uniform profile.
    """
    check_sparsity(sparsity)
    check_owl_lambda(lam)
    r = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    if len(r) < 2 or spread <= 0:
        return [sparsity] * len(r)
    density = (r - r.min()) / spread * (2 * lam)
    layer_sparsity = sparsity - (density - density.mean())
    if layer_sparsity.min() < 0 or layer_sparsity.max() >= 1:
        raise UserError(f"owl lambda {lam} pushes a layer's sparsity outside [0, 1) at target "
                        f"{sparsity}; use a smaller lambda")
    return [float(x) for x in layer_sparsity]


# ----- what was reached -------------------------------------------------------------------------

def sparsity_report(weights: dict[str, torch.Tensor], per_layer_of=None) -> dict:
    """Zeros reached: overall, per layer (grouped by `per_layer_of(name)`) and per matrix."""
    per_matrix, groups = {}, {}
    zeros_total = numel_total = 0
    for name, weight in weights.items():
        zeros, numel = int((weight == 0).sum()), weight.numel()
        per_matrix[name] = round(zeros / numel, 6)
        key = per_layer_of(name) if per_layer_of else name
        z, n = groups.get(key, (0, 0))
        groups[key] = (z + zeros, n + numel)
        zeros_total += zeros
        numel_total += numel
    return {"overall": round(zeros_total / max(numel_total, 1), 6),
            "zeros": zeros_total, "numel": numel_total,
            "per_layer": {k: round(z / n, 6) for k, (z, n) in groups.items()},
            "per_matrix": per_matrix}
