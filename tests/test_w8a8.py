"""SmoothQuant W8A8 int8: the int8 matmul against float, smoothing as an exact identity, the pass,
reload and the CLI."""
import copy
import json

import pytest
import torch
from torch import nn

from compress.adapters import adapter_for
from compress.calibration import CalibrationData, collect_linear_inputs, run_layerwise
from compress.cli import main
from compress.errors import UserError
from compress.formats.w8a8 import (CUDA_MIN_ROWS, W8A8Linear, fake_quantize_rows, int_mm_padded,
                                   quantize_rows)
from compress.passes import build_config, pass_table
from compress.quant.smoothquant import (SmoothQuantConfig, quantize_layer, smooth_layer,
                                        smoothing_scales, smoothquant, update_channel_absmax)

from reload_exactly import reload_exactly


def _linear(in_features=256, out_features=96, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=True)
    linear.weight.data.normal_(0, 0.02)
    linear.bias.data.normal_(0, 0.01)
    return linear


def test_row_quantization_is_within_half_a_step():
    x = torch.randn(40, 128) * torch.logspace(-2, 1, 40)[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scale.shape == (40, 1)
    assert torch.all((fake_quantize_rows(x) - x).abs() <= scale / 2 + 1e-7)


def test_an_all_zero_row_quantizes_to_zero_codes_with_a_finite_scale():
    """A padding token or a dead output channel: 0 / 0 must not reach the int8 cast (casting NaN
    is undefined behaviour, 0 only by chance on some CPUs)."""
    x = torch.randn(3, 64)
    x[1] = 0.0
    q, scale = quantize_rows(x)
    assert torch.isfinite(scale).all() and scale[1] > 0
    assert torch.equal(q[1], torch.zeros(64, dtype=torch.int8))


def test_int8_matmul_error_within_the_rounding_bound():
    """|y - y_ref| <= sum_i |dx_i||w_i| + |x_i||dw_i| + |dx_i||dw_i|, with |dx| <= sx/2 and
    |dw| <= sw/2 per element: the bound follows from the rounding steps alone."""
    linear = _linear()
    x = torch.randn(33, 256)
    x[:, 7] *= 30          # an outlier channel, as LLM activations have
    layer = W8A8Linear.from_float(linear)
    y_float = linear(x)
    y = layer.reference_forward(x)
    sx = quantize_rows(x)[1]                    # [tokens, 1]
    sw = layer.scales.t()                       # [1, out]
    bound = (sx / 2) * linear.weight.abs().sum(1)[None, :] + (sw / 2) * x.abs().sum(1, keepdim=True) \
        + sx * sw / 4 * x.shape[1]
    assert torch.all((y - y_float).abs() <= bound + 1e-6)
    sqnr = 10 * torch.log10(y_float.pow(2).sum() / (y - y_float).pow(2).sum())
    assert sqnr > 20


def test_fast_int_mm_equals_the_reference_up_to_float_rounding():
    """torch._int_mm (exact int32 sums) against the float reference: same numbers, summed in a
    different order, so they agree to float32 rounding (1e-5 of the output scale)."""
    layer = W8A8Linear.from_float(_linear())
    for tokens in (1, 17, 40):          # includes shapes cuBLAS would refuse (m <= 16)
        x = torch.randn(2, tokens, 256)
        fast, ref = layer.fast_forward(x), layer.reference_forward(x)
        assert fast.shape == (2, tokens, 96)
        assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    layer(x)   # 80 rows: the CPU runs _int_mm where it has fast int8 matmuls (AVX512-VNNI / AMX)
    assert layer.kernel == ("torch._int_mm" if layer.cpu_fast_int8 else "reference")


def test_zero_row_padding_leaves_the_int8_product_unchanged():
    """Decode on CUDA pads m <= 16 rows up to cuBLAS' minimum: the real rows must be exact."""
    torch.manual_seed(1)
    qw_t = torch.randint(-127, 128, (256, 96), dtype=torch.int8)
    for rows in (1, 5, CUDA_MIN_ROWS - 1, CUDA_MIN_ROWS, 40):
        qx = torch.randint(-127, 128, (rows, 256), dtype=torch.int8)
        padded = int_mm_padded(qx, qw_t, CUDA_MIN_ROWS)
        assert padded.shape == (rows, 96) and padded.dtype == torch.int32
        assert torch.equal(padded, qx.int() @ qw_t.int())


@pytest.mark.gpu
def test_cuda_int_mm_serves_decode_shapes():
    """On a GPU every batch size, decode's m = 1 included, runs the int8 tensor-core path."""
    layer = W8A8Linear.from_float(_linear()).cuda()
    for tokens in (1, 8, 40):
        x = torch.randn(1, tokens, 256, device="cuda")
        y = layer(x)
        assert layer.kernel == "torch._int_mm"
        ref = layer.reference_forward(x)
        assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_smoothing_scales_follow_the_formula():
    act, w = torch.tensor([4.0, 9.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_scales(act, w, alpha=0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 1.5]))
    assert s[2] == 1.0                  # a dead channel is left alone
    assert torch.allclose(smoothing_scales(act, w, 1.0)[:2], act[:2])


def _smooth_only(model, samples, smooth_down):
    adapter = adapter_for(model)

    def compress_layer(_index, layer, forward):
        stats = {}
        watched = {"attention": layer.self_attn.q_proj, "mlp": layer.mlp.gate_proj,
                   "down": layer.mlp.down_proj}
        collect_linear_inputs(watched, forward,
                              lambda k, x: stats.__setitem__(k, update_channel_absmax(stats.get(k), x)))
        smooth_layer(layer, adapter, stats, 0.5, smooth_down)

    run_layerwise(model, samples, compress_layer, batch_size=2)


@pytest.mark.parametrize("smooth_down", [False, True])
def test_smoothing_leaves_the_float_function_unchanged(tiny_model, tokens, smooth_down):
    with torch.no_grad():
        before = tiny_model(tokens).logits
        norm_before = tiny_model.model.layers[0].input_layernorm.weight.clone()
        _smooth_only(tiny_model, tokens, smooth_down)
        after = tiny_model(tokens).logits
    assert not torch.equal(norm_before, tiny_model.model.layers[0].input_layernorm.weight)
    assert (after - before).norm() / before.norm() < 1e-5


def _with_outlier_channels(model):
    """Give a few hidden channels large activations, as trained LLMs have (random ones do not)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 40.0
            layer.post_attention_layernorm.weight[[5, 40]] = 40.0
    return model


def test_smoothing_lowers_w8a8_error_when_activations_have_outliers(tiny_model, tokens):
    model = _with_outlier_channels(tiny_model)
    with torch.no_grad():
        reference = model(tokens).logits
        plain = copy.deepcopy(model)
        for layer in plain.model.layers:
            quantize_layer(layer, adapter_for(plain))
        smoothed = smoothquant(copy.deepcopy(model), SmoothQuantConfig(alpha=0.5),
                               CalibrationData(tokens, batch_size=2))
        err_plain = (plain(tokens).logits - reference).norm()
        err_smooth = (smoothed(tokens).logits - reference).norm()
    assert isinstance(smoothed.model.layers[1].mlp.down_proj, W8A8Linear)
    assert err_smooth < 0.7 * err_plain


def test_w8a8_checkpoint_reloads_bit_identical(tiny, tokens, tmp_path):
    model = smoothquant(tiny.model, SmoothQuantConfig(), CalibrationData(tokens[:2], batch_size=2))
    reloaded, _ = reload_exactly(model, tokens, tmp_path / "sq")
    layer = reloaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, W8A8Linear) and layer.qweight.dtype == torch.int8


def test_alpha_out_of_range_is_a_user_error():
    with pytest.raises(UserError, match="alpha must be between 0 and 1"):
        build_config(pass_table()["smoothquant"], {"alpha": 1.5})


def test_cli_smoothquant_end_to_end(tmp_path):
    out = tmp_path / "sq"
    assert main(["quantize", "random:tiny", "--method", "smoothquant", "--option", "alpha=0.6",
                 "--out", str(out), "--eval", "--calib-samples", "4", "--calib-seq-len", "64",
                 "--windows", "2", "--seq-len", "64"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"]["passes"] == [{"pass": "smoothquant", "alpha": 0.6,
                                            "smooth_down": True}]
    assert results["protocol"]["calibration"]["samples"] == 4
    meta = json.loads((out / "compress.json").read_text())
    formats = {spec["format"] for spec in meta["modules"].values()}
    assert formats == {"w8a8-int8"} and len(meta["modules"]) == 14


def test_activation_absmax_is_over_every_batch():
    """The outlier of the first calibration batch sets its channel's max, not the last batch."""
    first, second = torch.randn(8, 16), torch.randn(8, 16)
    first[0, 3] = 50.0
    running = update_channel_absmax(update_channel_absmax(None, first), second)
    assert torch.equal(running, torch.cat([first, second]).abs().amax(0))


def _first_layer_q_input_absmax(model, tokens):
    seen = []
    h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).abs().amax(0)))
    with torch.no_grad():
        for batch in tokens.split(2):
            model(batch)
    h.remove()
    return torch.stack(seen).amax(0)


