"""What `fused_on_cuda` and the compiled decode step rely on: each element-wise chain around a
quantized matmul becomes one inductor kernel. A materialized copy of the int4 codes made the
fused decode GEMV read 2.5 bytes per weight instead of 0.5 on the GPU. Inductor's lowering
decides such fusions the same way for the CPU, so the CPU's generated code is checked here (its
kernels are `cpp_pybinding`s), and CUDA's Triton kernels where a GPU runs the tests."""
from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from compress.errors import UserError
from compress.formats.base import rescale_output
from compress.formats.compiled import fused_gemv
from compress.formats.fp8 import quantize_rows_fp8
from compress.formats.int4 import Int4Linear, dequantize_int4
from compress.formats.int8 import dequantize_int8
from compress.formats.w8a8 import W8A8Linear, quantize_rows
from compress.quant.rtn import quantized_linear


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _int4_layer(symmetric: bool, device: str = "cpu") -> Int4Linear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False)
    return quantized_linear(linear, 4, 64, symmetric).to(device)


def _kernels(code: list[str]) -> int:
    return sum(c.count("async_compile.cpp_pybinding(") + c.count("async_compile.triton(")
               for c in code)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_compiled_int4_dequantize_is_one_kernel_with_no_code_buffer(symmetric, device):
    layer = _int4_layer(symmetric, device)
    args = (layer.qweight, layer.scales, layer.zeros, layer.group_size, torch.bfloat16)
    torch.compiler.reset()
    out, code = run_and_get_code(torch.compile(dequantize_int4.__wrapped__), *args)
    assert torch.equal(out, layer.dequantize(torch.bfloat16))
    assert _kernels(code) == 1
    buffers = [line for c in code for line in c.splitlines() if "empty_strided" in line]
    assert not [line for line in buffers if "torch.uint8" in line]  # no buffer of codes


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_int4_gemv_is_one_kernel_and_matches_the_reference(device):
    layer = _int4_layer(True, device).to(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16, device=device)

    def gemv(x):
        return fused_gemv(x, layer.dequantize(torch.float32), None)

    torch.compiler.reset()
    out, code = run_and_get_code(torch.compile(gemv), x)
    reference = x.float() @ layer.dequantize(torch.float32).T
    assert _kernels(code) == 1
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-2)


def test_fused_gemv_kernel_choice_is_per_layer_and_auto_restores_the_default():
    layer, other = _int4_layer(True), _int4_layer(True)
    layer.set_kernel("fused-gemv")
    assert (layer.fused_gemv_rows, other.fused_gemv_rows, Int4Linear.fused_gemv_rows) == (1, 0, 0)
    layer.set_kernel("auto")
    assert layer.fused_gemv_rows == 0
    int8 = quantized_linear(torch.nn.Linear(64, 32), 8, 0, True)
    with pytest.raises(UserError, match="no kernel 'fused-gemv'"):
        int8.set_kernel("fused-gemv")  # int8 runs it for one row already


def test_int8_dequantize_and_activation_quantizers_are_one_kernel_each():
    int8 = quantized_linear(torch.nn.Linear(256, 96), 8, 0, True)
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    calls = [(dequantize_int8, (int8.qweight, int8.scales, int8.zeros, 0, torch.bfloat16)),
             (quantize_rows, (x,)), (quantize_rows_fp8, (x,))]
    for fn, args in calls:
        torch.compiler.reset()
        out, code = run_and_get_code(torch.compile(fn.__wrapped__), *args)
        assert _kernels(code) == 1, fn.__name__
        expected = fn(*args)
        for got, want in zip(out if isinstance(out, tuple) else (out,),
                             expected if isinstance(expected, tuple) else (expected,)):
            assert torch.equal(got.float(), want.float()), fn.__name__


def test_w8a8_epilogue_is_one_kernel_and_exact():
    torch.manual_seed(0)
    layer = W8A8Linear.from_float(torch.nn.Linear(256, 96))
    acc = torch.randint(-2**20, 2**20, (64, 96), dtype=torch.int32)
    row_scale = torch.rand(64, 1) / 100
    args = (acc, row_scale, layer.scales.t(), layer.bias, torch.bfloat16)
    torch.compiler.reset()
    out, code = run_and_get_code(torch.compile(rescale_output.__wrapped__), *args)
    assert _kernels(code) == 1
    expected = (acc.float() * row_scale * layer.scales.t() + layer.bias.float()).to(torch.bfloat16)
    assert torch.equal(out, expected) and torch.equal(rescale_output(*args), expected)


def _recording_backend(graphs: list):
    """A torch.compile backend that keeps each graph's input sizes as strings ('s0': symbolic)."""
    def backend(gm, example_inputs):
        graphs.append([tuple(str(size) for size in node.meta["example_value"].shape)
                       for node in gm.graph.nodes if node.op == "placeholder"
                       and isinstance(node.meta.get("example_value"), torch.Tensor)])
        return gm.forward
    return backend


def _symbolic(size: str) -> bool:
    return not size.isdigit()


