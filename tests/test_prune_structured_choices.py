"""Structured pruning removes the heads / channels / layers its criterion ranks lowest, and its
least-squares refit of o_proj / down_proj is the one on the layer's real inputs: each checked
against a recomputation, on cases built so that a wrong choice shows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.adapters import adapter_for
from compress.prune import shrink

from apply_pass import apply_pass
from test_prune_passes import _inputs_of
from test_prune_structured import _logits


def test_query_mode_ranks_the_heads_of_each_group_on_their_own(tiny_model, tokens):
    """Dead query heads at different positions in their groups (head 0 of group 0, head 1 of
    group 1 = global head 3): each group must drop its own dead head. Catches: every group
    removing the positions group 0 ranks lowest."""
    a = adapter_for(tiny_model)
    for layer in a.layers(tiny_model):
        o = layer.get_submodule(f"{a.attention}.{a.o}").weight.data
        o[:, 0:16] = 0
        o[:, 48:64] = 0
    before = _logits(tiny_model, tokens)
    model = apply_pass(tiny_model, "heads", tokens, ratio=0.5, mode="query")
    assert model.compress_report["structured"]["removed_per_layer"] == [[0, 3], [0, 3]]
    assert torch.allclose(_logits(model, tokens), before, atol=1e-5)


@pytest.mark.parametrize("damp", [0.01, 0.5])
def test_heads_reconstruct_refits_o_proj(tiny, tokens, damp):
    """reconstruct (the default) re-fits o_proj on the kept heads: layer 0's new o_proj is the
    ridge solution on layer 0's real o_proj inputs, not the plain slice. Catches: the refit skipped."""
    model = tiny.model
    a = adapter_for(model)
    o = f"{a.attention}.{a.o}"
    x = _inputs_of(model, o, 0, tokens)
    w = a.layers(model)[0].get_submodule(o).weight.detach().clone()
    model = apply_pass(model, "heads", tokens, ratio=0.5, mode="kv-groups", damp=damp)
    removed = model.compress_report["structured"]["removed_per_layer"][0]
    kept = [g for g in range(2) if g not in removed]
    cols = torch.cat([torch.arange(g * 32, g * 32 + 32) for g in kept])
    expected = shrink.compensate(w, x.t() @ x / len(x), cols, damp)
    got = a.layers(model)[0].get_submodule(o).weight
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)
    if damp != 0.01:   # the option is used, not the default
        assert not torch.allclose(got, shrink.compensate(w, x.t() @ x / len(x), cols, 0.01),
                                  rtol=1e-3, atol=1e-5)
    assert not torch.allclose(got, w[:, cols], atol=1e-4)


def test_compensate_is_the_least_squares_refit():
    """With a negligible ridge, the refit of the kept columns is ordinary least squares of the
    full layer's outputs on the kept inputs (float64 lstsq). Catches: a scaled or dropped term."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(400, 24, generator=g, dtype=torch.float64)
         @ (torch.eye(24, dtype=torch.float64) + 0.4 * torch.randn(24, 24, generator=g,
                                                                 dtype=torch.float64)))
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 5, 8, 9, 11, 13, 14, 17, 20, 23])
    refit = shrink.compensate(w, x.t() @ x / 400, keep, damp=1e-10)
    expected = torch.linalg.lstsq(x[:, keep], x @ w.t()).solution.t()
    torch.testing.assert_close(refit, expected, rtol=1e-6, atol=1e-6)


def test_kv_groups_rank_a_group_by_the_sum_of_its_heads(tiny, tokens):
    """A KV group's score is the total energy of its query heads. Layer 0 is built so that the
    sum and the loudest head disagree: group 0 = one head x1.25 and one silent head, group 1 =
    two plain heads. Catches: ranking groups by another reduction."""
    model = tiny.model
    a = adapter_for(model)
    o = f"{a.attention}.{a.o}"
    w = a.layers(model)[0].get_submodule(o).weight.data
    w[:, 16:32] = 0
    x = _inputs_of(model, o, 0, tokens)
    energy = shrink.head_energy(w, x.t() @ x, 16)
    scale = float((energy[2:].sum() * 0.75 / energy[0]).sqrt())   # group 0: 0.75 x group 1's sum
    w[:, 0:16] *= scale
    energy = shrink.head_energy(w, x.t() @ x, 16).view(2, 2)
    assert int(energy.sum(1).argmin()) != int(energy.amax(1).argmin())   # the case discriminates
    model = apply_pass(model, "heads", tokens, ratio=0.5, mode="kv-groups")
    assert model.compress_report["structured"]["removed_per_layer"][0] == [
        int(energy.sum(1).argmin())]


def test_mlp_channels_reconstruct_refits_down_proj(tiny, tokens):
    """reconstruct (the default) re-fits down_proj on the kept channels; layer 0 is checked
    against the refit on its real inputs. Catches: the refit skipped (the plain slice kept)."""
    model = tiny.model
    a = adapter_for(model)
    down = f"{a.mlp}.{a.down}"
    x = _inputs_of(model, down, 0, tokens)
    w = a.layers(model)[0].get_submodule(down).weight.detach().clone()
    h = x.t() @ x / len(x)
    keep = shrink.keep_indices(192, shrink.lowest(shrink.column_energy(w, h), 48))
    model = apply_pass(model, "mlp-channels", tokens, ratio=0.25)
    got = a.layers(model)[0].get_submodule(down).weight
    torch.testing.assert_close(got, shrink.compensate(w, h, keep, 0.01), rtol=1e-3, atol=1e-5)
    assert not torch.allclose(got, w[:, keep], atol=1e-4)


def test_block_influence_is_the_mean_over_every_token(tiny_model, tokens):
    """ShortGPT's influence 1 - cos(layer input, layer output), averaged over all calibration
    tokens, recomputed here with plain hooks on the unpruned model. Catches: a subset of tokens
    (or positions) measured."""
    a = adapter_for(tiny_model)
    sums = [0.0] * len(a.layers(tiny_model))
    count = [0] * len(sums)

    def hook(index):
        def run(_m, args, kwargs, output):
            x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, 64).double()
            y = (output[0] if isinstance(output, tuple) else output).reshape(-1, 64).double()
            sums[index] += float((1 - F.cosine_similarity(x, y, dim=-1)).sum())
            count[index] += x.shape[0]
        return run

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(a.layers(tiny_model))]
    with torch.no_grad():
        for part in tokens.split(2):
            tiny_model(part, use_cache=False)
    for handle in handles:
        handle.remove()
    expected = [s / n for s, n in zip(sums, count)]
    model = apply_pass(tiny_model, "layers", tokens, drop=1)
    assert model.compress_report["structured"]["block_influence"] == pytest.approx(expected,
                                                                                  abs=2e-6)
