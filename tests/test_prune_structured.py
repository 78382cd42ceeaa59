"""Structured pruning really shrinks tiny models, which save, reload and keep their logits."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from compress.adapters import adapter_for, cache_argument
from compress.errors import UserError
from compress.passes import build_config, pass_table
from compress.prune import shrink

from apply_pass import apply_pass
from reload_exactly import reload_exactly


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_mlp_channels_shrink_reload_and_stock_load(tiny_model, tokens, tmp_path):
    model = apply_pass(tiny_model, "mlp-channels", tokens, ratio=0.25)
    a = adapter_for(model)
    for layer in a.layers(model):
        assert layer.get_submodule(f"{a.mlp}.{a.gate}").weight.shape == (144, 64)
        assert layer.get_submodule(f"{a.mlp}.{a.down}").weight.shape == (64, 144)
    assert model.config.intermediate_size == 144
    report = model.compress_report["structured"]
    assert report["parameters_before"] - report["parameters_after"] == 2 * 3 * 48 * 64
    _, meta = reload_exactly(model, tokens, tmp_path / "ck", stock=True)
    assert "shapes" not in meta


def test_mlp_channels_global_scope_per_layer_shapes_reload(tiny_model, tokens, tmp_path):
    model = apply_pass(tiny_model, "mlp-channels", tokens, ratio=0.25, scope="global")
    widths = model.compress_report["structured"]["intermediate_per_layer"]
    assert sum(widths) == 2 * 144 and len(set(widths)) == 2   # same total, different widths
    _, meta = reload_exactly(model, tokens, tmp_path / "ck")
    narrow = widths.index(min(widths))
    assert meta["shapes"][f"model.layers.{narrow}.mlp.down_proj"] == [64, min(widths), False]


@pytest.mark.parametrize("mode,heads,kv", [("kv-groups", 2, 1), ("query", 2, 2)])
def test_heads_shrink_and_reload(tiny_model, tokens, tmp_path, mode, heads, kv):
    model = apply_pass(tiny_model, "heads", tokens, ratio=0.5, mode=mode)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (heads, kv)
    a = adapter_for(model)
    attention = a.layers(model)[0].get_submodule(a.attention)
    assert attention.get_submodule(a.q).weight.shape == (heads * 16, 64)
    assert attention.get_submodule(a.k).weight.shape == (kv * 16, 64)
    reload_exactly(model, tokens, tmp_path / "ck", stock=True)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruning_dead_mlp_channels_leaves_outputs_unchanged(tiny_model, tokens, scope):
    """Dead channels have zero activation energy and are the ones removed, in each layer or
    ranked across layers. Catches (global): the ranking using the down_proj weights alone."""
    a = adapter_for(tiny_model)
    for layer in a.layers(tiny_model):
        # Channels whose gate and up rows are zero output silu(0) * 0 = 0: they are dead.
        for name in (a.gate, a.up):
            layer.get_submodule(f"{a.mlp}.{name}").weight.data[::4] = 0
    before = _logits(tiny_model, tokens)
    model = apply_pass(tiny_model, "mlp-channels", tokens, ratio=0.25, scope=scope)
    assert model.compress_report["structured"]["intermediate_per_layer"] == [144, 144]
    assert torch.allclose(_logits(model, tokens), before, atol=1e-5)


@pytest.mark.parametrize("mode", ["kv-groups", "query"])
def test_pruning_dead_heads_leaves_outputs_unchanged(tiny_model, tokens, mode):
    a = adapter_for(tiny_model)
    for layer in a.layers(tiny_model):
        attention = layer.get_submodule(a.attention)
        if mode == "kv-groups":   # KV head 1 outputs zero values: its 2 query heads are dead
            attention.get_submodule(a.v).weight.data[16:32] = 0
        else:                     # query heads 1 and 3 (one per group) feed zero o_proj columns
            o = attention.get_submodule(a.o).weight.data
            o[:, 16:32] = 0
            o[:, 48:64] = 0
    before = _logits(tiny_model, tokens)
    model = apply_pass(tiny_model, "heads", tokens, ratio=0.5, mode=mode)
    assert model.config.num_attention_heads == 2
    assert torch.allclose(_logits(model, tokens), before, atol=1e-5)


def test_drop_layers_renumbers_kv_cache_and_reloads(tokens, tmp_path):
    from compress.shapes import llama_config

    config = llama_config("tiny")
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model = apply_pass(model, "layers", tokens, drop=2)
    a = adapter_for(model)
    report = model.compress_report["structured"]
    influence = report["block_influence"]
    assert report["dropped"] == sorted(sorted(range(4), key=lambda i: influence[i])[:2])
    assert model.config.num_hidden_layers == len(a.layers(model)) == 2
    assert [layer.get_submodule(a.attention).layer_idx for layer in a.layers(model)] == [0, 1]
    # Incremental decoding with a KV cache matches the full forward (cache slots renumbered).
    with torch.no_grad():
        full = model(tokens[:1]).logits[0, -1]
        cache = DynamicCache(config=model.config)
        kv = {cache_argument(model): cache}
        model(tokens[:1, :-1], use_cache=True, **kv)
        assert len(cache.layers) == 2
        step = model(tokens[:1, -1:], use_cache=True, **kv).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-4)
    reload_exactly(model, tokens, tmp_path / "ck", stock=True)


def test_the_layer_that_changes_the_hidden_state_least_is_dropped(tokens):
    """A layer whose attention and MLP write nothing (o_proj, down_proj zero) leaves the hidden
    state as it found it: influence 1 - cos = 0, the first to go."""
    from compress.shapes import llama_config

    config = llama_config("tiny")
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    a = adapter_for(model)
    identity = a.layers(model)[2]
    with torch.no_grad():
        identity.get_submodule(f"{a.attention}.{a.o}").weight.zero_()
        identity.get_submodule(f"{a.mlp}.{a.down}").weight.zero_()
    model = apply_pass(model, "layers", tokens, drop=1)
    report = model.compress_report["structured"]
    assert report["dropped"] == [2]
    assert report["block_influence"][2] == pytest.approx(0, abs=1e-6)


def test_global_keep_counts_keep_the_minimum_in_every_layer():
    # Layer 0's scores are all below layer 1's: half of all units would empty layer 0 but for
    # min_keep, so layer 1 gives up the rest.
    assert shrink.global_keep_counts([torch.arange(16.), torch.arange(16.) + 100], 0.5, 2) \
        == [2, 14]


def test_drop_layers_keeps_the_named_layers_in_order(tiny_model):
    from compress.prune.structured import drop_layers

    a = adapter_for(tiny_model)
    second = a.layers(tiny_model)[1]
    drop_layers(tiny_model, [0])
    assert list(a.layers(tiny_model)) == [second]
    assert second.get_submodule(a.attention).layer_idx == 0


def test_compensation_reduces_output_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g) @ (torch.eye(32) + 0.3 * torch.randn(32, 32, generator=g))
    w = torch.randn(16, 32, generator=g)
    h = x.t() @ x / 512
    keep = shrink.keep_indices(32, shrink.lowest(shrink.column_energy(w, h), 8))
    refit = shrink.compensate(w, h, keep, damp=1e-4)
    plain_err = (x @ w.t() - x[:, keep] @ w[:, keep].t()).pow(2).mean()
    refit_err = (x @ w.t() - x[:, keep] @ refit.t()).pow(2).mean()
    assert refit_err < 0.8 * plain_err


def test_head_energy_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 48, generator=g)
    w = torch.randn(8, 48, generator=g)
    energy = shrink.head_energy(w, x.t() @ x, head_dim=16)
    direct = torch.stack([(x[:, i * 16:(i + 1) * 16] @ w[:, i * 16:(i + 1) * 16].t()).pow(2).sum()
                          for i in range(3)])
    assert torch.allclose(energy, direct, rtol=1e-4)


@pytest.mark.parametrize("name,fields,message", [
    ("mlp-channels", {"ratio": 1.0}, r"ratio must be in \(0, 1\)"),
    ("mlp-channels", {"scope": "model"}, "scope must be one of layer, global"),
    ("heads", {"mode": "random"}, "mode must be one of kv-groups, query"),
    ("layers", {"drop": 0}, "drop must be at least 1"),
    ("mlp-channels", {"damp": float("nan")}, "damp must be a finite number >= 0"),
    ("heads", {"damp": float("inf")}, "damp must be a finite number >= 0"),
    ("heads", {"damp": -5.0}, "damp must be a finite number >= 0"),
    # The unstructured passes' options, refused before any calibration forward.
    ("sparsegpt", {"damp": float("nan")}, "damp must be a finite number >= 0"),
    ("wanda", {"profile": "owl", "owl_threshold": float("nan")}, "owl_threshold must be a finite"),
    ("magnitude", {"owl_threshold": -1.0}, "owl_threshold must be a finite number > 0"),
    ("wanda", {"profile": "owl", "owl_lambda": 0.7}, r"owl lambda must be in \[0, 0.5\)"),
])
def test_structured_config_errors(name, fields, message):
    with pytest.raises(UserError, match=message):
        build_config(pass_table()[name], fields)


def test_structured_runtime_errors(tiny_model, tokens):
    with pytest.raises(UserError, match="KV groups"):
        apply_pass(tiny_model, "heads", tokens, ratio=0.1)
    with pytest.raises(UserError, match="drop 2 leaves no decoder layer of the model's 2; "
                                        "allowed: 1 to 1"):
        apply_pass(tiny_model, "layers", tokens, drop=2)


def test_dropping_layers_after_a_sparsity_pass_keeps_each_target_with_its_layer(tiny_model,
                                                                               tokens):
    from compress.prune.common import refresh_sparsity
    from compress.prune.structured import drop_layers

    a = adapter_for(tiny_model)
    a.layers(tiny_model)[1].get_submodule(f"{a.mlp}.{a.gate}").weight.data[:, 3] *= 40
    model = apply_pass(tiny_model, "wanda", tokens, sparsity=0.5, profile="owl", owl_lambda=0.05)
    targets = model.compress_report["sparsity"]["target_per_layer"]
    assert len(targets) == 2 and targets[0] != targets[1]
    drop_layers(model, [0])
    refresh_sparsity(model)
    report = model.compress_report["sparsity"]
    assert report["target_per_layer"] == [targets[1]]
    assert report["per_layer"]["0"] == pytest.approx(targets[1], abs=1e-3)


def test_dropping_the_widest_layer_leaves_a_config_that_builds_the_kept_layers(tiny_model, tokens,
                                                                               tmp_path):
    """mlp-channels scope global gives per-layer widths and config.intermediate_size the widest;
    once that layer is dropped, the config must describe the layers that are left."""
    from compress.prune.structured import drop_layers

    model = apply_pass(tiny_model, "mlp-channels", tokens, ratio=0.25, scope="global")
    widths = model.compress_report["structured"]["intermediate_per_layer"]
    drop_layers(model, [widths.index(max(widths))])
    assert model.config.intermediate_size == min(widths)
    _, meta = reload_exactly(model, tokens, tmp_path / "ck", stock=True)
    assert "shapes" not in meta


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_mlp_magnitude_without_reconstruct_keeps_the_largest_down_columns_as_they_were(
        tiny_model, tokens, scope):
    model = tiny_model
    downs = [layer.mlp.down_proj.weight.detach().clone() for layer in model.model.layers]
    model = apply_pass(model, "mlp-channels", tokens, ratio=0.25, criterion="magnitude",
                       reconstruct=False, scope=scope)
    for w, layer in zip(downs, model.model.layers):
        kept = layer.mlp.down_proj.in_features
        largest = torch.sort(w.pow(2).sum(0), descending=True).indices[:kept].sort().values
        assert torch.equal(layer.mlp.down_proj.weight, w[:, largest])   # exact: no re-fit


def test_heads_without_reconstruct_slice_o_proj_unchanged(tiny_model, tokens):
    model = tiny_model
    o = [layer.self_attn.o_proj.weight.detach().clone() for layer in model.model.layers]
    model = apply_pass(model, "heads", tokens, ratio=0.5, mode="kv-groups", reconstruct=False)
    for w, layer, removed in zip(o, model.model.layers,
                                 model.compress_report["structured"]["removed_per_layer"]):
        kept = [g for g in range(2) if g not in removed]          # 2 KV groups of 2 heads
        cols = torch.cat([torch.arange(g * 32, g * 32 + 32) for g in kept])
        assert torch.equal(layer.self_attn.o_proj.weight, w[:, cols])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_ratio_that_removes_no_channel_is_refused_with_one_that_does(tiny_model, tokens, scope):
    import re

    with pytest.raises(UserError, match="removes no MLP channel") as refused:
        apply_pass(tiny_model, "mlp-channels", tokens, ratio=0.0005, scope=scope)
    least = float(re.search(r"at least ([0-9.e-]+)", str(refused.value)).group(1))
    apply_pass(tiny_model, "mlp-channels", tokens, ratio=least, scope=scope)