def test_fused_weight_kernels_are_compiled_for_each_shape_with_constant_sizes():
    # torch.compile's default made the third weight shape's kernel symbolic in every size, and
    # every later weight ran it; on an H100 the int4 dequantization ran at a ninth of the copy
    # bandwidth.
    from compress.formats.compiled import compile_for_shapes
    graphs: list = []
    torch.compiler.reset()
    dequantize = compile_for_shapes(dequantize_int4.__wrapped__, False, _recording_backend(graphs))
    for out, inp in [(96, 256), (32, 256), (160, 256), (96, 512)]:
        layer = quantized_linear(torch.nn.Linear(inp, out, bias=False), 4, 64, True)
        got = dequantize(layer.qweight, layer.scales, layer.zeros, 64, torch.bfloat16)
        assert torch.equal(got, layer.dequantize(torch.bfloat16))
    assert len(graphs) == 4   # one kernel per shape
    assert not [s for graph in graphs for shape in graph for s in shape if _symbolic(s)]
    torch.compiler.reset()


def test_fused_activation_kernels_take_any_rows_with_constant_columns():
    from compress.formats.compiled import compile_for_shapes
    graphs: list = []
    torch.compiler.reset()
    quantize = compile_for_shapes(quantize_rows.__wrapped__, True, _recording_backend(graphs))
    rescale = compile_for_shapes(rescale_output.__wrapped__, True, _recording_backend(graphs))
    for rows in (3, 5, 9, 17):
        for cols in (64, 128):
            x = torch.randn(rows, cols)
            q, scale = quantize(x)
            assert torch.equal(q, quantize_rows(x)[0])
            col_scale = torch.rand(1, 32)
            out = rescale(q[:, :32].to(torch.int32), scale, col_scale, None, torch.bfloat16)
            assert torch.equal(out, rescale_output(q[:, :32].to(torch.int32), scale, col_scale,
                                                   None, torch.bfloat16))
    # Two column counts for the quantizer, one for the epilogue: no compile per prompt length.
    assert len(graphs) == 3
    for graph in graphs:
        first = graph[0]
        assert _symbolic(first[0]) and not _symbolic(first[-1])
        assert [shape[0] for shape in graph if len(shape) == 2 and shape[1] == "1"] in \
            ([], [first[0]])   # per-row scales share the rows' symbol
    torch.compiler.reset()


def _row_scaled_layers(cls, device: str):
    """Two layers of one shape and one of another, on the fast path even on a CPU."""
    torch.manual_seed(0)
    layers = [cls.from_float(torch.nn.Linear(i, o)).to(device) for i, o in
              ((256, 96), (256, 96), (128, 64))]
    for layer in layers:
        layer.cpu_fast_int8 = True   # W8A8: _int_mm on any CPU (slow without VNNI, exact)
    return layers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["w8a8", "fp8"])
def test_one_graph_kernel_equals_the_default_fast_path(fmt, device, monkeypatch):
    from compress.formats.base import WHOLE_GRAPH, WHOLE_GRAPH_MIN_ROWS
    from compress.formats.fp8 import FP8Linear, fp8_capable

    cls = W8A8Linear if fmt == "w8a8" else FP8Linear
    if device == "cuda" and fmt == "fp8" and not fp8_capable(device):
        pytest.skip("this GPU has no FP8 tensor cores: FP8 layers run their reference")
    if device == "cpu" and fmt == "fp8":  # torch emulates _scaled_mm on the CPU, where it can
        monkeypatch.setattr(FP8Linear, "fast_fits", lambda self, device, rows: True)
        try:
            FP8Linear.from_float(torch.nn.Linear(32, 16)).fast_forward(torch.randn(2, 32))
        except (RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"torch._scaled_mm with row-wise scales does not run here: {exc}")
    torch.compiler.reset()
    for layer in _row_scaled_layers(cls, device):
        layer.set_kernel("inductor")
        for shape in ((WHOLE_GRAPH_MIN_ROWS, layer.in_features), (2, 24, layer.in_features),
                      (3, layer.in_features)):
            x = torch.randn(*shape, device=device)
            out = layer(x)
            expected = layer.fast_forward(x)
            assert out.shape == expected.shape
            assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
            rows = x.numel() // layer.in_features
            assert layer.kernel == (f"{cls.fast_kernel} {WHOLE_GRAPH}"
                                    if rows >= WHOLE_GRAPH_MIN_ROWS else cls.fast_kernel)
    layer.set_kernel("auto")
    layer(torch.randn(40, layer.in_features, device=device))
    assert layer.kernel == cls.fast_kernel
    torch.compiler.reset()


def test_one_graph_kernel_compiles_once_per_weight_shape_for_any_rows():
    """The layer is an argument of the compiled function: its buffers are graph inputs, so the
    layers of one shape share a graph, and prompt lengths share it too (rows symbolic)."""
    from compress.formats.base import _fast_forward
    from compress.formats.compiled import compile_for_shapes

    graphs: list = []
    torch.compiler.reset()
    whole = compile_for_shapes(_fast_forward, True, _recording_backend(graphs))
    for rows in (17, 33, 100):
        for layer in _row_scaled_layers(W8A8Linear, "cpu"):
            x = torch.randn(rows, layer.in_features)
            assert torch.equal(whole(x, layer), layer.fast_forward(x))
    assert len(graphs) == 2
    for graph in graphs:
        assert _symbolic(graph[0][0]) and not _symbolic(graph[0][1])
    torch.compiler.reset()
