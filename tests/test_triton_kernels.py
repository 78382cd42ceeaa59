"""The Triton GEMV and GEMM (compress/formats/triton_kernels.py) against the dequantized reference:
on the CPU through Triton's interpreter where Triton is installed, on CUDA in the GPU tests.
Interpreted GEMM tests use float16: Triton 3.9's interpreter computes tl.dot of bfloat16 wrongly
(numpy has no bfloat16); the kernel is dtype-generic and the GPU tests run it in bfloat16."""
import os

import pytest
import torch
from torch import nn

from compress.errors import UserError
from compress.formats.triton_kernels import GEMM_BLOCK_N, TRITON_GEMM, TRITON_GEMV, plan
from compress.formats.w8a8 import W8A8Linear
from compress.quant.rtn import quantized_linear

# int4 / int8, symmetric / not, grouped / per channel; widths that are not multiples of the
# kernel's blocks (70 rows, 600 columns) and a split that leaves the last program past K.
CASES = [(4, 64, True, 96, 576), (4, 32, False, 40, 160), (4, 256, False, 40, 768),
         (8, 0, True, 70, 600),
         (8, 0, False, 33, 300), (8, 64, False, 48, 192)]


def _layer(bits, group_size, symmetric, out_features, in_features, device,
           dtype=torch.bfloat16):
    torch.manual_seed(out_features)
    linear = nn.Linear(in_features, out_features, bias=True)
    return quantized_linear(linear, bits, group_size, symmetric).to(device, dtype)


def _reference(layer, x):
    return nn.functional.linear(x.float(), layer.dequantize(torch.float32), layer.bias.float())


