"""AWQ: folding scales is an identity before rounding, the searches beat round-to-nearest on
layers with outlier input channels, and the pass runs end to end with an exact reload."""
import pytest
import torch

from compress.adapters import adapter_for
from compress.calibration import collect_linear_inputs, run_layerwise
from compress.cli import main
from compress.data import eval_windows
from compress.errors import UserError
from compress.formats import grid
from compress.formats.int4 import Int4Linear
from compress.pipeline import Session, compress_model
from compress.quant.awq import (AWQConfig, clip_ratios, foldable_heads, output_error,
                                quantize_layer, scale_layer, search_scales, tie_heads)
from compress.quant.stats import InputStats
from compress.recipe import recipe_from_dict
from compress.sources import load_model


def outlier_inputs(tokens=2048, features=128, seed=0):
    """LLM-like activations: most channels small, a few channels 20-50x larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g)
    x[:, [3, 40, 77, 100]] *= torch.tensor([20.0, 30.0, 50.0, 25.0])
    return x


def random_weight(out=96, features=128, seed=1):
    return torch.randn(out, features, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_output_error_from_the_gram_matrix_is_the_output_error():
    x, w = outlier_inputs(), random_weight()
    d = w - grid.fake_quantize(w, 4, True, 32)
    direct = (x @ d.T).pow(2).sum()
    assert float(output_error(d, x.T @ x)) == pytest.approx(float(direct), rel=1e-4)


@pytest.mark.parametrize("group_size,symmetric", [(32, True), (32, False), (0, True)])
def test_awq_layer_error_is_below_rtn_with_outlier_channels(group_size, symmetric):
    x, w = outlier_inputs(), random_weight()
    gram = x.T @ x
    rtn = float(output_error(w - grid.fake_quantize(w, 4, symmetric, group_size), gram))
    s, alpha, errors = search_scales(w, gram, x.abs().mean(0), 4, group_size, symmetric, 20)
    assert errors[0] == pytest.approx(rtn, rel=1e-5)        # alpha = 0 is plain RTN
    assert alpha > 0 and min(errors) < 0.7 * rtn
    # Clipping on top of the scales lowers the error further (it may never raise it).
    scaled, scaled_gram = w * s, gram / (s[:, None] * s[None, :])
    ratio = clip_ratios(scaled, scaled_gram, 4, group_size, symmetric, 0.5, 20)
    assert ((ratio > 0.5) & (ratio <= 1.0)).all() and (ratio < 1).any()
    scale, zero = grid.compute_qparams(scaled, 4, symmetric, group_size, ratio)
    clipped = grid.dequantize(grid.quantize(scaled, scale, zero, 4, group_size), scale, zero,
                              group_size)
    assert float(output_error(scaled - clipped, scaled_gram)) <= min(errors) * (1 + 1e-5)


def test_tie_heads_shares_one_value_per_key_value_channel():
    x = torch.arange(4 * 3.0)            # 4 query heads of 3 channels
    tied = tie_heads(x, 4, 2).reshape(2, 2, 3)
    assert torch.equal(tied[:, 0], tied[:, 1])
    assert torch.allclose(tied[0, 0], (x[0:3] + x[3:6]) / 2)


def _scale_only(model, samples, config):
    adapter, heads = adapter_for(model), foldable_heads(model)
    watched = [f"self_attn.{n}" for n in ("q_proj", "o_proj")] + \
        [f"mlp.{n}" for n in ("gate_proj", "down_proj")]

    def compress_layer(_index, layer, forward):
        stats = {name: InputStats(track_abs=True) for name in watched}
        collect_linear_inputs({n: layer.get_submodule(n) for n in watched}, forward,
                              lambda name, x: stats[name].add(x))
        scale_layer(layer, adapter, stats, config, heads)

    run_layerwise(model, samples, compress_layer, batch_size=2)


def test_folding_awq_scales_leaves_the_float_function_unchanged(tiny_model, tokens):
    assert foldable_heads(tiny_model) == (4, 2)               # GQA: v -> o with tied scales
    layer = tiny_model.model.layers[0]
    before_weights = [layer.input_layernorm.weight.clone(), layer.self_attn.v_proj.weight.clone(),
                      layer.mlp.up_proj.weight.clone()]
    with torch.no_grad():
        before = tiny_model(tokens).logits
        _scale_only(tiny_model, tokens, AWQConfig(bits=4, group_size=32))
        after = tiny_model(tokens).logits
    for old, new in zip(before_weights, [layer.input_layernorm.weight,
                                         layer.self_attn.v_proj.weight, layer.mlp.up_proj.weight]):
        assert not torch.equal(old, new)
    assert (after - before).norm() / before.norm() < 1e-5


def _with_outlier_channels(model):
    """A few hidden channels with large activations, as trained LLMs have (random ones do not)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 30.0
            layer.post_attention_layernorm.weight[[5, 40]] = 30.0
    return model