@pytest.mark.parametrize("alpha", [0.25, 0.8])
def test_smoothquant_alpha_sets_the_first_layer_scales(tiny_model, tokens, alpha):
    """Layer 0 reads the embeddings, the same in the float and the smoothed model: its input norm
    must be divided by exactly s = max|X|^alpha / max|W|^(1 - alpha) for the alpha asked."""
    act = _first_layer_q_input_absmax(tiny_model, tokens)
    attn = tiny_model.model.layers[0].self_attn
    wmax = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).abs().amax(0)
    norm = tiny_model.model.layers[0].input_layernorm.weight.detach().clone()
    model = smoothquant(copy.deepcopy(tiny_model), SmoothQuantConfig(alpha=alpha),
                        CalibrationData(tokens, batch_size=2))
    expected = norm / smoothing_scales(act, wmax.detach(), alpha)
    torch.testing.assert_close(model.model.layers[0].input_layernorm.weight.detach(), expected,
                               rtol=1e-5, atol=1e-7)


def test_smoothquant_smooth_down_false_leaves_down_proj_unscaled(tiny_model, tokens):
    downs = [W8A8Linear.from_float(layer.mlp.down_proj) for layer in tiny_model.model.layers]
    model = smoothquant(copy.deepcopy(tiny_model), SmoothQuantConfig(smooth_down=False),
                        CalibrationData(tokens, batch_size=2))
    for expected, layer in zip(downs, model.model.layers):
        assert torch.equal(layer.mlp.down_proj.qweight, expected.qweight)
        assert torch.equal(layer.mlp.down_proj.scales, expected.scales)
