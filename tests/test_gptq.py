"""GPTQ: lower layer error than RTN, a valid Int4/Int8 layout, dead columns, kept zeros, the
layer-by-layer driver, and the pass end to end through the CLI with an exact reload."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

import compress.quant.gptq as gptq_module
from compress.calibration import CalibrationData, run_layerwise
from compress.cli import main
from compress.data import eval_windows
from compress.errors import UserError
from compress.formats import grid
from compress.formats.int4 import Int4Linear
from compress.formats.int8 import Int8Linear
from compress.pipeline import Session, compress_model
from compress.prune.masks import is_nm, magnitude_scores, nm_mask
from compress.quant.gptq import GPTQConfig, gptq, gptq_quantize
from compress.quant.stats import InputStats, gram
from compress.recipe import apply_recipe, recipe_from_dict
from compress.sources import load_model


def correlated_inputs(tokens=2048, features=128, seed=0):
    """Activations like an LLM's: correlated channels (a low-rank mixing plus noise) with a few
    channels of much larger magnitude; plain i.i.d. inputs would leave GPTQ nothing to exploit."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 16, generator=g)
    x = latent @ torch.randn(16, features, generator=g) + 0.3 * torch.randn(tokens, features, generator=g)
    x[:, :4] *= 8.0
    return x


def random_weight(out=96, features=128, seed=1):
    return torch.randn(out, features, generator=torch.Generator().manual_seed(seed)) * 0.02


def output_error(x, w, w_hat):
    return float((x @ w.T - x @ w_hat.T).norm())


def rtn_weight(w, bits, group_size, symmetric):
    return grid.fake_quantize(w, bits, symmetric, group_size)


def gptq_weight(w, x, bits, group_size, symmetric, **kwargs):
    h = InputStats.from_input(x).hessian()
    codes, scale, zero = gptq_quantize(w, h, bits, group_size, symmetric, **kwargs)
    return grid.dequantize(codes, scale, zero, group_size)


@pytest.mark.parametrize("bits,group_size,symmetric,options", [
    (4, 32, True, {}), (4, 32, False, {}), (4, 0, True, {}), (4, 0, False, {}),
    (4, 32, True, {"act_order": True}), (4, 0, False, {"act_order": True}),
    (4, 32, True, {"static_groups": True}), (8, 0, True, {}), (4, 128, True, {"act_order": True})])
def test_gptq_layer_error_is_below_rtn(bits, group_size, symmetric, options):
    x, w = correlated_inputs(), random_weight()
    rtn = output_error(x, w, rtn_weight(w, bits, group_size, symmetric))
    gptq = output_error(x, w, gptq_weight(w, x, bits, group_size, symmetric, block_size=32,
                                          **options))
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_blocking_changes_nothing_but_float_rounding():
    """The lazy-batch update is an exact reordering of the per-column updates: only a few
    codes near a rounding boundary may flip."""
    x, w = correlated_inputs(), random_weight()
    h = InputStats.from_input(x).hessian()
    small = gptq_quantize(w, h, 4, 32, True, block_size=32)
    big = gptq_quantize(w, h, 4, 32, True, block_size=128)
    assert (small[0] != big[0]).float().mean() < 0.01
    errors = [output_error(x, w, grid.dequantize(*q, 32)) for q in (small, big)]
    assert errors[0] == pytest.approx(errors[1], rel=0.01)


@pytest.mark.parametrize("bits,fmt,symmetric", [(4, Int4Linear, True), (4, Int4Linear, False),
                                                (8, Int8Linear, True), (8, Int8Linear, False)])
def test_codes_in_range_and_layer_forward_matches_dequantized(bits, fmt, symmetric):
    x, w = correlated_inputs(), random_weight()
    h = InputStats.from_input(x).hessian()
    codes, scale, zero = gptq_quantize(w, h, bits, 32, symmetric, act_order=True)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1
    assert scale.shape == zero.shape == (96, 4)
    layer = fmt.from_codes(codes, scale, zero, 32, symmetric, None, torch.float32)
    assert torch.equal(layer(x), F.linear(x, grid.dequantize(codes, scale, zero, 32)))


@pytest.mark.parametrize("features", [64, 576, 1536, 1000])
def test_symmetric_gram_is_bit_identical_to_one_matmul(features):
    x = torch.randn(512, features, generator=torch.Generator().manual_seed(features))
    assert torch.equal(gram(x), x.T @ x)


