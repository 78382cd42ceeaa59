"""Int8Linear / Int4Linear: fast forward equals the reference, reference equals dequantize+matmul."""
import pytest
import torch
from torch import nn

from compress.formats import grid
from compress.formats.compiled import FUSED_GEMV
from compress.formats.int4 import Int4Linear
from compress.formats.int8 import Int8Linear
from compress.quant.rtn import quantized_linear
from compress.recipe import apply_recipe, recipe_from_dict


def _linear(out_features=96, in_features=128, bias=False):
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.weight.data.normal_(0, 0.02)
    return layer


@pytest.mark.parametrize("bits,cls", [(8, Int8Linear), (4, Int4Linear)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, 32])
@pytest.mark.parametrize("shape", [(3, 5, 128), (1, 1, 128)])   # the reference; the CPU kernels
def test_quantized_linear_matches_dequantized_matmul(bits, cls, symmetric, group_size, shape):
    layer = _linear(bias=True)
    q = quantized_linear(layer, bits, group_size, symmetric)
    assert isinstance(q, cls)
    x = torch.randn(*shape)
    expected = x @ grid.fake_quantize(layer.weight.data, bits, symmetric, group_size).T + layer.bias
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.reference_forward(x), expected, rtol=1e-5, atol=1e-5)
    # One float32 row runs torch's CPU kernel where it takes the layout (int8: symmetric per
    # channel; int4: grouped), so q(x) above checked it, not the reference twice.
    kernel_fits = (symmetric and group_size == 0) if bits == 8 else group_size > 0
    assert (q.kernel != "reference") == (shape[:2] == (1, 1) and kernel_fits)