@pytest.fixture
def interpreted():
    """Triton's interpreter on the CPU: tests/conftest.py turns it on when there is no GPU."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU machine): the GPU tests cover the kernel")


@pytest.mark.parametrize("bits,group_size,symmetric,out_features,in_features", CASES)
@pytest.mark.parametrize("split_k,groups_per_step", [(1, 1), (3, 1), (1, 4), (3, 2)])
def test_gemv_matches_the_reference_in_the_interpreter(interpreted, bits, group_size, symmetric,
                                                       out_features, in_features, split_k,
                                                       groups_per_step):
    """Several groups per K step too: 576 = 9 groups of 64, so 4 per step leaves a last step
    mostly past K."""
    layer = _layer(bits, group_size, symmetric, out_features, in_features, "cpu")
    x = torch.randn(1, in_features, dtype=torch.bfloat16)
    gemv = plan(out_features, in_features, bits, group_size, torch.device("cpu"), block_n=16,
                split_k=split_k, groups_per_step=groups_per_step)
    out = gemv(x, layer.qweight, layer.scales, layer.zeros).float() + layer.bias.float()
    ref = _reference(layer, x)
    assert (out - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("bits,group_size,symmetric,out_features,in_features", CASES)
@pytest.mark.parametrize("rows", [2, 70])
def test_gemm_matches_the_reference_in_the_interpreter(interpreted, bits, group_size, symmetric,
                                                       out_features, in_features, rows):
    layer = _layer(bits, group_size, symmetric, out_features, in_features, "cpu", torch.float16)
    x = torch.randn(rows, in_features, dtype=torch.float16)
    kernels = plan(out_features, in_features, bits, group_size, torch.device("cpu"))
    out = kernels(x, layer.qweight, layer.scales, layer.zeros).float() + layer.bias.float()
    ref = _reference(layer, x)
    assert (out - ref).norm() / ref.norm() < 1e-2


def test_layers_run_them_once_chosen(interpreted):
    """int4: the GEMV for one row, tinygemm for 2-64 (it won there), the GEMM beyond; int8: the
    GEMV for one row, the GEMM for more."""
    int4 = _layer(4, 64, True, 96, 576, "cpu", torch.float16)
    int8 = _layer(8, 0, True, 70, 600, "cpu", torch.float16)
    for layer in (int4, int8):
        x1 = torch.randn(1, 1, layer.in_features, dtype=torch.float16)
        layer(x1)
        assert layer.kernel not in (TRITON_GEMV, TRITON_GEMM)    # 'auto' until chosen
        layer.set_kernel("triton")
        expected = {1: TRITON_GEMV, 2: TRITON_GEMM if layer is int8 else None, 70: TRITON_GEMM}
        for rows, kernel in expected.items():
            x = torch.randn(rows, layer.in_features, dtype=torch.float16)
            out = layer(x).float()
            ref = _reference(layer, x)
            assert (out - ref).norm() / ref.norm() < 1e-2
            assert layer.kernel == kernel if kernel else layer.kernel not in (TRITON_GEMV,
                                                                              TRITON_GEMM)
        layer.set_kernel("auto")
        layer(x1)
        assert layer.kernel != TRITON_GEMV


def test_kernel_choices_that_cannot_run_are_user_errors():
    with pytest.raises(UserError, match="no kernel 'marlin'"):
        _layer(4, 64, True, 96, 576, "cpu").set_kernel("marlin")
    with pytest.raises(UserError, match="layers have no kernel 'triton'"):
        W8A8Linear.from_float(nn.Linear(64, 32)).set_kernel("triton")
    with pytest.raises(UserError, match="unavailable"):
        _layer(4, 0, True, 32, 64, "cpu").set_kernel("triton")  # CPU, or int4 per channel


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group_size,symmetric,out_features,in_features",
                         CASES + [(4, 128, True, 14336, 4096), (8, 0, True, 4096, 14336)])
def test_triton_kernels_on_cuda(bits, group_size, symmetric, out_features, in_features):
    """bfloat16: the GEMV eager and compiled (as the decode step runs it), the GEMM eager (as the
    prefill runs it), at every shape including ones off the kernels' tiles."""
    pytest.importorskip("triton")
    layer = _layer(bits, group_size, symmetric, out_features, in_features, "cuda")
    layer.set_kernel("triton")
    assert layer._triton.tuning.startswith("tuned"), layer._triton.tuning
    one = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
    many = torch.randn(300, in_features, device="cuda", dtype=torch.bfloat16)
    for fn, x, kernel in ((layer, one, TRITON_GEMV), (torch.compile(layer, fullgraph=True), one,
                                                      TRITON_GEMV), (layer, many, TRITON_GEMM)):
        out = fn(x).float()
        ref = _reference(layer, x)
        assert (out - ref).norm() / ref.norm() < 1e-2
        assert layer.kernel == kernel


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group_size,symmetric,out_features,in_features", CASES[:4])
def test_triton_gemm_keeps_float32_precision_on_cuda(bits, group_size, symmetric, out_features,
                                                     in_features):
    """A float32 model's prefill through the GEMM: tl.dot at full precision, not TF32 (which
    would give about 1e-3 relative error against the float32 reference)."""
    pytest.importorskip("triton")
    layer = _layer(bits, group_size, symmetric, out_features, in_features, "cuda", torch.float32)
    layer.set_kernel("triton")
    x = torch.randn(300, in_features, device="cuda")
    with torch.no_grad():
        out = layer(x)
    assert layer.kernel == TRITON_GEMM
    ref = _reference(layer, x)
    assert (out - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 64, False), (8, 0, False)])
def test_gemm_covers_every_tile_of_rows_and_columns_in_the_interpreter(interpreted, bits,
                                                                        group_size, symmetric):
    out_features, in_features, rows = GEMM_BLOCK_N + 72, 256, 130  # 2 N tiles, 2 M tiles of 128
    torch.manual_seed(0)
    layer = quantized_linear(nn.Linear(in_features, out_features), bits, group_size,
                             symmetric).to(torch.float16)
    x = torch.randn(rows, in_features, dtype=torch.float16)
    kernels = plan(out_features, in_features, bits, group_size, torch.device("cpu"))
    out = kernels(x, layer.qweight, layer.scales, layer.zeros).float()
    ref = nn.functional.linear(x.float(), layer.dequantize(torch.float32))
    # per row and per column: a tile left unwritten or written twice shows here, not in a norm
    for across in (1, 0):
        err = (out - ref).abs().amax(dim=across) / ref.abs().amax(dim=across)
        assert err.max() < 1e-2, (across, err.argmax())