def test_act_order_quantizes_the_largest_hessian_diagonal_first():
    """That column sees no error feedback yet, so its codes are plain round-to-nearest ones on
    the static groups' grid."""
    x = torch.randn(512, 64) * torch.logspace(-1, 1, 64)
    h = InputStats.from_input(x).hessian()
    w = torch.randn(32, 64)
    codes, scale, zero = gptq_quantize(w, h, 4, 16, True, act_order=True)
    first = int(torch.argmax(h.diagonal()))
    assert torch.equal(codes[:, first], grid.quantize(w, scale, zero, 4, 16)[:, first])


def test_damping_is_relative_to_the_mean_diagonal():
    """damp is a fraction of mean(diag H), so scaling the inputs (H by 1e4) scales the inverse
    factor by 1/100 and leaves GPTQ's result unchanged; an absolute damp would not."""
    from compress.quant.gptq import inverse_hessian_factor

    h = InputStats.from_input(correlated_inputs(features=64)).hessian()
    torch.testing.assert_close(inverse_hessian_factor(h * 1e4, 0.01) * 100,
                               inverse_hessian_factor(h, 0.01), rtol=1e-3, atol=1e-6)


def test_dead_columns_get_zero_weights_and_no_nans():
    x, w = correlated_inputs(), random_weight()
    x[:, [5, 70]] = 0.0
    w_hat = gptq_weight(w, x, 4, 32, False)
    assert torch.isfinite(w_hat).all()
    assert (w_hat[:, [5, 70]] == 0).all()
    assert output_error(x, w, w_hat) < output_error(x, w, rtn_weight(w, 4, 32, False))


@pytest.mark.parametrize("symmetric,act_order", [(True, False), (False, False), (False, True)])
def test_keep_mask_holds_a_2_of_4_pattern_exactly(symmetric, act_order):
    x, w = correlated_inputs(), random_weight()
    keep = nm_mask(magnitude_scores(w), 2, 4)
    w = w * keep
    kept = gptq_weight(w, x, 4, 32, symmetric, act_order=act_order, keep=keep)
    assert (kept[~keep] == 0).all() and is_nm(kept != 0, 2, 4, exact=False)
    # Without the mask the error feedback re-fills the pruned weights: the test has teeth.
    refilled = gptq_weight(w, x, 4, 32, symmetric, act_order=act_order)
    assert not is_nm(refilled != 0, 2, 4, exact=False)
    # And holding the zeros still beats rounding the pruned weight to nearest.
    assert output_error(x, w, kept) < output_error(x, w, rtn_weight(w, 4, 32, symmetric))


def test_zeros_are_held_in_a_pruned_model_only(tiny_model, tokens):
    """A dense model's exact zeros are no pattern (one de-quantized from GGUF Q4_0 has ~12%):
    GPTQ holds zeros only after a sparsity pass, which leaves its report on the model."""
    with torch.no_grad():
        tiny_model.model.layers[0].self_attn.o_proj.weight[:, -8:] = 0.0   # 12.5%
    config = GPTQConfig(bits=4, group_size=32, act_order=False)
    calib = CalibrationData(tokens, batch_size=2)
    pruned = copy.deepcopy(tiny_model)
    pruned.compress_report = {"sparsity": {"overall": 0.02}}
    tail = lambda m: m.model.layers[0].self_attn.o_proj.dequantize()[:, -8:]  # noqa: E731
    assert (tail(gptq(copy.deepcopy(tiny_model), config, calib)) != 0).any()
    assert (tail(gptq(pruned, config, calib)) == 0).all()


def test_sparsegpt_then_gptq_keeps_2_of_4_in_every_linear(tiny_model, tokens):
    recipe = recipe_from_dict({"passes": [{"pass": "sparsegpt", "pattern": "2:4"},
                                          {"pass": "gptq", "bits": 4, "group_size": 32}]}, "t")
    model = apply_recipe(tiny_model, recipe, CalibrationData(tokens, batch_size=2))
    for layer in model.model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            assert isinstance(linear, Int4Linear)
            assert is_nm(linear.dequantize() != 0, 2, 4, exact=False)


def _final_norm_input(model, tokens):
    caught = []
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
    with torch.no_grad():
        model(tokens, use_cache=False)
    handle.remove()
    return caught[0]


