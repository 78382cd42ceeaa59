"""Integer grids and int4 packing: exact round trips and bounded quantization error."""
import pytest
import torch

from compress.errors import UserError
from compress.formats import grid
from compress.formats.int4 import pack_int4, unpack_int4


def test_int4_pack_unpack_round_trips_every_code():
    q = torch.randint(0, 16, (37, 128), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (37, 64) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)


def test_pack_rejects_odd_width():
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, 32])
def test_quantize_dequantize_error_is_within_half_a_step(bits, symmetric, group_size):
    w = torch.randn(48, 128) * 0.02
    scale, zero = grid.compute_qparams(w, bits, symmetric, group_size)
    q = grid.quantize(w, scale, zero, bits, group_size)
    assert int(q.max()) <= 2 ** bits - 1
    back = grid.dequantize(q, scale, zero, group_size)
    step = scale.repeat_interleave(128 // scale.shape[1], dim=1)
    err = (back - w).abs()
    # Every value inside the grid is off by at most half a step; symmetric grids clip only the
    # positive maximum, which lands one half step below it.
    assert torch.all(err <= 0.5 * step + 1e-7)


@pytest.mark.parametrize("bits,min_sqnr_db", [(8, 38.0), (4, 14.0)])
def test_signal_to_quantization_noise(bits, min_sqnr_db):
    w = torch.randn(256, 256)
    back = grid.fake_quantize(w, bits, True, 64 if bits == 4 else 0)
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - back).pow(2).sum())
    assert sqnr > min_sqnr_db


def test_group_size_must_divide_width():
    with pytest.raises(UserError, match="does not divide the input width 576"):
        grid.check_group_size("layer", 576, 128)
    grid.check_group_size("layer", 576, 64)


@pytest.mark.parametrize("bits,levels", [(4, 7.5), (8, 127.5)])
def test_symmetric_scale_spans_the_whole_grid(bits, levels):
    """The symmetric grid's convention: scale = amax / (maxq / 2), so codes 0..maxq around the
    midpoint cover [-amax, amax] (an integer half, amax / 7 for int4, would waste a level)."""
    w = torch.randn(4, 64)
    scale, _ = grid.compute_qparams(w, bits, True, 0)
    assert torch.allclose(scale[:, 0], w.abs().amax(1) / levels)


def test_asymmetric_grid_of_all_positive_weights_keeps_zero_and_half_a_step():
    """A group with no negative weight: the grid still holds 0 (lo clamped to <= 0) and every
    weight is within half a step."""
    w = torch.rand(4, 64) + 0.5
    scale, zero = grid.compute_qparams(w, 4, False, 32)
    back = grid.dequantize(grid.quantize(w, scale, zero, 4, 32), scale, zero, 32)
    assert ((back - w).abs() <= 0.5 * scale.repeat_interleave(32, 1) + 1e-7).all()
    assert grid.dequantize(zero.round().to(torch.uint8).repeat_interleave(32, 1), scale, zero,
                           32).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,symmetric,group_size", [(8, True, 0), (8, False, 32), (4, True, 64),
                                                       (4, False, 64)])
def test_codes_are_nearest_on_the_scale_the_layer_stores(dtype, bits, symmetric, group_size):
    """A half-precision layer stores its scales in that dtype: the codes must be rounded against
    that stored scale, not the float32 one it was computed as (int8 per channel in bfloat16 had
    2.65x the weight error it needed)."""
    from compress.quant.rtn import quantized_linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=False).to(dtype)
    layer = quantized_linear(linear, bits, group_size, symmetric)
    stored = layer.scales.float()
    scale, zero = grid.compute_qparams(linear.weight.data, bits, symmetric, group_size,
                                       storage_dtype=dtype)
    assert torch.equal(scale, stored)              # what the codes were chosen against
    size = group_size or 128
    codes = grid.quantize(linear.weight.data, scale, zero, bits, group_size).float()
    exact = linear.weight.data.float() / stored.repeat_interleave(size, 1) + \
        zero.repeat_interleave(size, 1)
    inside = (exact >= 0) & (exact <= 2 ** bits - 1)
    assert inside.float().mean() > 0.95
    assert ((codes - exact).abs()[inside] <= 0.5 + 1e-4).all()
    assert torch.equal(layer.dequantize(dtype), grid.fake_quantize(linear.weight.data, bits,
                                                                  symmetric, group_size))


def test_an_all_zero_group_keeps_a_nonzero_stored_scale():
    scale, zero = grid.compute_qparams(torch.zeros(2, 64), 4, False, 32,
                                       storage_dtype=torch.float16)
    assert (scale > 0).all() and torch.isfinite(scale).all()
    assert int(grid.quantize(torch.zeros(2, 64), scale, zero, 4, 32).max()) == int(zero.max())


@pytest.mark.parametrize("bits,group_size", [(8, 0), (4, 32)])
def test_a_float16_layer_of_small_weights_keeps_its_own_scale(bits, group_size):
    """float16 stores scales down to 6e-8 (subnormals): a row of small weights must get the
    scale it needs, not one floored at float16's smallest normal (6.1e-5), which put int8 per
    channel (int4 g32) on a grid too coarse for rows (groups) with max |w| below 7.8e-3 (4.6e-4)."""
    from compress.quant.rtn import quantized_linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 4, bias=False)
    linear.weight.data = (torch.randn(4, 128) * 1e-4).half()
    w = linear.weight.data.double()
    err16 = (quantized_linear(linear, bits, group_size, True).dequantize(torch.float64) - w).norm()
    err32 = (quantized_linear(linear.float(), bits, group_size, True).dequantize(torch.float64)
             - w).norm()
    assert err16 < 1.1 * err32


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_scale_spans_the_range_in_maxq_steps(bits):
    """Asymmetric: scale = (max(w, 0) - min(w, 0)) / (2**bits - 1), the whole code range used."""
    w = torch.randn(8, 64)
    scale, zero = grid.compute_qparams(w, bits, False, 32)
    g = w.reshape(8, 2, 32)
    expected = (g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)) / (2 ** bits - 1)
    torch.testing.assert_close(scale, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(zero, torch.round(-g.amin(-1).clamp(max=0) / expected))


@pytest.mark.parametrize("ratio", [0.5, 0.85])
def test_asymmetric_clip_ratio_shrinks_both_ends_of_the_range(ratio):
    """AWQ's clip ratio on an asymmetric grid: the grid of the weights scaled by the ratio."""
    w = torch.randn(8, 64)
    clipped = grid.compute_qparams(w, 4, False, 32, clip_ratio=ratio)
    shrunk = grid.compute_qparams(w * ratio, 4, False, 32)
    torch.testing.assert_close(clipped[0], shrunk[0], rtol=1e-6, atol=0)
    assert torch.equal(clipped[1], shrunk[1])
