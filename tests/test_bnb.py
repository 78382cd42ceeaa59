"""bitsandbytes formats: LLM.int8 against its plain-torch reference, NF4/FP4 on their code books,
double quantization, exact save/reload, and config errors."""
import copy

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from compress.errors import UserError  # noqa: E402
from compress.formats.bnb import BnbInt8Linear, BnbNF4Linear, llm_int8_reference  # noqa: E402
from compress.passes import build_config, pass_table  # noqa: E402
from compress.recipe import apply_recipe, recipe_from_dict  # noqa: E402

from apply_pass import apply_pass  # noqa: E402
from reload_exactly import reload_exactly  # noqa: E402


def _linear(in_features=256, out_features=128):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    linear.weight.data.normal_(0, 0.02)
    linear.bias.data.normal_(0, 0.01)
    return linear


def _activations():
    torch.manual_seed(1)
    x = torch.randn(40, 256)
    x[:, [5, 77]] *= 25         # two outlier feature columns, the case LLM.int8 is built for
    return x


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_llm_int8_bnb_kernels_match_the_plain_torch_reference():
    layer = BnbInt8Linear.from_float(_linear(), threshold=6.0)
    x = _activations()
    fast, ref = layer(x), layer.reference_forward(x)
    assert layer.kernel == "bitsandbytes.int8_mixed_scaled_mm"
    assert _rel(fast, ref) < 1e-5


def test_outlier_decomposition_lowers_error():
    linear = _linear()
    x = _activations()
    with_outliers = BnbInt8Linear.from_float(linear, threshold=6.0)
    without = BnbInt8Linear.from_float(linear, threshold=0.0)
    y = linear(x)
    err_mixed, err_int8 = _rel(with_outliers(x), y), _rel(without(x), y)
    assert err_mixed < 0.5 * err_int8
    assert err_mixed < 0.01


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-fp4"])
def test_4bit_weights_lie_on_the_code_book(method):
    spec = pass_table()[method]
    model_cls = {"bnb-nf4": "nf4", "bnb-fp4": "fp4"}[method]
    from compress.formats import FORMATS

    layer = FORMATS[method].from_float(_linear(), 64, False, None)
    assert layer.quant_type == model_cls and spec.config_cls().blocksize == 64
    w = layer.dequantize(torch.float32).reshape(-1, 64)
    codes = w / layer.absmax[:, None]
    distance = (codes[..., None] - layer.quant_map).abs().amin(dim=-1)
    assert distance.max() < 1e-6
    if method == "bnb-nf4":
        assert layer.quant_map[0] == -1 and layer.quant_map[-1] == 1 and 0 in layer.quant_map
    x = torch.randn(3, 7, 256)
    assert _rel(layer(x), layer.reference_forward(x)) < 1e-5
    assert layer.kernel == "bitsandbytes.matmul_4bit"


def test_double_quant_stores_8bit_absmax_and_stays_close():
    linear = _linear()
    plain = BnbNF4Linear.from_float(linear, 64, False, None)
    double = BnbNF4Linear.from_float(linear, 64, True, None)
    assert double.absmax.dtype == torch.uint8 and plain.absmax.dtype == torch.float32
    w = linear.weight.data
    err_plain = _rel(plain.dequantize(torch.float32), w)
    err_double = _rel(double.dequantize(torch.float32), w)
    assert err_plain < 0.12 and err_double < err_plain * 1.05


@pytest.mark.parametrize("method,fields", [("bnb-int8", {}), ("bnb-nf4", {"double_quant": True}),
                                           ("bnb-fp4", {"blocksize": 32})])
def test_bnb_checkpoint_reloads_bit_identical(tiny, tokens, tmp_path, method, fields):
    model = apply_pass(tiny.model, method, **fields)
    reloaded, _ = reload_exactly(model, tokens, tmp_path / method)
    original_layer = model.model.layers[1].mlp.down_proj
    layer = reloaded.model.layers[1].mlp.down_proj
    assert type(layer) is type(original_layer) and layer.spec() == original_layer.spec()


