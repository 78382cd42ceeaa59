"""Mask selection and SparseGPT, as pure functions on tensors."""
from __future__ import annotations

import pytest
import torch

from compress.errors import UserError
from compress.prune import masks
from compress.prune.sparsegpt import accumulate_hessian, reconstruction_error, sparsegpt_prune


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(8, 16), (7, 13), (33, 64)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9])
@pytest.mark.parametrize("scope", ["row", "layer"])
def test_unstructured_mask_prunes_exact_count(shape, sparsity, scope):
    scores = _rand(*shape).abs()
    keep = masks.unstructured_mask(scores, sparsity, scope)
    assert int((~keep).sum()) == round(sparsity * scores.numel())
    if scope == "row":  # spread evenly: rows differ by at most one pruned weight
        per_row = (~keep).sum(1)
        assert int(per_row.max() - per_row.min()) <= 1


def test_unstructured_mask_prunes_the_lowest_scores():
    scores = _rand(16, 32).abs()
    keep = masks.unstructured_mask(scores, 0.5, "layer")
    assert scores[~keep].max() <= scores[keep].min()
    keep = masks.unstructured_mask(scores, 0.25, "row")
    for r in range(16):
        assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.7])
def test_row_mass_mask_prunes_each_rows_lowest_within_the_tolerance(sparsity):
    scores = _rand(64, 256).abs() * torch.linspace(0.2, 5, 256)   # columns of unequal salience
    scores[:32] = scores[:32] ** 3                                   # and rows of unequal spread
    keep = masks.unstructured_mask(scores, sparsity, "row-mass")
    reached = float((~keep).float().mean())
    assert abs(reached - sparsity) <= masks.MASS_TOLERANCE
    per_row = (~keep).sum(1)
    assert per_row[:32].float().mean() > per_row[32:].float().mean()  # skewed rows prune more
    for r in range(64):
        if 0 < per_row[r] < 256:
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_every_group_valid(n, m):
    scores = _rand(24, 64).abs()
    keep = masks.nm_mask(scores, n, m)
    groups = keep.reshape(24, 64 // m, m)
    assert bool((groups.sum(-1) == n).all())
    assert masks.is_nm(keep, n, m)
    # Within each group the kept weights are the largest.
    s = scores.reshape(24, -1, m)
    kept_min = torch.where(groups, s, torch.inf).amin(-1)
    pruned_max = torch.where(groups, -torch.inf, s).amax(-1)
    assert bool((pruned_max <= kept_min).all())


def test_patterns_and_bad_input():
    assert masks.parse_pattern("unstructured") is None
    assert masks.parse_pattern("2:4") == (2, 4)
    for bad in ("4:2", "2-4", "0:4", "dense"):
        with pytest.raises(UserError, match="pattern must be"):
            masks.parse_pattern(bad)
    with pytest.raises(UserError, match="divisible by 4"):
        masks.nm_mask(torch.ones(4, 6), 2, 4)
    with pytest.raises(UserError, match=r"sparsity must be in \[0, 1\)"):
        masks.unstructured_mask(torch.ones(4, 4), 1.0)
    with pytest.raises(UserError, match="input norms"):
        masks.wanda_scores(torch.ones(4, 8), torch.ones(4))


def test_wanda_scores_weight_input_norms():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    scores = masks.wanda_scores(w, torch.tensor([4.0, 1.0]))
    assert torch.equal(scores, torch.tensor([[2.0, 2.0], [6.0, 0.5]]))


def test_owl_profile_keeps_mean_and_favours_outlier_layers():
    ratios = [0.01, 0.05, 0.02, 0.08]
    profile = masks.owl_profile(ratios, 0.6, lam=0.08)
    assert abs(sum(profile) / len(profile) - 0.6) < 1e-9
    assert max(profile) - min(profile) == pytest.approx(0.16)
    order = sorted(range(4), key=lambda i: ratios[i])
    assert [profile[i] for i in order] == sorted(profile, reverse=True)
    assert masks.owl_profile([0.1, 0.1], 0.5) == [0.5, 0.5]
    with pytest.raises(UserError, match="owl lambda"):
        masks.owl_profile(ratios, 0.95, lam=0.2)


def test_outlier_ratio_counts_scores_above_threshold_times_mean():
    scores = [torch.ones(10, 10), torch.tensor([[100.0]])]
    # mean = 200/101 ~ 1.98; threshold 5x ~ 9.9: only the single 100 is an outlier.
    assert masks.outlier_ratio(scores, 5.0) == pytest.approx(1 / 101)


def test_sparsity_report_overall_and_per_layer():
    weights = {"l.0.a": torch.tensor([[0.0, 1.0], [0.0, 0.0]]), "l.0.b": torch.ones(2, 2),
               "l.1.a": torch.zeros(1, 4)}
    report = masks.sparsity_report(weights, lambda n: n.split(".")[1])
    assert report["overall"] == pytest.approx(7 / 12)
    assert report["per_layer"] == {"0": pytest.approx(3 / 8), "1": 1.0}
    assert report["per_matrix"]["l.0.a"] == 0.75


def _correlated_layer(rows=48, cols=128, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    scale = torch.rand(cols, generator=g) * 3 + 0.1            # uneven feature scales
    x = (torch.randn(tokens, cols, generator=g) @ mix) * scale
    w = torch.randn(rows, cols, generator=g)
    h, _ = accumulate_hessian(None, 0, x)
    return w, h, x


def test_sparsegpt_exact_sparsity_and_row_groups():
    w, h, _ = _correlated_layer(rows=40, cols=96)
    pruned, keep = sparsegpt_prune(w, h, 0.37, blocksize=32, row_groups=[10, 30])
    assert torch.equal(pruned == 0, ~keep)
    for lo, hi in ((0, 10), (10, 40)):
        assert int((~keep[lo:hi]).sum()) == round(0.37 * (hi - lo) * 96)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_sparsegpt_nm_groups_valid(n, m):
    w, h, _ = _correlated_layer()
    pruned, keep = sparsegpt_prune(w, h, nm=(n, m), blocksize=64)
    assert masks.is_nm(keep, n, m)
    assert masks.is_nm(pruned != 0, n, m, exact=False)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude(pattern):
    w, h, x = _correlated_layer()
    nm = masks.parse_pattern(pattern)
    pruned, _ = sparsegpt_prune(w, h, 0.5, nm=nm, blocksize=32)
    baseline = w * masks.select_mask(masks.magnitude_scores(w), 0.5, pattern, "layer")
    assert (pruned == 0).sum() == (baseline == 0).sum()
    err_sgpt = reconstruction_error(w, pruned, h)
    err_mag = reconstruction_error(w, baseline, h)
    assert err_sgpt < 0.7 * err_mag
    # reconstruction_error is the mean squared output error over the calibration tokens.
    direct = (x @ (w - pruned).t()).pow(2).sum() / x.shape[0]
    assert err_sgpt == pytest.approx(float(direct), rel=1e-3)


def test_sparsegpt_bad_input():
    w, h, _ = _correlated_layer(cols=64)
    with pytest.raises(UserError, match="Hessian"):
        sparsegpt_prune(w, h[:32, :32])
    with pytest.raises(UserError, match="divisible by 8"):
        sparsegpt_prune(w, h, nm=(4, 8), blocksize=20)


def test_sparsegpt_mask_on_a_diagonal_hessian_is_the_wanda_mask():
    """With uncorrelated inputs (diagonal H) and one block, SparseGPT's saliency w^2 / [H^-1]_jj^2
    orders weights as |w| sqrt(h_j), Wanda's score on the damped diagonal, layer-wide."""
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    h = torch.diag(torch.logspace(-2, 2, 64)[torch.randperm(64)])
    damp = 0.01
    _, keep = sparsegpt_prune(weight, h, 0.5, blocksize=64, damp=damp)
    damped = h.diagonal() + damp * h.diagonal().mean()
    expected = masks.unstructured_mask(masks.wanda_scores(weight, damped), 0.5, scope="layer")
    assert torch.equal(keep, expected)


def test_hessian_over_uneven_batches_is_the_mean_over_all_tokens():
    x = torch.randn(512, 32)
    h, count = accumulate_hessian(None, 0, x[:100])
    h, count = accumulate_hessian(h, count, x[100:])
    assert count == 512
    torch.testing.assert_close(h, 2 * x.T @ x / 512, rtol=1e-5, atol=1e-5)
