"""SparseGPT against a float64 transcription of the reference fasterprune (IST-DASLab/sparsegpt,
sparsegpt.py): the same masks and weights, for unstructured and N:M; dead inputs pruned first;
the pass uses its damp and blocksize."""
from __future__ import annotations

import pytest
import torch

from compress.adapters import adapter_for
from compress.prune.sparsegpt import _block_counts, accumulate_hessian, sparsegpt_prune

from apply_pass import apply_pass


def _reference(w, h, nm, blocksize, damp, counts=None):
    """fasterprune, float64; unstructured masks take the project's exact per-block counts."""
    W = w.clone().double()
    H = h.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    for b, i1 in enumerate(range(0, W.shape[1], blocksize)):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), torch.zeros_like(W[:, i1:i2])
        Hinv1 = Hinv[i1:i2, i1:i2]
        pruned = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            tmp = W1 ** 2 / torch.diag(Hinv1)[None, :] ** 2
            pruned.view(-1)[tmp.flatten().topk(counts[b], largest=False).indices] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i:i + nm[1]] ** 2 / torch.diag(Hinv1)[i:i + nm[1]][None, :] ** 2
                pruned.scatter_(1, i + torch.topk(tmp, nm[1] - nm[0], dim=1, largest=False)[1], True)
            q = W1[:, i].clone()
            q[pruned[:, i]] = 0
            Q1[:, i] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~pruned
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, keep


def _layer(rows=12, cols=48, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = (torch.randn(tokens, cols, generator=g) @ mix) * (torch.rand(cols, generator=g) * 3 + 0.1)
    return torch.randn(rows, cols, generator=g), accumulate_hessian(None, 0, x)[0]


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_matches_the_reference_sweep(nm):
    w, h = _layer()
    pruned, keep = sparsegpt_prune(w, h, 0.5, nm=nm, blocksize=16, damp=0.01)
    ref_w, ref_keep = _reference(w, h, nm, 16, 0.01, _block_counts(0.5, 12, 48, 16))
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(pruned.double(), ref_w, rtol=1e-4, atol=1e-4)


def test_weights_of_dead_inputs_are_pruned_first():
    """An input that never fires (H_jj = 0): its weights carry nothing and are pruned first."""
    w, h = _layer()
    h[5, :] = 0
    h[:, 5] = 0
    pruned, keep = sparsegpt_prune(w, h, 0.5, blocksize=16)
    assert not keep[:, 5].any() and not pruned[:, 5].any()


def test_the_sparsegpt_pass_uses_its_damp_and_blocksize(tiny, tokens):
    """Layer 0's q/k/v after the pass are sparsegpt_prune of the stacked matrices on their real
    inputs' Hessian (accumulated per calibration batch, as the pass does), with the configured
    damp and blocksize. Catches: either option ignored (the defaults 0.01 / 128 used)."""
    model = tiny.model
    a = adapter_for(model)
    names = [f"{a.attention}.{n}" for n in (a.q, a.k, a.v)]
    layer0 = a.layers(model)[0]
    seen = []
    handle = layer0.get_submodule(names[0]).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).float()))
    with torch.no_grad():
        for part in tokens.split(2):
            model(part, use_cache=False)
    handle.remove()
    h, n = None, 0
    for x in seen:
        h, n = accumulate_hessian(h, n, x)
    dense = [layer0.get_submodule(name).weight.detach().clone() for name in names]
    rows = [w.shape[0] for w in dense]

    def expected(damp, blocksize):
        return sparsegpt_prune(torch.cat(dense), h, 0.5, None, blocksize, damp, row_groups=rows)[0]

    apply_pass(model, "sparsegpt", tokens, sparsity=0.5, damp=0.5, blocksize=16)
    got = torch.cat([layer0.get_submodule(name).weight for name in names])
    torch.testing.assert_close(got, expected(0.5, 16), rtol=1e-4, atol=1e-5)
    for other in (expected(0.01, 16), expected(0.5, 128)):   # the case discriminates
        assert not torch.allclose(got, other, rtol=1e-4, atol=1e-5)