def test_awq_pass_beats_rtn_on_a_tiny_model_with_outliers():
    session = Session.open("random:tiny")
    _with_outlier_channels(session.loaded.model)
    tokens = eval_windows(session.corpus, 128, 4)     # held out from the calibration half
    with torch.no_grad():
        reference = session.loaded.model(tokens).logits

    def logits_error(passes):
        recipe = recipe_from_dict({"passes": passes, "calibration": {"samples": 16, "seq_len": 128}},
                                  "t")
        model, _ = compress_model(session, recipe)
        with torch.no_grad():
            return float((model(tokens).logits - reference).norm())

    quant = {"bits": 4, "group_size": 32, "symmetric": True}
    rtn = logits_error([{"pass": "rtn", **quant}])
    assert logits_error([{"pass": "awq", "clip": False, **quant}]) < rtn
    assert logits_error([{"pass": "awq", **quant}]) < rtn


def test_cli_awq_saves_and_reloads_bit_identical(tmp_path, tokens):
    out = tmp_path / "awq"
    assert main(["quantize", "random:tiny", "--method", "awq", "--bits", "4", "--group-size", "32",
                 "--asymmetric", "--calib-samples", "8", "--calib-seq-len", "64",
                 "--out", str(out)]) == 0
    reloaded = load_model(str(out)).model
    recipe = recipe_from_dict({"passes": [{"pass": "awq", "bits": 4, "group_size": 32,
                                           "symmetric": False}],
                               "calibration": {"samples": 8, "seq_len": 64}}, "t")
    in_memory, _ = compress_model(Session.open("random:tiny"), recipe)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, in_memory(tokens).logits)
    assert isinstance(reloaded.model.layers[1].self_attn.o_proj, Int4Linear)
    assert set(in_memory.compress_report["awq"]["alpha"]) == {"q_proj", "o_proj", "gate_proj",
                                                              "down_proj"}


