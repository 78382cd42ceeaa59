"""FP8 (e4m3) W8A8: round-trip error, reference vs float, the _scaled_mm path, the pass and reload."""
import pytest
import torch
from torch import nn

from compress.errors import UserError
from compress.formats.fp8 import FP8, FP8Linear, fake_quantize_rows_fp8, fp8_capable, quantize_rows_fp8
from compress.quant.fp8 import FP8Config, check_fp8_device, fp8

from reload_exactly import reload_exactly


def _linear(in_features=256, out_features=96):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    linear.weight.data.normal_(0, 0.02)
    return linear


def test_e4m3_round_trip_error_bound():
    """e4m3 keeps 3 mantissa bits: a normal value is off by at most 2**-4 of itself; below the
    smallest normal (2**-6 of the scale) the subnormal step is 2**-9, so half of it, 2**-10."""
    x = torch.randn(64, 512) * torch.logspace(-3, 2, 64)[:, None]
    q, scale = quantize_rows_fp8(x)
    assert q.dtype == FP8 and scale.shape == (64, 1)
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((64,), 448.0))
    err = (fake_quantize_rows_fp8(x) - x).abs()
    bound = torch.maximum(x.abs() * 2 ** -4, scale * 2 ** -10)
    assert torch.all(err <= bound * (1 + 1e-6))


def test_fp8_linear_close_to_float():
    linear = _linear()
    layer = FP8Linear.from_float(linear)
    x = torch.randn(3, 20, 256)
    y, y_float = layer(x), linear(x)
    assert layer.kernel == ("torch._scaled_mm" if fp8_capable(x.device) else "reference")
    sqnr = 10 * torch.log10(y_float.pow(2).sum() / (y - y_float).pow(2).sum())
    assert sqnr > 25        # two e4m3 roundings (about 31 dB each) on a random layer


def test_scaled_mm_matches_the_reference():
    """The fast path's call (operand layout, row-wise scales) against the reference. torch runs
    _scaled_mm on CPU too (emulated), so this checks the call convention without a GPU."""
    layer = FP8Linear.from_float(_linear())
    x = torch.randn(2, 24, 256)
    try:
        fast = layer.fast_forward(x)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._scaled_mm does not run on CPU in this torch: {exc}")
    ref = layer.reference_forward(x)
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fp8_pass_reloads_bit_identical(tiny, tokens, tmp_path):
    reloaded, _ = reload_exactly(fp8(tiny.model, FP8Config()), tokens, tmp_path / "fp8")
    layer = reloaded.model.layers[1].mlp.up_proj
    assert isinstance(layer, FP8Linear) and layer.qweight.dtype == FP8


def test_cpu_is_allowed_for_the_reference_path():
    check_fp8_device("cpu")


@pytest.mark.gpu
def test_cuda_uses_scaled_mm_or_refuses(tiny):
    model = tiny.model.to("cuda", torch.bfloat16)
    if not fp8_capable("cuda"):
        with pytest.raises(UserError, match="compute capability"):
            fp8(model, FP8Config())
        return
    model = fp8(model, FP8Config())
    tokens = torch.randint(1, 256, (2, 64), device="cuda")
    with torch.no_grad():
        model(tokens)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.kernel == "torch._scaled_mm"
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    fast, ref = layer.fast_forward(x).float(), layer.reference_forward(x).float()
    assert (fast - ref).abs().max() <= 2e-2 * ref.abs().max()   # bf16 output rounding
