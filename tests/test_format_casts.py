"""What a quantized layer keeps through casts, reloads and new contents: formats whose buffers
have a dtype of their own keep it, kernel layouts never go stale, odd inputs reach the kernels."""
import os

import pytest
import torch
from torch import nn

from compress.checkpoint import atomic_output_dir, load_checkpoint, save_checkpoint
from compress.errors import UserError
from compress.evaluate.memory import weight_bytes
from compress.formats import grid, triton_kernels
from compress.formats.bnb import BnbInt8Linear, BnbNF4Linear
from compress.formats.fp8 import FP8Linear
from compress.formats.int4 import Int4Linear
from compress.formats.w8a8 import W8A8Linear
from compress.quant.rtn import quantized_linear

from apply_pass import apply_pass


def _linear(out_features=64, in_features=128, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=True)
    layer.weight.data.normal_(0, 0.02)
    return layer


LAYERS = {
    "fp8": lambda: FP8Linear.from_float(_linear()),
    "w8a8": lambda: W8A8Linear.from_float(_linear()),
    "bnb-int8": lambda: BnbInt8Linear.from_float(_linear(), 6.0),
    "bnb-nf4-double": lambda: BnbNF4Linear.from_float(_linear(), 64, True, "float32"),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_cast_keeps_the_buffers_whose_dtype_is_the_format(name):
    layer = LAYERS[name]()
    before = {n: b.clone() for n, b in layer.named_buffers()}
    x = torch.randn(3, 128)
    expected = layer(x)
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16          # the float part follows the model
    for n in layer.fixed_dtype_buffers:
        if n in before:
            buffer = getattr(layer, n)
            assert buffer.dtype == before[n].dtype and torch.equal(buffer, before[n]), n
    # Back in float32 the layer computes what it did: only its bias went through bfloat16.
    layer.to(torch.float32)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-2 * expected.abs().max())
    assert list(dict(layer.named_buffers())) == list(before)  # state-dict order unchanged


@pytest.mark.parametrize("method,fields", [("fp8", {}), ("bnb-int8", {}),
                                           ("bnb-nf4", {"double_quant": True})])
def test_a_checkpoint_reloaded_in_another_dtype_keeps_its_codes(tiny, tmp_path, method, fields):
    model = apply_pass(tiny.model, method, **fields)
    save_checkpoint(model, tiny.tokenizer, str(tmp_path / "q"), {"name": method}, tiny.provenance)
    reloaded = load_checkpoint(str(tmp_path / "q"), dtype=torch.bfloat16).model
    saved = dict(model.model.layers[1].mlp.down_proj.named_buffers())
    for n, buffer in reloaded.model.layers[1].mlp.down_proj.named_buffers():
        assert buffer.dtype == saved[n].dtype and torch.equal(buffer, saved[n]), n
    assert weight_bytes(reloaded)["linear"] <= weight_bytes(model)["linear"]
    with torch.no_grad():
        logits = reloaded(torch.arange(1, 17)[None]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_new_buffer_contents_rebuild_the_int4_kernel_layout():
    a = quantized_linear(_linear(), 4, 32, True).to(torch.bfloat16)
    b = quantized_linear(_linear(seed=1), 4, 32, True).to(torch.bfloat16)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    a(x)                                                  # builds a's packed layout
    assert a.kernel != "reference"
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_int4_kernel_takes_strided_rows():
    # The last position of each prompt of a batched prefill (logits_to_keep=1): a strided view.
    layer = quantized_linear(_linear(), 4, 64, False).to(torch.bfloat16)
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)[:, -1:]
    assert not x.is_contiguous()
    out = layer(x)
    assert isinstance(layer, Int4Linear) and layer.kernel != "reference"
    torch.testing.assert_close(out.float(), layer.reference_forward(x).float(), rtol=2e-2,
                               atol=2e-2)


@pytest.mark.parametrize("group_size", [48, 96, 192, 8])
def test_triton_kernels_refuse_groups_a_k_step_cannot_hold(group_size):
    with pytest.raises(ValueError, match="powers of two from 16"):
        triton_kernels.plan(64, 576, 8, group_size, torch.device("cpu"))


def test_int4_of_an_odd_width_is_a_user_error():
    with pytest.raises(UserError, match="input width 9 of x is odd"):
        grid.check_group_size("x", 9, 0, bits=4)
    grid.check_group_size("x", 9, 0, bits=8)


def test_bnb_int8_without_decomposition_reports_its_kernel():
    layer = BnbInt8Linear.from_float(_linear(), 0.0)
    layer(torch.randn(2, 128))
    assert layer.kernel == "bitsandbytes.int8_scaled_mm"


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="appeared while this run wrote it"):
        with atomic_output_dir(str(out), overwrite=False) as tmp:
            (out / "theirs").mkdir(parents=True)         # another run finished first
            open(os.path.join(tmp, "mine"), "w").close()
    assert os.listdir(out) == ["theirs"]
    kept = [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
    assert len(kept) == 1 and os.listdir(tmp_path / kept[0]) == ["mine"]
