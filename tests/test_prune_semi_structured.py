"""2:4 weights as semi-structured sparse tensors: refused with one line when they cannot be, and
(on CUDA) the sparse kernels give the dense product."""
from __future__ import annotations

import copy

import pytest
import torch

from compress.errors import UserError
from compress.prune import masks
from compress.prune.semi_structured import (check_2of4, is_2of4_model, materialize_2of4,
                                            to_semi_structured)


def _pruned_2of4(rows=128, cols=256, dtype=torch.float16, device="cpu"):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    w = w * masks.nm_mask(w.abs(), 2, 4)
    return w.to(dtype=dtype, device=device)


def test_wrong_pattern_dtype_and_device_are_refused():
    dense = torch.randn(32, 64, dtype=torch.float16)
    with pytest.raises(UserError, match="is not 2:4 sparse"):
        check_2of4(dense)
    with pytest.raises(UserError, match="2-D weight"):
        check_2of4(torch.zeros(4))
    check_2of4(_pruned_2of4())                    # valid: no error
    with pytest.raises(UserError, match="float16 or bfloat16"):
        to_semi_structured(_pruned_2of4(dtype=torch.float32))
    with pytest.raises(UserError, match="need a CUDA device"):
        to_semi_structured(_pruned_2of4())


def test_materialize_checks_every_layer_before_converting_any(tiny_model):
    with pytest.raises(UserError, match="model.layers.0.self_attn.q_proj is not 2:4 sparse"):
        materialize_2of4(tiny_model)
    assert all(type(p) is torch.nn.Parameter for p in tiny_model.parameters())


def test_only_models_whose_every_linear_is_2of4_count_as_2of4(tiny_model, tokens):
    from compress.calibration import CalibrationData
    from compress.passes import build_config, pass_table

    assert not is_2of4_model(tiny_model)
    spec = pass_table()["magnitude"]
    unstructured = spec.apply(copy.deepcopy(tiny_model), build_config(spec, {"sparsity": 0.5}),
                              CalibrationData(tokens))
    assert not is_2of4_model(unstructured)      # 50% zeros, but not 2 in every 4
    pruned = spec.apply(tiny_model, build_config(spec, {"pattern": "2:4"}), CalibrationData(tokens))
    assert is_2of4_model(pruned)


@pytest.mark.gpu
def test_bench_times_a_2of4_model_with_semi_structured_kernels(tokens):
    from compress.calibration import CalibrationData
    from compress.passes import build_config, pass_table
    from compress.sources import load_random
    from evaluate.bench import BenchConfig, bench_engine, measure_ceilings

    spec = pass_table()["magnitude"]
    model = spec.apply(load_random("smollm2-135m", torch.bfloat16, device="cuda").model,
                       build_config(spec, {"pattern": "2:4"}), CalibrationData(tokens))
    cfg = BenchConfig(batches=(1,), prompt=16, new=4, prefill=((1, 64),), warmup=0, repeats=1,
                      semi_structured=True)
    row = bench_engine(model, cfg, "cuda", "2:4", measure_ceilings(cfg, "cuda", torch.bfloat16))
    assert row["semi_structured_linears"] == 7 * 30
    assert "tensor subclass" in row["kernels"]["mlp.down_proj"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_linear_matches_dense(dtype):
    w = _pruned_2of4(1536, 576, dtype, "cuda")
    x = torch.randn(2, 64, 576, dtype=dtype, device="cuda")
    sparse = to_semi_structured(w)
    out = torch.nn.functional.linear(x, sparse)
    ref = torch.nn.functional.linear(x, w)
    assert torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_materialize_2of4_model_keeps_its_logits(tokens):
    from compress.calibration import CalibrationData
    from compress.passes import build_config, pass_table
    from compress.sources import load_random

    spec = pass_table()["magnitude"]
    model = spec.apply(load_random("smollm2-135m", torch.float16, device="cuda").model,
                       build_config(spec, {"pattern": "2:4"}), CalibrationData(tokens))
    with torch.no_grad():
        before = model(tokens.cuda()).logits.float()
        names = materialize_2of4(model)
        after = model(tokens.cuda()).logits.float()
    assert len(names) == 7 * model.config.num_hidden_layers
    assert torch.allclose(after, before, rtol=5e-2, atol=5e-2)
