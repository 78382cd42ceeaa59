"""Calibration forwards in bfloat16 (CalibrationSettings.dtype): the layers compute in it, every
statistic and compression step stays float32, and the passes keep their guarantees."""
import copy

import pytest
import torch

from compress.calibration import collect_linear_inputs, run_layerwise
from compress.data import eval_windows
from compress.pipeline import Session, compress_model
from compress.prune.masks import is_nm
from compress.quant.stats import InputStats, gram
from compress.recipe import recipe_from_dict

from apply_pass import apply_pass


def test_layers_compute_in_bfloat16_and_hand_on_float32(tiny_model, tokens):
    seen = []
    handle = tiny_model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda _m, _args, output: seen.append(output.dtype))
    try:
        half = run_layerwise(copy.deepcopy(tiny_model), tokens, lambda *_: None, batch_size=2,
                             compute_dtype=torch.bfloat16)
    finally:
        handle.remove()
    full = run_layerwise(copy.deepcopy(tiny_model), tokens, lambda *_: None, batch_size=2)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert all(h.dtype == torch.float32 for h in half)
    error = (torch.cat(half) - torch.cat(full)).norm() / torch.cat(full).norm()
    assert 0 < error < 2e-2      # bfloat16 rounding (8 bits of mantissa), no more


def test_hook_statistics_stay_float32_under_bfloat16(tiny_model, tokens):
    """The Gram matrix a hook accumulates equals float32 x^T x of the very input it saw; computed
    under the forward's autocast it would be a bfloat16 product, not even positive semi-definite
    on SmolLM2 (GPTQ's Cholesky failed)."""
    inputs, stats = [], InputStats()

    def accumulate(_name, x):
        inputs.append(x.clone())
        stats.add(x)

    def compress_layer(index, layer, forward):
        if index == 0:
            collect_linear_inputs({"o": layer.self_attn.o_proj}, forward, accumulate)

    run_layerwise(tiny_model, tokens, compress_layer, batch_size=4, compute_dtype=torch.bfloat16)
    x = inputs[0]
    assert x.dtype == torch.bfloat16          # o_proj reads attention computed in bfloat16
    assert stats.sum_xx.dtype == torch.float32
    assert torch.equal(stats.sum_xx, gram(x.float()))
    smallest = torch.linalg.eigvalsh(stats.sum_xx.double()).min()
    assert smallest > -1e-6 * stats.sum_xx.diagonal().max()


def _calibrated(session, passes, dtype=None):
    calibration = {"samples": 16, "seq_len": 128, **({"dtype": dtype} if dtype else {})}
    recipe = recipe_from_dict({"passes": passes, "calibration": calibration}, "t")
    return compress_model(session, recipe)[0]


def test_gptq_calibrated_in_bfloat16_still_beats_rtn():
    session = Session.open("random:tiny")
    tokens = eval_windows(session.corpus, 128, 4)
    with torch.no_grad():
        reference = session.loaded.model(tokens).logits

    def logits_error(model):
        with torch.no_grad():
            return float((model(tokens).logits - reference).norm())

    quant = {"bits": 4, "group_size": 32, "symmetric": False}
    half = logits_error(_calibrated(session, [{"pass": "gptq", **quant}], "bfloat16"))
    full = logits_error(_calibrated(session, [{"pass": "gptq", **quant}]))
    rtn = logits_error(_calibrated(session, [{"pass": "rtn", **quant}]))
    assert half < rtn
    assert half < 1.2 * full


@pytest.mark.parametrize("prune", [{"pass": "sparsegpt", "pattern": "2:4"},
                                   {"pass": "wanda", "pattern": "2:4"}])
