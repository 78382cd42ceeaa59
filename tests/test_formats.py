"""Int8Linear / Int4Linear: fast forward equals the reference, reference equals dequantize+matmul."""
import pytest
import torch
from torch import nn

from compress.formats import grid
from compress.formats.int4 import Int4Linear
from compress.formats.int8 import Int8Linear
from compress.quant.rtn import quantized_linear


def _linear(out_features=96, in_features=128, bias=False):
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.weight.data.normal_(0, 0.02)
    return layer


@pytest.mark.parametrize("bits,cls", [(8, Int8Linear), (4, Int4Linear)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, 32])
def test_quantized_linear_matches_dequantized_matmul(bits, cls, symmetric, group_size):
    layer = _linear(bias=True)
    q = quantized_linear(layer, bits, group_size, symmetric)
    assert isinstance(q, cls)
    x = torch.randn(3, 5, 128)
    expected = x @ grid.fake_quantize(layer.weight.data, bits, symmetric, group_size).T + layer.bias
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.reference_forward(x), expected, rtol=1e-5, atol=1e-5)


def test_int8_per_channel_uses_the_int8_kernel_and_agrees_with_reference():
    q = quantized_linear(_linear(), 8, 0, True)
    x = torch.randn(7, 128)
    fast = q(x)
    assert q.kernel == "torch._weight_int8pack_mm"
    torch.testing.assert_close(fast, q.reference_forward(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_storage_is_really_smaller(bits):
    layer = _linear(out_features=256, in_features=512)
    q = quantized_linear(layer, bits, 64, True)
    stored = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    float_bytes = layer.weight.numel() * 4
    # codes: bits/8 bytes per weight; scales: one float32 per 64 weights.
    assert stored == layer.weight.numel() * bits // 8 + 256 * (512 // 64) * 4
    assert stored < float_bytes * (bits / 32 + 0.07)