@pytest.mark.parametrize("fields,message", [
    ({"n_grid": 0}, "n_grid must be a positive number"),
    ({"max_shrink": 1.0}, "max_shrink must be in [0, 1)"),
    ({"max_shrink": -0.1}, "max_shrink must be in [0, 1)"),
    ({"bits": 2}, "bits must be one of 4, 8"),
])
def test_bad_config_values_are_one_line_errors(fields, message):
    with pytest.raises(UserError) as caught:
        AWQConfig(**fields)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_scale_layer_returns_the_gram_of_the_new_inputs(tiny_model, tokens):
    """The clip search after the scales works on Gram matrices scaled by 1/s, not on a second
    forward: each must equal the Gram of the inputs the linears see once the scales are folded."""
    from compress.quant.awq import scale_layer

    model, adapter = tiny_model, adapter_for(tiny_model)
    layer = adapter.layers(model)[0]
    a, m = adapter.attention, adapter.mlp
    watched = [f"{a}.{adapter.q}", f"{a}.{adapter.o}", f"{m}.{adapter.gate}", f"{m}.{adapter.down}"]
    with torch.no_grad():
        hidden = model.get_submodule(adapter.embed_path)(tokens)
        positions = torch.arange(tokens.shape[1])[None]
        rotary = model.get_submodule(adapter.rotary_path)(hidden, positions)

        def forward():
            layer(hidden, position_embeddings=rotary, position_ids=positions)

        def grams_seen(track_abs):
            stats = {name: InputStats(track_abs=track_abs) for name in watched}
            collect_linear_inputs({name: layer.get_submodule(name) for name in watched}, forward,
                                  lambda name, x: stats[name].add(x))
            return stats

        grams, _ = scale_layer(layer, adapter, grams_seen(True), AWQConfig(bits=4, group_size=32),
                               foldable_heads(model))
        after = grams_seen(False)
    assert set(grams) >= set(watched)
    for name in watched:
        expected = after[name].sum_xx
        torch.testing.assert_close(grams[name], expected, rtol=1e-3,
                                   atol=1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("max_shrink,n_grid,lowest", [(0.5, 20, 0.55), (0.52, 20, 0.5),
                                                      (0.29, 100, 0.72), (0.0, 20, 1.0)])
def test_clip_search_tries_every_ratio_above_one_minus_max_shrink(monkeypatch, max_shrink,
                                                                  n_grid, lowest):
    from compress.quant import awq as awq_module

    tried, original = [], awq_module.grid.compute_qparams

    def spy(w, bits, symmetric, group_size, clip_ratio=1.0, storage_dtype=None):
        tried.append(float(clip_ratio))
        return original(w, bits, symmetric, group_size, clip_ratio, storage_dtype)

    monkeypatch.setattr(awq_module.grid, "compute_qparams", spy)
    awq_module.clip_ratios(torch.randn(8, 64), torch.eye(64), 4, 32, True, max_shrink, n_grid)
    assert min(tried) == pytest.approx(lowest)


def test_mean_abs_is_the_mean_of_abs_over_every_token():
    a, b = torch.randn(3, 5, 16), torch.randn(7, 16) * 4
    stats = InputStats(track_abs=True)
    stats.add(a)
    stats.add(b)
    expected = torch.cat([a.reshape(-1, 16), b]).abs().mean(0)
    torch.testing.assert_close(stats.mean_abs(), expected)


def test_awq_clip_is_applied_except_to_q_and_k(tiny_model, tokens):
    """quantize_layer: v/o/gate/up/down take the searched clip ratios (some grid narrower than
    min/max), q and k keep plain min/max grids."""

    layer = tiny_model.model.layers[0]
    adapter = adapter_for(tiny_model)
    names = adapter.linear_names()
    weights = {n: layer.get_submodule(n).weight.data.clone() for n in names}
    grams = {}
    for n in names:
        torch.manual_seed(len(n))
        x = torch.randn(512, weights[n].shape[1])
        x[:, :3] *= 20
        grams[n] = x.T @ x
    quantize_layer(layer, adapter, grams, AWQConfig(bits=4, group_size=32))
    for n in names:
        plain, _ = grid.compute_qparams(weights[n], 4, True, 32)
        stored = layer.get_submodule(n).scales.float()
        if n.endswith(("q_proj", "k_proj")):
            assert torch.equal(stored, plain), n
        else:
            assert (stored < plain * 0.999).any(), n


def test_awq_scale_search_rounds_against_the_stored_bfloat16_scale():
    """Candidate alpha = 0 (s = 1) is the RTN the bfloat16 layer will store: scales in bfloat16."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 128, generator=g)
    x[:, [3, 40]] *= 30
    w = (torch.randn(64, 128, generator=g) * 0.02).to(torch.bfloat16)
    gram = x.T @ x
    stored = grid.fake_quantize(w.float(), 4, True, 32, storage_dtype=torch.bfloat16)
    rtn = float(output_error(w.float() - stored, gram))
    _, _, errors = search_scales(w, gram, x.abs().mean(0), 4, 32, True, 4)
    assert errors[0] == pytest.approx(rtn, rel=1e-4)