@pytest.mark.parametrize("batch_size", [4, 2])
def test_driver_with_a_no_op_pass_reproduces_the_model(tiny_model, tokens, batch_size):
    expected = torch.cat([_final_norm_input(tiny_model, b) for b in tokens.split(batch_size)])
    hidden = run_layerwise(tiny_model, tokens, lambda _i, _layer, _forward: None,
                           batch_size=batch_size)
    assert torch.equal(torch.cat(hidden), expected)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_driver_fits_layer_arguments_to_a_short_last_batch(tiny_model, tokens, attention):
    # Eager attention passes a [batch, 1, seq, seq] mask, caught with the first batch of 3; the
    # last batch has 2 samples (1 would broadcast and hide a mismatch).
    model = copy.deepcopy(tiny_model)
    model.set_attn_implementation(attention)
    tokens = torch.cat([tokens, tokens[:1]])
    expected = torch.cat([_final_norm_input(model, b) for b in tokens.split(3)])
    hidden = run_layerwise(model, tokens, lambda _i, _layer, _forward: None, batch_size=3)
    assert [h.shape[0] for h in hidden] == [3, 2]
    torch.testing.assert_close(torch.cat(hidden), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptq_pass_beats_rtn_on_the_tiny_model(true_sequential):
    session = Session.open("random:tiny")
    # Held-out text of the calibration corpus: GPTQ fits the statistics of its calibration data.
    tokens = eval_windows(session.corpus, 128, 4)
    with torch.no_grad():
        reference = session.loaded.model(tokens).logits

    def logits_error(passes):
        recipe = recipe_from_dict({"passes": passes, "calibration": {"samples": 16, "seq_len": 128}},
                                  "t")
        model, _ = compress_model(session, recipe)
        with torch.no_grad():
            return float((model(tokens).logits - reference).norm())

    quant = {"bits": 4, "group_size": 32, "symmetric": False}
    gptq = logits_error([{"pass": "gptq", "true_sequential": true_sequential, **quant}])
    assert gptq < logits_error([{"pass": "rtn", **quant}])


def test_batched_true_sequential_equals_the_one_forward_path(tiny_model, tokens, monkeypatch):
    """Large calibration sets calibrate each group in its own batched forward; the Hessians are
    the same sums in another order, so the quantized layers match up to float rounding."""
    config = GPTQConfig(bits=4, group_size=32, symmetric=True)
    one = gptq_module.gptq(copy.deepcopy(tiny_model), config, CalibrationData(tokens, batch_size=1))
    monkeypatch.setattr(gptq_module, "ONE_FORWARD_MAX_TOKENS", 0)
    batched = gptq_module.gptq(copy.deepcopy(tiny_model), config,
                               CalibrationData(tokens, batch_size=1))
    pairs = [(a, b) for a, b in zip(one.modules(), batched.modules()) if isinstance(a, Int4Linear)]
    assert len(pairs) == 14
    for a, b in pairs:
        wa, wb = a.dequantize(), b.dequantize()
        differ = (wa != wb).float().mean().item()
        assert differ < 0.01                      # a rounding tie flips now and then, no more
        assert (wa - wb).abs().max() <= 1.01 * a.scales.max()   # and by one grid step at most


@pytest.mark.gpu
def test_layers_offloaded_to_the_cpu_calibrate_on_the_gpu(tiny_model, tokens):
    """The model (and the hidden states between layers) stay on the CPU; each layer visits the
    GPU. The result lives on the CPU and is as good as a CPU calibration. Codes are not compared:
    GPU and CPU linear algebra round differently and GPTQ's error feedback carries each change
    along its row (half the codes differed on an H200), so the test compares output errors."""
    config = GPTQConfig(bits=4, group_size=32, symmetric=True)
    cpu = gptq(copy.deepcopy(tiny_model), config, CalibrationData(tokens, batch_size=2))
    offloaded = gptq(copy.deepcopy(tiny_model), config,
                     CalibrationData(tokens, batch_size=2, device="cuda"))
    assert all(t.device.type == "cpu" for t in offloaded.state_dict().values())
    rtn = apply_recipe(copy.deepcopy(tiny_model), recipe_from_dict(
        {"passes": [{"pass": "rtn", "bits": 4, "group_size": 32}]}, "rtn"))
    with torch.no_grad():
        reference = tiny_model(tokens).logits
        error = {name: (m(tokens).logits - reference).pow(2).mean().item()
                 for name, m in (("cpu", cpu), ("offloaded", offloaded), ("rtn", rtn))}
    assert error["offloaded"] <= 1.25 * error["cpu"]
    assert error["offloaded"] < error["rtn"]


def test_cli_gptq_saves_and_reloads_bit_identical(tmp_path, tokens):
    out = tmp_path / "gptq"
    argv = ["quantize", "random:tiny", "--method", "gptq", "--bits", "4", "--group-size", "32",
            "--asymmetric", "--option", "act_order=true", "--calib-samples", "8",
            "--calib-seq-len", "64", "--out", str(out)]
    assert main(argv) == 0
    reloaded = load_model(str(out)).model
    recipe = recipe_from_dict({"passes": [{"pass": "gptq", "bits": 4, "group_size": 32,
                                           "symmetric": False, "act_order": True}],
                               "calibration": {"samples": 8, "seq_len": 64}}, "t")
    in_memory, _ = compress_model(Session.open("random:tiny"), recipe)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, in_memory(tokens).logits)
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, Int4Linear)


