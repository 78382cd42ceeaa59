"""The Triton GEMV (compress/formats/triton_gemv.py) against the dequantized reference: on the CPU
through Triton's interpreter where Triton is installed, on CUDA (compiled too) in the GPU tests."""
import os

import pytest
import torch
from torch import nn

from compress.errors import UserError
from compress.formats.triton_gemv import TRITON_GEMV, plan
from compress.formats.w8a8 import W8A8Linear
from compress.quant.rtn import quantized_linear

# int4 / int8, symmetric / not, grouped / per channel; widths that are not multiples of the
# kernel's blocks (70 rows, 600 columns) and a split that leaves the last program past K.
CASES = [(4, 64, True, 96, 576), (4, 32, False, 40, 160), (8, 0, True, 70, 600),
         (8, 0, False, 33, 300), (8, 64, False, 48, 192)]


def _layer(bits, group_size, symmetric, out_features, in_features, device):
    torch.manual_seed(out_features)
    linear = nn.Linear(in_features, out_features, bias=True)
    return quantized_linear(linear, bits, group_size, symmetric).to(device, torch.bfloat16)


def _reference(layer, x):
    return nn.functional.linear(x.float(), layer.dequantize(torch.float32), layer.bias.float())


@pytest.fixture
def interpreted():
    """Triton's interpreter on the CPU: tests/conftest.py turns it on when there is no GPU."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU machine): the GPU tests cover the kernel")


@pytest.mark.parametrize("bits,group_size,symmetric,out_features,in_features", CASES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_matches_the_reference_in_the_interpreter(interpreted, bits, group_size, symmetric,
                                                       out_features, in_features, split_k):
    layer = _layer(bits, group_size, symmetric, out_features, in_features, "cpu")
    x = torch.randn(1, in_features, dtype=torch.bfloat16)
    gemv = plan(out_features, in_features, bits, group_size, torch.device("cpu"), block_n=16,
                split_k=split_k)
    out = gemv(x, layer.qweight, layer.scales, layer.zeros).float() + layer.bias.float()
    ref = _reference(layer, x)
    assert (out - ref).norm() / ref.norm() < 1e-2


def test_a_layer_runs_it_for_one_row_only_once_chosen(interpreted):
    layer = _layer(4, 64, True, 96, 576, "cpu")
    one, two = torch.randn(1, 1, 576, dtype=torch.bfloat16), torch.randn(2, 576).bfloat16()
    layer(one)
    assert layer.kernel != TRITON_GEMV               # 'auto' until chosen
    layer.set_decode_kernel("triton")
    out = layer(one)
    assert layer.kernel == layer.compiled_kernel == TRITON_GEMV
    assert out.shape == (1, 1, 96)
    assert (out.float() - _reference(layer, one)).norm() / _reference(layer, one).norm() < 1e-2
    layer(two)
    assert layer.kernel != TRITON_GEMV               # more rows: the measured kernels
    layer.set_decode_kernel("auto")
    layer(one)
    assert layer.kernel != TRITON_GEMV


def test_kernel_choices_that_cannot_run_are_user_errors():
    with pytest.raises(UserError, match="no decode kernel 'marlin'"):
        _layer(4, 64, True, 96, 576, "cpu").set_decode_kernel("marlin")
    with pytest.raises(UserError, match="int8 layers have no decode kernel|w8a8"):
        W8A8Linear.from_float(nn.Linear(64, 32)).set_decode_kernel("triton")
    with pytest.raises(UserError, match="unavailable"):
        _layer(4, 0, True, 32, 64, "cpu").set_decode_kernel("triton")  # CPU, or int4 per channel


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group_size,symmetric,out_features,in_features",
                         CASES + [(4, 128, True, 14336, 4096), (8, 0, True, 4096, 14336)])
def test_gemv_on_cuda_eager_and_compiled(bits, group_size, symmetric, out_features, in_features):
    pytest.importorskip("triton")
    layer = _layer(bits, group_size, symmetric, out_features, in_features, "cuda")
    layer.set_decode_kernel("triton")
    x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
    ref = _reference(layer, x)
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        out = fn(x).float()
        assert (out - ref).norm() / ref.norm() < 1e-2
    assert layer.kernel == TRITON_GEMV
