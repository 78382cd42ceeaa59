"""The sparsity a pruned model really has is reported wherever it goes (no --eval, a reload, a
later pass), recipes that would break it are refused, and pruning runs are told apart by name."""
from __future__ import annotations

import json

import pytest
import torch

from compress.adapters import decoder_linears
from compress.calibration import CalibrationData
from compress.checkpoint import read_meta
from compress.cli import main
from compress.errors import UserError
from compress.passes import build_config, pass_table
from compress.prune import masks, shrink
from compress.recipe import apply_recipe, load_recipe, recipe_from_dict

EVAL = ["--windows", "2", "--seq-len", "64"]
CALIB = ["--calib-samples", "4", "--calib-seq-len", "64"]


def test_prune_without_eval_reports_and_records_the_sparsity(tmp_path, capsys):
    out = tmp_path / "wanda"
    assert main(["prune", "random:tiny", "--method", "wanda", "--out", str(out), *CALIB]) == 0
    assert "sparsity reached 0.5000 of decoder linear weights" in capsys.readouterr().out
    meta = read_meta(str(out))
    assert meta["recipe"]["name"] == "wanda-s0.5"
    assert meta["reports"]["sparsity"]["overall"] == 0.5
    # `compress eval` of the checkpoint carries it into its results.
    assert main(["eval", str(out), "--out", str(tmp_path / "e.json"), *EVAL]) == 0
    metrics = json.loads((tmp_path / "e.json").read_text())["metrics"]
    assert metrics["sparsity"]["overall"] == 0.5 and metrics["sparsity"]["method"] == "wanda"


@pytest.mark.parametrize("method,flags,name", [
    ("sparsegpt", ["--pattern", "2:4"], "sparsegpt-2of4"),
    ("wanda", ["--sparsity", "0.7", "--profile", "owl"], "wanda-s0.7-owl"),
    ("heads", ["--ratio", "0.5", "--option", "mode=query"], "heads-r0.5-query"),
    ("layers", ["--drop", "1"], "layers-d1"),
])
def test_pruning_runs_are_named_by_their_settings(tmp_path, method, flags, name):
    out = tmp_path / "out"
    assert main(["prune", "random:tiny", "--method", method, *flags, "--out", str(out),
                 *CALIB]) == 0
    assert read_meta(str(out))["recipe"]["name"] == name


def _apply(tiny_model, tokens, passes):
    recipe = recipe_from_dict({"passes": passes}, "t")
    return apply_recipe(tiny_model, recipe, CalibrationData(tokens, batch_size=2))


def test_the_sparsity_report_is_recounted_after_the_whole_recipe(tiny_model, tokens):
    model = _apply(tiny_model, tokens, [{"pass": "magnitude", "sparsity": 0.5},
                                        {"pass": "layers", "drop": 1},
                                        {"pass": "rtn", "bits": 8}])
    report = model.compress_report["sparsity"]
    zeros = sum(int((linear.dequantize(torch.float32) == 0).sum())
                for _, linear in decoder_linears(model))
    assert report["zeros"] == zeros and list(report["per_layer"]) == ["0"]
    assert report["method"] == "magnitude" and report["overall"] >= 0.5


@pytest.mark.parametrize("structured", [{"pass": "mlp-channels", "ratio": 0.25},
                                        {"pass": "heads", "ratio": 0.5}])
def test_structured_pruning_after_a_sparsity_pass_is_refused(tiny_model, tokens, structured):
    with pytest.raises(UserError, match="before magnitude / wanda / sparsegpt"):
        _apply(tiny_model, tokens, [{"pass": "sparsegpt", "pattern": "2:4"}, structured])


def test_two_structured_passes_keep_both_reports(tiny_model, tokens):
    model = _apply(tiny_model, tokens, [{"pass": "mlp-channels", "ratio": 0.25},
                                        {"pass": "layers", "drop": 1}])
    report = model.compress_report["structured"]
    assert report["method"] == "layers"
    assert [r["method"] for r in report["earlier_passes"]] == ["mlp-channels"]
    assert report["earlier_passes"][0]["parameters_before"] > report["parameters_before"]


def test_row_mass_reaches_targets_past_the_reference_bracket():
    scores = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)).abs()
    for target in (0.5, 0.95, 0.98):
        reached = 1 - masks.row_mass_mask(scores, target).float().mean().item()
        assert abs(reached - target) <= masks.MASS_TOLERANCE, target


def test_a_global_ratio_past_what_the_floor_allows_is_a_user_error():
    scores = [torch.rand(192), torch.rand(192)]
    assert sum(shrink.global_keep_counts(scores, 0.5, 24)) == 192
    with pytest.raises(UserError, match="at most 0.8750"):
        shrink.global_keep_counts(scores, 0.95, 24)


def test_an_unquoted_n_m_pattern_stays_a_pattern(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("passes:\n  - pass: wanda\n    pattern: 2:4\n")
    assert load_recipe(str(path)).passes[0][1].pattern == "2:4"
    out = tmp_path / "out"
    assert main(["prune", "random:tiny", "--method", "wanda", "--option", "pattern=2:4",
                 "--out", str(out), *CALIB]) == 0
    assert read_meta(str(out))["reports"]["sparsity"]["pattern"] == "2:4"


def test_sparsegpt_n_m_needs_whole_groups_per_block():
    with pytest.raises(UserError, match="blocksize that is a multiple of 5"):
        build_config(pass_table()["sparsegpt"], {"pattern": "3:5"})
    build_config(pass_table()["sparsegpt"], {"pattern": "3:5", "blocksize": 125})
