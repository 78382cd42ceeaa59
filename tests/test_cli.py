"""The CLI end to end on a tiny random model: quantize, eval, run, report, sweep, and bad input."""
import json
import os

import pytest
import torch
import yaml

from compress.cli import main

EVAL = ["--windows", "2", "--seq-len", "64"]


def test_quantize_eval_reload_and_report(tmp_path, capsys):
    out = tmp_path / "int4"
    assert main(["quantize", "random:tiny", "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--asymmetric", "--out", str(out), "--eval", *EVAL]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"model", "recipe", "protocol", "metrics", "environment"}
    assert results["recipe"]["passes"] == [{"pass": "rtn", "bits": 4, "group_size": 32,
                                            "symmetric": False}]
    assert results["protocol"]["eval_windows"] == 2 and results["protocol"]["eval_seq_len"] == 64

    base = tmp_path / "base.json"
    assert main(["eval", "random:tiny", "--out", str(base), *EVAL]) == 0
    again = tmp_path / "again.json"
    assert main(["eval", str(out), "--out", str(again), *EVAL]) == 0
    reloaded = json.loads(again.read_text())
    # The reloaded checkpoint evaluates to the same figure as the in-memory compressed model.
    assert reloaded["metrics"]["perplexity"] == results["metrics"]["perplexity"]
    assert reloaded["metrics"]["weight_bytes"] == results["metrics"]["weight_bytes"]
    float_bytes = json.loads(base.read_text())["metrics"]["weight_bytes"]
    assert results["metrics"]["weight_bytes"]["linear"] < 0.2 * float_bytes["linear"]

    report = tmp_path / "report.md"
    assert main(["report", str(base), str(out), "--out", str(report)]) == 0
    text = report.read_text()
    assert "rtn-w4-g32-asym" in text and "baseline" in text and "Δ ppl %" in text


def test_run_recipe_and_sweep(tmp_path):
    recipe = tmp_path / "int8.yaml"
    recipe.write_text(yaml.safe_dump({"name": "int8", "passes": [{"pass": "rtn", "bits": 8}]}))
    assert main(["run", str(recipe), "--model", "random:tiny", "--out", str(tmp_path / "r"),
                 *EVAL]) == 0
    assert json.loads((tmp_path / "r" / "results.json").read_text())["recipe"]["name"] == "int8"
    assert main(["sweep", str(recipe), "--model", "random:tiny", "--out", str(tmp_path / "s"),
                 *EVAL]) == 0
    assert {"baseline.json", "int8.json", "report.md", "report.html", "results.csv"} <= \
        set(os.listdir(tmp_path / "s"))