@pytest.mark.parametrize("method,fields,message", [
    ("bnb-nf4", {"blocksize": 48}, "blocksize must be one of"),
    ("bnb-fp4", {"compute_dtype": "int8"}, "compute_dtype must be one of"),
    ("bnb-int8", {"threshold": -1.0}, "threshold must be a finite number >= 0"),
    ("bnb-int8", {"threshold": float("nan")}, "threshold must be a finite number >= 0"),
])
def test_bad_options_are_user_errors(method, fields, message):
    with pytest.raises(UserError, match=message):
        build_config(pass_table()[method], fields)


def test_compute_dtype_bfloat16_runs_in_bfloat16():
    layer = BnbNF4Linear.from_float(_linear(), 64, False, "bfloat16")
    x = torch.randn(4, 256)
    y = layer(x)
    assert y.dtype == torch.float32
    assert _rel(y, layer.reference_forward(x)) < 1e-2
    assert layer.spec()["compute_dtype"] == "bfloat16"


def test_llm_int8_reference_without_outliers_is_plain_vectorwise_int8():
    linear = _linear()
    layer = BnbInt8Linear.from_float(linear, threshold=6.0)
    x = torch.randn(9, 256)     # nothing reaches 6.0 here
    assert x.abs().max() < 6.0
    out = llm_int8_reference(x, layer.qweight, layer.scales, 6.0, layer.bias)
    assert _rel(out, linear(x)) < 0.02


def test_parameter_count_of_bitsandbytes_4bit_params_is_the_weight_shape(tiny):
    # Params4bit (transformers' bnb-nf4 peer) holds two codes per byte: numel counts bytes.
    import bitsandbytes as bnb

    from compress.evaluate.memory import parameter_count

    model = copy.deepcopy(tiny.model)
    before = parameter_count(model)
    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.up_proj.weight = bnb.nn.Params4bit(mlp.up_proj.weight.detach().bfloat16(),
                                               requires_grad=False, blocksize=64,
                                               quant_type="nf4").to("cpu")
        assert mlp.up_proj.weight.numel() < mlp.up_proj.in_features * mlp.up_proj.out_features
    assert parameter_count(model) == before


def test_llm_int8_reference_of_a_zero_token_is_the_bias_not_nan():
    linear = _linear()
    nn.init.normal_(linear.bias)
    layer = BnbInt8Linear.from_float(linear, threshold=6.0)
    x = torch.zeros(2, linear.in_features, dtype=torch.float16)
    x[1, :3] = 50.0                                   # a token whose every nonzero is an outlier
    out = layer.reference_forward(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0].float(), linear.bias.float(), rtol=1e-3, atol=1e-3)


def test_bnb_int8_threshold_reaches_the_layers(tiny_model):
    model = apply_recipe(tiny_model, recipe_from_dict(
        {"passes": [{"pass": "bnb-int8", "threshold": 0.0}]}, "t"))
    layers = [m for m in model.modules() if isinstance(m, BnbInt8Linear)]
    assert layers and all(m.threshold == 0.0 for m in layers)


def test_bnb_4bit_blocksize_reaches_the_layers(tiny_model):
    model = apply_recipe(tiny_model, recipe_from_dict(
        {"passes": [{"pass": "bnb-nf4", "blocksize": 128}]}, "t"))
    layers = [m for m in model.modules() if isinstance(m, BnbNF4Linear)]
    assert layers and all(m.group_size == 128 for m in layers)


@pytest.mark.parametrize("method,fields", [("bnb-int8", {"threshold": 2.0}),
                                           ("bnb-int8", {"threshold": 0.0}),
                                           ("bnb-nf4", {"compute_dtype": "bfloat16"})])
def test_bnb_options_survive_a_checkpoint(tiny, tokens, tmp_path, method, fields):
    (key, value), = fields.items()
    reloaded, meta = reload_exactly(apply_pass(tiny.model, method, **fields), tokens,
                                    tmp_path / "q")
    assert meta["modules"]["model.layers.1.mlp.down_proj"][key] == value
    assert getattr(reloaded.model.layers[1].mlp.down_proj, key) == value