def test_pruning_calibrated_in_bfloat16_keeps_its_pattern(prune):
    session = Session.open("random:tiny")
    seen = []   # the hook travels with the copy compress_model makes of the source model
    session.loaded.model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda _m, _args, output: seen.append(output.dtype))
    model = _calibrated(session, [prune], "bfloat16")
    assert seen and set(seen) == {torch.bfloat16}
    linears = [layer.mlp.down_proj for layer in model.model.layers]
    assert linears and all(is_nm(linear.weight != 0, 2, 4) for linear in linears)
    assert all(linear.weight.dtype == torch.float32 for linear in linears)


def test_dtype_is_in_the_recipe_hash_only_when_set():
    plain = recipe_from_dict({"passes": [{"pass": "gptq"}]}, "t").resolved()
    half = recipe_from_dict({"passes": [{"pass": "gptq"}], "calibration": {"dtype": "bfloat16"}},
                            "t").resolved()
    assert "dtype" not in plain["calibration"] and half["calibration"]["dtype"] == "bfloat16"
    assert plain["hash"] != half["hash"]


def test_reports_say_the_calibration_forwards_dtype():
    from compress.reports.content import _recipe_table

    def result(dtype):
        calibration = {"samples": 64, "seq_len": 512, "source": "second half of the stream",
                       **({"dtype": dtype} if dtype else {})}
        return {"recipe": {"name": "g", "hash": "h", "passes": [{"pass": "gptq", "bits": 4}]},
                "protocol": {"calibration": calibration}}

    _, _, rows = _recipe_table([result("bfloat16"), result(None)])
    assert rows[0][3].endswith(", forwards in bfloat16")
    assert rows[1][3] == "64 x 512 tokens, second half of the stream"


@pytest.mark.parametrize("fmt", [{"pass": "rtn", "bits": 4, "group_size": 32},
                                 {"pass": "rtn", "bits": 8, "group_size": 0},
                                 {"pass": "fp8"}])   # w8a8 (smoothquant): below
def test_quantized_layers_answer_in_the_autocast_dtype_as_nn_linear_does(fmt):
    """A float16 model calibrated in bfloat16: a layer quantized earlier in the pass must hand on
    bfloat16, as the nn.Linear it replaced did, or autocast meets two half dtypes and fails."""
    session = Session.open("random:tiny", dtype=torch.float16)
    model = copy.deepcopy(session.loaded.model)
    model = apply_pass(model, fmt["pass"], **{k: v for k, v in fmt.items() if k != "pass"})
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, layer.in_features, dtype=torch.float16)
    with torch.no_grad():
        plain = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lowered = layer(x)
            linear = torch.nn.functional.linear(x, torch.zeros(3, layer.in_features,
                                                               dtype=torch.float16))
    assert plain.dtype == torch.float16 and lowered.dtype == linear.dtype == torch.bfloat16
    torch.testing.assert_close(lowered.float(), plain.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("passes", [[{"pass": "smoothquant"}],
                                    [{"pass": "awq", "bits": 4, "group_size": 32}]])
def test_a_float16_model_calibrates_in_bfloat16(passes):
    session = Session.open("random:tiny", dtype=torch.float16)
    model = _calibrated(session, passes, "bfloat16")
    tokens = eval_windows(session.corpus, 32, 2)
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("sliding", [False, True])
def test_the_driver_refuses_layers_with_different_attention_masks(sliding):
    """Layer 0's kwargs (its mask) serve every layer: exact for one mask type, wrong for a model
    mixing full and sliding-window layers, which is refused rather than miscalibrated."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from compress.errors import UserError

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                         use_sliding_window=sliding, sliding_window=4, max_window_layers=1)
    model = Qwen2ForCausalLM(config).eval()
    x = torch.randint(1, 320, (3, 16))
    if sliding:
        with pytest.raises(UserError, match="mixes full_attention, sliding_attention layers"):
            run_layerwise(model, x, lambda *_: None, batch_size=2)
        return
    with torch.no_grad():
        full = model.model(x).last_hidden_state
    out = torch.cat(run_layerwise(model, x, lambda *_: None, batch_size=2))
    assert torch.equal(model.model.norm(out), full)