@pytest.mark.parametrize("out_features,in_features", [(96, 128), (48, 576), (40, 192)])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_int8_kernel_agrees_with_reference(out_features, in_features, rows):
    q = quantized_linear(_linear(out_features, in_features), 8, 0, True).to(torch.bfloat16)
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    fast = q(x)
    assert q.kernel == "torch._weight_int8pack_mm"
    torch.testing.assert_close(fast.float(), q.reference_forward(x).float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("bits,group_size", [(8, 0), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_float32_decode_row_kernels_agree_with_reference(bits, group_size, symmetric):
    """One float32 row (decode at batch 1) runs torch's CPU kernel where the format has one; it
    accumulates in float32 like the reference, so they agree to float32 rounding."""
    q = quantized_linear(_linear(96, 256), bits, group_size, symmetric)
    x = torch.randn(1, 1, 256)
    fast = q(x)
    has_kernel = bits == 4 or symmetric   # the int8 kernel takes symmetric per-channel weights
    assert (q.kernel != "reference") == has_kernel
    torch.testing.assert_close(fast, q.reference_forward(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("out_features,in_features,group_size", [
    (96, 128, 32), (48, 576, 64), (1536, 576, 64), (32, 256, 128), (64, 512, 256), (40, 128, 32)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_int4_kernel_agrees_with_reference(out_features, in_features, group_size, symmetric, rows):
    q = quantized_linear(_linear(out_features, in_features), 4, group_size, symmetric)
    q = q.to(torch.bfloat16)
    x = torch.randn(1, rows, in_features).to(torch.bfloat16)
    fast = q(x)
    # The CPU kernel needs an output width divisible by 16; others fall back to the reference.
    fits = out_features % 16 == 0
    assert q.kernel == ("torch._weight_int4pack_mm_for_cpu" if fits else "reference")
    ref = q.reference_forward(x).float()
    # Both round to bfloat16; the kernel also rounds the zero-point offset (8 - zero) * scale.
    err = (fast.float() - ref).norm() / ref.norm()
    assert err < 1e-2


def test_dropping_kernel_layouts_keeps_the_chosen_kernel():
    """The int4 layout is rebuilt from the buffers on the next forward; a Triton plan is the
    kernel a user chose (it reads the buffers at each call), so it stays."""
    from compress.formats.base import drop_kernel_layouts

    q = quantized_linear(_linear(96, 128), 4, 64, True).to(torch.bfloat16)
    x = torch.randn(1, 128).to(torch.bfloat16)
    before = q(x)
    chosen = q._triton = object()
    drop_kernel_layouts(q)
    assert q._fast is None and q._triton is chosen
    q._triton = None
    torch.testing.assert_close(q(x), before, rtol=0, atol=0)
    assert q.kernel == "torch._weight_int4pack_mm_for_cpu" and q._fast is not None


@pytest.mark.parametrize("bits,group_size", [(8, 0), (4, 64)])
def test_cpu_kernels_are_used_only_where_they_win(bits, group_size):
    """float32 activations beyond one row and long prefills take the reference (measured faster
    there; compress/formats/base.py CPU_KERNEL_MAX_ROWS)."""
    q = quantized_linear(_linear(96, 128), bits, group_size, True)
    q(torch.randn(3, 128))
    assert q.kernel == "reference"
    q(torch.randn(1, 1, 128))
    assert q.kernel != "reference"
    q = q.to(torch.bfloat16)
    q(torch.randn(3, 128).to(torch.bfloat16))
    assert q.kernel != "reference"
    q(torch.randn(1000, 128).to(torch.bfloat16))
    assert q.kernel == "reference"


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group_size,eager_kernel,choice", [
    (8, 0, "reference", "auto"), (4, 64, "torch._weight_int4pack_mm", "auto"),
    (4, 128, "torch._weight_int4pack_mm", "auto"),
    (4, 64, "torch._weight_int4pack_mm", "fused-gemv")])
@pytest.mark.parametrize("out_features,in_features", [(1536, 576), (4096, 4096), (96, 1024)])
def test_cuda_paths_agree_with_the_reference(bits, group_size, eager_kernel, choice, out_features,
                                             in_features):
    """Eager: tinygemm (int4) up to 64 rows, else dequantize + cuBLAS; compiled: one row of int8
    (or of int4 with the 'fused-gemv' choice) runs the fused dequantize-GEMV. Every path against
    the float32 reference, on widths that are not multiples of the kernels' tiles too (576)."""
    if group_size and in_features % group_size:
        pytest.skip("group size must divide the width")
    q = quantized_linear(_linear(out_features, in_features), bits, group_size, True)
    q = q.to("cuda", torch.bfloat16)
    q.set_kernel(choice)
    compiled = torch.compile(q, dynamic=False)
    for rows in (1, 8, 64, 300):
        x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), q.dequantize(torch.float32))
        fast = q(x).float()
        assert q.kernel == (eager_kernel if rows <= 64 else "reference")
        assert (fast - ref).norm() / ref.norm() < 1e-2
        if rows <= 8:
            fused = rows <= q.fused_gemv_rows  # int8: one row; int4: with 'fused-gemv' only
            assert q.compiled_kernel == (FUSED_GEMV if fused else q.kernel)
            out = compiled(x).float()
            assert (out - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("bits", [4, 8])
def test_storage_is_really_smaller(bits):
    layer = _linear(out_features=256, in_features=512)
    q = quantized_linear(layer, bits, 64, True)
    stored = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    float_bytes = layer.weight.numel() * 4
    # codes: bits/8 bytes per weight; scales: one float32 per 64 weights.
    assert stored == layer.weight.numel() * bits // 8 + 256 * (512 // 64) * 4
    assert stored < float_bytes * (bits / 32 + 0.07)


def test_fused_gemv_is_the_float32_matmul_with_bias():
    """The formula compiled into the int8 decode kernel on CUDA, checked eagerly here."""
    from compress.formats.compiled import fused_gemv

    torch.manual_seed(3)
    x = torch.randn(2, 1, 96, dtype=torch.bfloat16)
    w, b = torch.randn(40, 96), torch.randn(40)
    out = fused_gemv(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 40)
    ref = torch.nn.functional.linear(x.float(), w, b)
    assert torch.allclose(out.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_adds_the_bias(dtype):
    """The CPU kernel path (torch._weight_int8pack_mm) with a bias, as the reference adds it."""
    linear = _linear(32, 64, bias=True)
    nn.init.normal_(linear.bias)
    q = quantized_linear(linear, 8, 0, True).to(dtype)
    x = torch.randn(1, 64).to(dtype)
    fast = q(x)
    assert q.kernel == "torch._weight_int8pack_mm"
    torch.testing.assert_close(fast.float(), q.reference_forward(x).float(), rtol=2e-2, atol=2e-3)


def test_int8_kernel_takes_activations_that_are_not_contiguous():
    q = quantized_linear(_linear(32, 64), 8, 0, True).to(torch.bfloat16)
    x = torch.randn(64, 3).to(torch.bfloat16).t()      # a transposed view, strided last dim
    out = q(x)
    assert q.kernel == "torch._weight_int8pack_mm"
    assert torch.equal(out, q(x.contiguous()))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_biased_layer_answers_in_the_autocast_dtype(bits, dtype):
    """Under autocast the kernels answer in bfloat16; a bias added in the layer's own dtype
    promoted the sum back (float32), unlike the nn.Linear the layer replaced."""
    linear = _linear(32, 64, bias=True)
    nn.init.normal_(linear.bias)
    q = quantized_linear(linear.to(dtype), bits, 32 if bits == 4 else 0, True)
    x = torch.randn(1, 64, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
        expected = nn.functional.linear(x, q.dequantize(dtype), q.bias)
    # int8's CPU kernel takes activations of its scales' dtype only: bfloat16 ones go to the
    # reference, which answers in bfloat16 too.
    assert (q.kernel != "reference") == (bits == 4)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_rtn_and_lm_head_asymmetric_give_asymmetric_layers(tiny_model):
    recipe = recipe_from_dict({"passes": [
        {"pass": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
        {"pass": "lm-head", "bits": 4, "group_size": 32, "symmetric": False}]}, "t")
    model = apply_recipe(tiny_model, recipe)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 15
    assert all(not m.symmetric and m.zeros is not None for m in layers)