@pytest.mark.parametrize("fields,message", [
    ({"damp": 0.0}, "damp must be in (0, 1]"),
    ({"damp": 2}, "damp must be in (0, 1]"),
    ({"block_size": 0}, "block_size must be a positive number of columns"),
    ({"bits": 3}, "bits must be one of 4, 8"),
    ({"group_size": -1}, "group_size must be 0 (per channel) or positive"),
])
def test_bad_config_values_are_one_line_errors(fields, message):
    with pytest.raises(UserError) as caught:
        GPTQConfig(**fields)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_bad_cli_option_is_a_one_line_error(tmp_path, capsys):
    assert main(["quantize", "random:tiny", "--method", "gptq", "--option", "act_order=maybe",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "gptq.act_order must be of type bool" in err and "\n" not in err


@pytest.mark.parametrize("options", [{}, {"act_order": True}])
def test_gptq_rounds_against_the_scales_a_bfloat16_layer_stores(options):
    w, x = random_weight(), correlated_inputs()
    h = InputStats.from_input(x).hessian()
    codes, scale, zero = gptq_quantize(w, h, 4, 32, False, storage_dtype=torch.bfloat16, **options)
    assert torch.equal(scale.to(torch.bfloat16).float(), scale)
    # Still GPTQ: below round-to-nearest on the same stored grid.
    w_hat = grid.dequantize(codes, scale, zero, 32)
    assert output_error(x, w, w_hat) < output_error(
        x, w, grid.fake_quantize(w, 4, False, 32, storage_dtype=torch.bfloat16).float())


def _gptq_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 128, generator=g) \
        + 0.3 * torch.randn(2048, 128, generator=g)
    x[:, :4] *= 8.0
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    return x, w


@pytest.mark.parametrize("group_size,block_size", [(64, 16), (128, 32)])
def test_gptq_blocks_smaller_than_a_group_change_nothing_but_rounding(group_size, block_size):
    """A group's qparams must see every column of the group, even when block_size < group_size
    (the default block of 128 with --group-size 256)."""
    x, w = _gptq_problem()
    h = InputStats.from_input(x).hessian()
    small = gptq_quantize(w, h, 4, group_size, True, block_size=block_size)
    whole = gptq_quantize(w, h, 4, group_size, True, block_size=128)
    assert (small[0] != whole[0]).float().mean() < 0.01
    torch.testing.assert_close(small[1], whole[1], rtol=1e-3, atol=0)


def test_gptq_pass_rounds_against_the_stored_scale_of_a_bfloat16_model(tiny_model, tokens,
                                                                        monkeypatch):
    seen, original = [], gptq_module.gptq_quantize

    def spy(*args, **kwargs):
        seen.append(inspect.signature(original).bind(*args, **kwargs).arguments
                    .get("storage_dtype"))
        return original(*args, **kwargs)

    monkeypatch.setattr(gptq_module, "gptq_quantize", spy)
    gptq_module.gptq(tiny_model.to(torch.bfloat16), gptq_module.GPTQConfig(bits=4, group_size=32),
                     CalibrationData(tokens[:2], batch_size=2))
    assert seen and set(seen) == {torch.bfloat16}
