"""Fused projections (evaluate/fuse.py): q/k/v and gate/up as one matmul each give the model's
own outputs, eagerly and in the compiled decode step, for float and quantized layers."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress.evaluate.attention import use_gqa_decode_attention
from compress.evaluate.bench import linear_kernels, prefill_flops
from compress.evaluate.engine import Engine, random_tokens
from compress.evaluate.fuse import FusedProjection, ProjectionSlice, fuse_projections
from compress.evaluate.memory import parameter_count, weight_bytes
from compress.formats.w8a8 import W8A8Linear
from compress.recipe import apply_recipe, recipe_from_dict


@pytest.fixture(scope="module")
def lively():
    from compress.sources import load_random

    model = load_random("tiny").model.eval()
    with torch.no_grad():
        for param in model.parameters():  # larger weights: greedy tokens that vary
            param.normal_(0, 0.15, generator=torch.Generator().manual_seed(param.numel()))
    return model


def _w8a8(model):
    from compress.adapters import decoder_linears, set_submodule

    for name, linear in decoder_linears(model):
        set_submodule(model, name, W8A8Linear.from_float(linear))
    return model


VARIANTS = {
    "float": lambda m: m,
    "int8": lambda m: apply_recipe(m, recipe_from_dict(
        {"passes": [{"pass": "rtn", "bits": 8, "group_size": 0}]}, "int8")),
    "int4-asym": lambda m: apply_recipe(m, recipe_from_dict(
        {"passes": [{"pass": "rtn", "bits": 4, "group_size": 32, "symmetric": False}]}, "int4")),
    "w8a8": _w8a8,
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_model_gives_the_same_logits_and_compiled_tokens(lively, variant):
    model = VARIANTS[variant](copy.deepcopy(lively))
    fused = copy.deepcopy(model)
    done = fuse_projections(fused)
    layers = lively.config.num_hidden_layers
    assert len(done.groups) == 2 * layers
    attention = fused.model.layers[0].self_attn
    assert isinstance(attention.q_proj, FusedProjection)
    assert isinstance(attention.k_proj, ProjectionSlice)
    assert isinstance(fused.model.layers[0].mlp.up_proj, ProjectionSlice)
    ids = random_tokens(2, 12, 256, "cpu", seed=4)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    plain, compiled = Engine(model), Engine(fused)
    plain.allocate(2, 32)
    compiled.allocate(2, 32)
    compiled.compile_decode()
    assert torch.equal(compiled.generate(ids, 10).tokens, plain.generate(ids, 10).tokens)
    # The accounting sees the same model: bytes, parameters, FLOPs.
    assert weight_bytes(fused) == weight_bytes(model)
    assert parameter_count(fused) == parameter_count(model)
    assert prefill_flops(fused, 1, 16) == prefill_flops(model, 1, 16)
    kernels = linear_kernels(fused)
    assert kernels["self_attn.q_proj"].startswith("FusedProjection: fused: ")
    assert kernels["mlp.up_proj"] == "ProjectionSlice: computed by gate_proj's fused matmul"
    # Undone: the original modules, their tensors now views of the fused ones (no copy, no
    # extra memory), the same outputs, and a model that compresses like any other.
    done.undo()
    q_proj = fused.model.layers[0].self_attn.q_proj
    assert type(q_proj) is type(model.model.layers[0].self_attn.q_proj)
    assert weight_bytes(fused) == weight_bytes(model)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_groups_of_mixed_kinds_stay_as_they_are(lively):
    model = copy.deepcopy(lively)
    mlp = model.model.layers[0].mlp
    mlp.up_proj = W8A8Linear.from_float(mlp.up_proj)  # gate float, up W8A8: not one matmul
    done = fuse_projections(model)
    assert len(done.groups) == 2 * lively.config.num_hidden_layers - 1
    assert type(mlp.gate_proj) is torch.nn.Linear and isinstance(mlp.up_proj, W8A8Linear)


def test_a_slice_called_out_of_order_fails_loudly(lively):
    model = copy.deepcopy(lively)
    fuse_projections(model)
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 3, lively.config.hidden_size)
    with pytest.raises(RuntimeError, match="k_proj ran before q_proj"):
        attention.k_proj(x)
    attention.q_proj(x)
    attention.k_proj(x)
    with pytest.raises(RuntimeError, match="k_proj ran before q_proj"):
        attention.k_proj(x)  # each output is handed back once


def test_bench_records_the_fusion(tiny_bench):
    doc, md = tiny_bench("--fuse-projections")
    assert doc["protocol"]["fuse_projections"] is True
    assert doc["rows"][0]["fused_projection_groups"] == 4
    assert "q/k/v and gate/up fused" in md


def test_an_undone_fusion_leaves_a_model_that_compresses(lively):
    """A sweep times its baseline (fused), then quantizes the same model for each recipe."""
    model = copy.deepcopy(lively)
    fuse_projections(model).undo()
    quantized = VARIANTS["int4-asym"](model)
    reference = VARIANTS["int4-asym"](copy.deepcopy(lively))
    ids = random_tokens(1, 8, 256, "cpu", seed=2)
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, reference(ids).logits)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["float", "int4-asym"])
def test_fused_compiled_decode_on_cuda_matches_the_unfused_one(variant, first_compiled_step):
    """CUDA graphs replay the fused step; its side channel (the pending outputs) must hold."""
    from compress.sources import load_random

    model = VARIANTS[variant](load_random("smollm2-135m", torch.bfloat16, device="cuda").model)
    ids = random_tokens(2, 16, model.config.vocab_size, "cuda", seed=3)
    plain = first_compiled_step(model, ids, 32).clone()
    done = fuse_projections(model)
    torch.testing.assert_close(first_compiled_step(model, ids, 32), plain, rtol=2e-2, atol=2e-2)
    done.undo()


def _distinct(bias: bool):
    """A tiny GQA Llama (groups 2) whose every parameter has its own values, with biases on
    q/k/v/o and the MLP (as Qwen2 has on q/k/v)."""
    config = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=320, attention_bias=bias, mlp_bias=bias)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            param.normal_(0, 0.15, generator=torch.Generator().manual_seed(i))
    return model


@pytest.mark.parametrize("variant", ["float", "int8"])
def test_fusion_keeps_each_projection_its_own_weight_and_bias(variant):
    model = _distinct(bias=True)
    if variant == "int8":
        model = apply_recipe(model, recipe_from_dict(
            {"passes": [{"pass": "rtn", "bits": 8, "group_size": 0}]}, "int8"))
    fused = copy.deepcopy(model)
    done = fuse_projections(fused)
    assert len(done.groups) == 4
    ids = random_tokens(2, 12, 256, "cpu", seed=4)
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(fused(ids).logits, expected, rtol=1e-5, atol=1e-5)
        done.undo()
        torch.testing.assert_close(fused(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_gqa_decode_reads_keys_as_keys_and_values_as_values():
    model = _distinct(bias=False)
    swapped = copy.deepcopy(model)
    assert use_gqa_decode_attention(swapped) is not None
    ids = random_tokens(2, 10, 256, "cpu", seed=8)
    steps = []
    for m in (model, swapped):
        engine = Engine(m)
        engine.allocate(2, 24)
        first = engine.prefill(ids)
        steps.append(engine.decode_step(first.argmax(-1), engine.next_positions(10)).clone())
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-5, atol=1e-5)
