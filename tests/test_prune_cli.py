"""`compress prune` and pruning recipes end to end on random:tiny: the checkpoint and results.json
carry the pruning really done, prune-then-quantize chains run and reload, bad input is one line."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from compress.adapters import decoder_linears
from compress.checkpoint import load_checkpoint
from compress.cli import main
from compress.prune import masks
from compress.recipe import load_recipe

EVAL = ["--windows", "2", "--seq-len", "64"]
CALIB = ["--calib-samples", "4", "--calib-seq-len", "64"]
RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")


def _results(folder) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_prune_wanda_reports_reached_sparsity_and_time(tmp_path, capsys):
    out = tmp_path / "wanda"
    assert main(["prune", "random:tiny", "--method", "wanda", "--sparsity", "0.5",
                 "--out", str(out), "--eval", *EVAL, *CALIB]) == 0
    assert "sparsity reached 0.5000 of decoder linear weights" in capsys.readouterr().out
    results = _results(out)
    assert results["recipe"]["passes"][0]["pass"] == "wanda"
    assert results["protocol"]["calibration"]["samples"] == 4
    metrics = results["metrics"]
    assert metrics["compress_seconds"] > 0
    assert metrics["sparsity"]["overall"] == 0.5
    assert metrics["sparsity"]["per_layer"] == {"0": 0.5, "1": 0.5}
    reloaded = load_checkpoint(str(out)).model
    zeros = sum(int((linear.weight == 0).sum()) for _, linear in decoder_linears(reloaded))
    assert zeros == metrics["sparsity"]["zeros"]


def test_prune_sparsegpt_2of4_checkpoint_keeps_the_pattern(tmp_path):
    out = tmp_path / "sgpt"
    assert main(["prune", "random:tiny", "--method", "sparsegpt", "--pattern", "2:4",
                 "--out", str(out), *CALIB]) == 0
    assert not (out / "results.json").exists()        # no --eval: no figures claimed
    for name, linear in decoder_linears(load_checkpoint(str(out)).model):
        assert masks.is_nm(linear.weight != 0, 2, 4), name


def test_prune_mlp_channels_and_layers_give_smaller_stock_loadable_models(tmp_path):
    mlp, layers = tmp_path / "mlp", tmp_path / "layers"
    assert main(["prune", "random:tiny", "--method", "mlp-channels", "--ratio", "0.25",
                 "--out", str(mlp), "--eval", *EVAL, *CALIB]) == 0
    assert main(["prune", "random:tiny", "--method", "layers", "--drop", "1",
                 "--out", str(layers), "--eval", *EVAL, *CALIB]) == 0
    stock = AutoModelForCausalLM.from_pretrained(str(mlp))
    assert stock.config.intermediate_size == 144
    assert stock.model.layers[0].mlp.down_proj.weight.shape == (64, 144)
    report = _results(mlp)["metrics"]["structured"]
    assert report["parameters_after"] == sum(p.numel() for p in stock.parameters())
    assert report["parameters_after"] == _results(mlp)["model"]["parameters"]
    assert AutoModelForCausalLM.from_pretrained(str(layers)).config.num_hidden_layers == 1
    assert len(_results(layers)["metrics"]["structured"]["dropped"]) == 1


def _run(recipe: dict, tmp_path, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / name
    assert main(["run", str(path), "--model", "random:tiny", "--out", str(out), *EVAL]) == 0
    again = tmp_path / f"{name}-again.json"
    assert main(["eval", str(out), "--out", str(again), *EVAL]) == 0
    # The reloaded checkpoint evaluates to the figure of the in-memory compressed model.
    assert json.loads(again.read_text())["metrics"]["perplexity"] == \
        _results(out)["metrics"]["perplexity"]
    return out


def test_recipe_sparsegpt_2of4_then_int4_runs_end_to_end_and_keeps_2of4(tmp_path):
    recipe = {"name": "sgpt-int4", "calibration": {"samples": 4, "seq_len": 64},
              "passes": [{"pass": "sparsegpt", "pattern": "2:4"},
                         {"pass": "rtn", "bits": 4, "group_size": 32, "symmetric": True}]}
    out = _run(recipe, tmp_path, "sgpt-int4")
    # Recounted on the final weights: rounding sends a few more small weights to zero.
    sparsity = _results(out)["metrics"]["sparsity"]
    linears = decoder_linears(load_checkpoint(str(out)).model)
    assert sparsity["zeros"] == sum(int((linear.dequantize(torch.float32) == 0).sum())
                                    for _, linear in linears)
    assert 0.5 <= sparsity["overall"] < 0.51
    for name, linear in linears:
        assert type(linear).__name__ == "Int4Linear", name
        # Symmetric rounding maps zero to code zero: the quantized weights are still 2:4.
        assert masks.is_nm(linear.dequantize(torch.float32) != 0, 2, 4, exact=False), name


def test_recipe_sparsegpt_2of4_then_gptq_int4_keeps_2of4(tmp_path):
    import dataclasses

    from compress.quant.gptq import GPTQConfig

    if "keep_zeros" not in {f.name for f in dataclasses.fields(GPTQConfig)}:
        pytest.skip("GPTQ has no keep_zeros option yet")
    recipe = {"name": "sgpt-gptq", "calibration": {"samples": 4, "seq_len": 64},
              "passes": [{"pass": "sparsegpt", "pattern": "2:4"},
                         {"pass": "gptq", "bits": 4, "group_size": 64, "keep_zeros": True}]}
    out = _run(recipe, tmp_path, "sgpt-gptq")
    for name, linear in decoder_linears(load_checkpoint(str(out)).model):
        assert masks.is_nm(linear.dequantize(torch.float32) != 0, 2, 4, exact=False), name


def test_recipe_mlp_channels_then_int8_runs_end_to_end(tmp_path):
    recipe = {"name": "mlp-int8", "calibration": {"samples": 4, "seq_len": 64},
              "passes": [{"pass": "mlp-channels", "ratio": 0.25}, {"pass": "rtn", "bits": 8}]}
    out = _run(recipe, tmp_path, "mlp-int8")
    model = load_checkpoint(str(out)).model
    down = model.model.layers[0].mlp.down_proj
    assert type(down).__name__ == "Int8Linear" and down.in_features == 144


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(RECIPES, "*.yaml"))))
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.passes and recipe.name == os.path.splitext(os.path.basename(path))[0]


@pytest.mark.parametrize("argv,message", [
    (["--method", "prune-it"], "unknown prune method 'prune-it'; allowed: heads, layers, "),
    (["--method", "wanda", "--sparsity", "1.5"], r"sparsity must be in [0, 1), got 1.5"),
    (["--method", "wanda", "--pattern", "4:2"], "pattern must be unstructured or N:M"),
    (["--method", "sparsegpt", "--pattern", "2:4", "--sparsity", "0.3"],
     "pattern 2:4 implies sparsity 0.5"),
    (["--method", "wanda", "--ratio", "0.25"], "unknown field(s) ratio for pass 'wanda'; allowed:"),
    (["--method", "mlp-channels", "--ratio", "1"], "ratio must be in (0, 1), got 1.0"),
    (["--method", "layers", "--drop", "0"], "drop must be at least 1, got 0"),
    (["--method", "layers", "--drop", "2"], "drop 2 leaves no decoder layer of the model's 2"),
    (["--method", "heads", "--ratio", "0.1"], "removes 0 of 2 KV groups"),
    (["--method", "wanda", "--pattern", "2:4", "--profile", "owl"],
     "profile 'owl' needs pattern unstructured"),
])
def test_bad_prune_input_is_one_line_exit_2_and_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "X"
    assert main(["prune", "random:tiny", *argv, "--out", str(out), *CALIB]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("compress prune: error: ")
    assert message in err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_zero_calibration_samples_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "X"
    assert main(["prune", "random:tiny", "--method", "wanda", "--calib-samples", "0",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "compress prune: error: calibration samples must be a positive integer, got 0"
    assert not out.exists()