@pytest.mark.parametrize("argv,message", [
    (["quantize", "random:tiny", "--method", "nope", "--out", "X"], "unknown quantize method 'nope'; allowed: "),
    (["quantize", "random:tiny", "--method", "rtn", "--bits", "4", "--group-size", "48", "--out", "X"],
     "group size 48 does not divide the input width 64"),
    (["quantize", "random:tiny", "--method", "rtn", "--bits", "5", "--out", "X"], "bits must be one of 4, 8"),
    (["quantize", "random:nope", "--method", "rtn", "--out", "X"], "unknown random shape 'nope'; allowed:"),
    (["quantize", "missing.gguf", "--method", "rtn", "--out", "X"], "is not a model folder or an existing .gguf"),
    (["eval", "random:tiny", "--corpus", "missing.txt"], "corpus file 'missing.txt' does not exist"),
    (["run", "missing.yaml", "--out", "X"], "recipe file 'missing.yaml' does not exist"),
    (["report", "missing.json", "--out", "X"], "results file 'missing.json' does not exist"),
    (["quantize", "random:tiny", "--method", "rtn", "--option", "color=red", "--out", "X"],
     r"unknown field(s) color for pass 'rtn'"),
    (["quantize", "random:tiny", "--method", "gptq", "--calib-device", "tpu", "--out", "X"],
     "unknown calibration device 'tpu'; allowed: cpu, cuda, cuda:N"),
    (["quantize", "random:tiny", "--method", "gptq", "--calib-dtype", "int8", "--out", "X"],
     "calibration dtype must be one of bfloat16, float16"),
    (["quantize", "random:tiny", "--method", "rtn", "--bits", "8", "--option", "bits=4", "--out",
      "X"], "--option bits=4 sets bits again, after --bits; give it once"),
    (["quantize", "random:tiny", "--method", "rtn", "--windows", "3", "--out", "X"],
     "--windows has no effect without --eval"),
    (["quantize", "random:tiny", "--method", "rtn", "--corpus", "random", "--out", "X"],
     "--corpus has no effect without --eval (rtn does not calibrate)"),
    (["quantize", "random:tiny", "--method", "fp8", "--calib-samples", "4", "--out", "X"],
     "--calib-samples has no effect: fp8 does not calibrate"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not os.path.exists(tmp_path / "X")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_existing_output_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "X").mkdir()
    assert main(["quantize", "random:tiny", "--method", "rtn", "--out", str(tmp_path / "X")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert os.listdir(tmp_path / "X") == []


def test_usage_errors_exit_2_on_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "random:tiny", "--bogus"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_help_explains_every_subcommand(capsys):
    from compress.cli import SUBCOMMANDS

    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: compress " + name in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["eval", "some-org/some-model"], "could not load model 'some-org/some-model' as a hub id"),
    (["eval", "random:tiny", "--corpus", "wikitext"],
     "corpus 'wikitext' is a hub dataset and the Hugging Face hub is not reachable"),
])
def test_hub_names_offline_fail_with_one_line(argv, message, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_calibration_device_and_random_corpus(tmp_path, capsys):
    """GPTQ calibrated on an explicit device over random tokens (the 8B timing setup, tiny)."""
    out = tmp_path / "g"
    assert main(["quantize", "random:tiny", "--method", "gptq", "--bits", "4", "--group-size",
                 "32", "--corpus", "random", "--calib-samples", "4", "--calib-seq-len", "64",
                 "--calib-device", "cpu", "--out", str(out)]) == 0
    assert "compressed in" in capsys.readouterr().out
    recipe = json.loads((out / "compress.json").read_text())["recipe"]
    assert recipe["corpus"] == "random" and recipe["calibration"]["device"] == "cpu"
    # Evaluated on another corpus, the results do not claim that corpus's calibration split.
    for corpus, source in (("random", "uniform random token ids"),
                           ("pydoc", "corpus 'random' (evaluated on 'pydoc')")):
        file = tmp_path / f"{corpus}.json"
        assert main(["eval", str(out), "--corpus", corpus, "--windows", "1", "--seq-len", "32",
                     "--out", str(file)]) == 0
        assert json.loads(file.read_text())["protocol"]["calibration"]["source"].startswith(source)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_recipe_asking_for_a_gpu_calibration_fails_cleanly_without_cuda(tmp_path, capsys):
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text(yaml.safe_dump({"name": "g", "calibration": {"device": "cuda"},
                                      "passes": [{"pass": "gptq", "group_size": 32}]}))
    assert main(["run", str(recipe), "--model", "random:tiny", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "calibration device 'cuda' asked but CUDA is not available" in err and "\n" not in err
    assert os.listdir(tmp_path) == ["gptq.yaml"]


def test_a_recipe_asks_for_a_benchmark_before_and_after(tmp_path, capsys):
    recipe = tmp_path / "int8.yaml"
    bench = {"batches": "1", "prompt": 8, "new": 4, "prefill": "1x16", "warmup": 0, "repeats": 1}
    recipe.write_text(yaml.safe_dump({"name": "int8", "bench": bench,
                                      "passes": [{"pass": "rtn", "bits": 8}]}))
    out = tmp_path / "r"
    assert main(["run", str(recipe), "--model", "random:tiny", "--out", str(out), *EVAL]) == 0
    before = json.loads((out / "baseline.json").read_text())
    after = json.loads((out / "results.json").read_text())
    for doc in (before, after):
        speed = doc["metrics"]["speed"]
        assert speed["decode"][0]["batch"] == 1 and speed["decode"][0]["ms_per_token"] > 0
        assert speed["prefill"][0]["tokens"] == 16
        assert doc["protocol"]["speed"]["prompt"] == 8
    assert after["recipe"]["bench"]["prefill"] == "1x16"
    assert after["metrics"]["weight_bytes"]["linear"] < before["metrics"]["weight_bytes"]["linear"]
    assert "speed-up verdict" in capsys.readouterr().out
    # How a model is timed is not what it is: the bench section leaves the recipe hash alone.
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"name": "int8", "passes": [{"pass": "rtn", "bits": 8}]}))
    from compress.recipe import load_recipe
    same = load_recipe(str(plain))
    same.model, same.evaluation.windows, same.evaluation.seq_len = "random:tiny", 2, 64
    assert same.resolved()["hash"] == after["recipe"]["hash"]


def test_a_benchmark_without_evaluation_is_refused(tmp_path, capsys):
    recipe = tmp_path / "int8.yaml"
    recipe.write_text(yaml.safe_dump({"name": "int8", "bench": {"batches": "1"},
                                      "passes": [{"pass": "rtn", "bits": 8}]}))
    assert main(["run", str(recipe), "--model", "random:tiny", "--out", str(tmp_path / "r"),
                 "--no-eval"]) == 2
    assert "drop --no-eval" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
