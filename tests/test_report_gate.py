"""The `compress report` gate: thresholds on perplexity, speed, KL and top-1 end in exit 1 with
one line per broken threshold; a threshold without its figure, or bad gate input, is exit 2 with
nothing written."""
import json
import math

import pytest

from compress.cli import main
from test_report import SPEED_PROTOCOL, _write, result


def test_gate_fails_with_exit_1_and_one_line_per_broken_threshold(tmp_path, capsys):
    paths = _write(tmp_path, old=result(ppl=10.0, ms=10, kl=0.0),
                   new=result("int4", ppl=10.3, ms=12.5, kl=0.05))
    argv = ["report", "--baseline", paths["old"], paths["new"]]
    code = main(argv + ["--max-ppl-increase", "2%", "--min-decode-speedup", "1.0",
                        "--max-kl", "0.1"])
    out = capsys.readouterr().out
    assert code == 1
    failed = [line for line in out.splitlines() if line.startswith("GATE FAILED")]
    assert len(failed) == 2
    assert "perplexity +3.00% > allowed +2%" in failed[0]
    assert "decode speed-up 0.800x < required 1x at batch 1" in failed[1]
    # The same result passes looser thresholds, at a batch the user picks.
    assert main(argv + ["--max-ppl-increase", "3.5", "--min-decode-speedup", "0.75",
                        "--decode-batch", "8", "--max-kl", "0.1"]) == 0
    assert "gate passed: 1 result(s)" in capsys.readouterr().out


@pytest.mark.parametrize("broken,flags", [
    (result("int4", ppl=math.nan), ["--max-ppl-increase", "50%"]),
    (result("int4", ms=math.nan), ["--min-decode-speedup", "0.1"]),
    (result("int4", kl=math.nan), ["--max-kl", "1", "--min-top1-agreement", "0"]),
])
def test_a_figure_that_is_not_a_number_fails_the_gate(tmp_path, capsys, broken, flags):
    # A model whose logits overflowed gives NaN perplexity: every comparison with NaN is
    # False, so a gate written as `value > limit` would pass it.
    paths = _write(tmp_path, old=result(ppl=10.0, ms=10, kl=0.0), new=broken)
    assert main(["report", "--baseline", paths["old"], paths["new"], *flags]) == 1
    assert "GATE FAILED int4" in capsys.readouterr().out


def test_gate_passes_when_the_new_model_is_better(tmp_path, capsys):
    paths = _write(tmp_path, old=result(ppl=10.0, ms=10), new=result("x", ppl=9.9, ms=5))
    assert main(["report", paths["old"], paths["new"], "--max-ppl-increase", "0%",
                 "--min-decode-speedup", "1.5", "--min-prefill-speedup", "1.5"]) == 0


@pytest.mark.parametrize("docs,flags,message", [
    ({"old": result(), "new": result("x")}, ["--min-decode-speedup", "1"],
     "--min-decode-speedup needs speed figures, which the baseline does not have"),
    ({"old": result(ms=1), "new": result("x")}, ["--min-decode-speedup", "1"],
     "--min-decode-speedup needs speed figures, which x"),
    ({"old": result(), "new": result("x")}, ["--max-kl", "0.1"], "--max-kl needs kl_divergence"),
    ({"old": result(ms=1), "new": result("x", ms=1)},
     ["--min-decode-speedup", "1", "--decode-batch", "4"], "--decode-batch 4 was not measured"),
    ({"old": result(), "new": result("x")}, ["--max-ppl-increase", "two"],
     "--max-ppl-increase expects a percentage"),
])
def test_a_threshold_without_its_figure_is_bad_input(tmp_path, capsys, docs, flags, message):
    paths = _write(tmp_path, **docs)
    assert main(["report", "--baseline", paths["old"], paths["new"], *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_recipe_that_failed_in_the_sweep_fails_the_gate(tmp_path, capsys):
    folder = tmp_path / "sweep"
    folder.mkdir()
    _write(folder, baseline=result(ppl=10.0), a=result("a", ppl=10.1))
    (folder / "failures.json").write_text(json.dumps({"b": "RuntimeError: out of memory"}))
    assert main(["report", str(folder), "--max-ppl-increase", "2%"]) == 1
    gate = [line for line in capsys.readouterr().out.splitlines() if line.startswith("GATE")]
    assert gate == ["GATE FAILED b: the recipe failed in the sweep (RuntimeError: out of memory)"]
    (folder / "a.json").unlink()           # only the failure is left to gate: still a failure
    assert main(["report", str(folder), "--max-ppl-increase", "2%"]) == 1
    assert main(["report", str(folder)]) == 0      # no thresholds: a report, not a gate


@pytest.mark.parametrize("flags", [["--min-decode-speedup", "1"], ["--max-kl", "1"],
                                   ["--min-decode-speedup", "1", "--decode-batch", "3"]])
@pytest.mark.parametrize("out", ["r.md", "r.html", "rep"])
def test_bad_gate_input_writes_no_report(tmp_path, capsys, flags, out):
    paths = _write(tmp_path, old=result(ms=10), new=result("x"))
    assert main(["report", "--baseline", paths["old"], paths["new"], "--out",
                 str(tmp_path / out), *flags]) == 2
    assert not (tmp_path / out).exists()
    no_baseline = _write(tmp_path, a=result("a"), b=result("b"))
    assert main(["report", no_baseline["a"], no_baseline["b"], "--out", str(tmp_path / out),
                 "--max-ppl-increase", "1"]) == 2
    assert not (tmp_path / out).exists()


def test_gate_top1_agreement_fails_below_and_passes_above(tmp_path, capsys):
    paths = _write(tmp_path, old=result(kl=0.0), new=result("int4", kl=0.05))   # top-1 0.95
    argv = ["report", "--baseline", paths["old"], paths["new"]]
    assert main(argv + ["--min-top1-agreement", "0.99"]) == 1
    assert "top-1 agreement 0.9500 < required 0.99" in capsys.readouterr().out
    assert main(argv + ["--min-top1-agreement", "0.9"]) == 0


@pytest.mark.parametrize("broken,flags", [
    (result("int4", kl=math.nan), ["--max-kl", "1"]),
    (result("int4", kl=math.nan), ["--min-top1-agreement", "0"]),
    (result("int4", ms=math.nan), ["--min-prefill-speedup", "0.1"]),
])
def test_each_nan_figure_alone_fails_the_gate(tmp_path, capsys, broken, flags):
    paths = _write(tmp_path, old=result(ppl=10.0, ms=10, kl=0.0), new=broken)
    assert main(["report", "--baseline", paths["old"], paths["new"], *flags]) == 1
    assert "GATE FAILED int4" in capsys.readouterr().out


def test_a_result_exactly_at_every_threshold_passes(tmp_path, capsys):
    paths = _write(tmp_path, old=result(ppl=10.0, ms=10, kl=0.0),
                   new=result("rerun", ppl=10.0, ms=10, kl=0.0))
    assert main(["report", "--baseline", paths["old"], paths["new"], "--max-ppl-increase", "0%",
                 "--min-decode-speedup", "1", "--min-prefill-speedup", "1", "--max-kl", "0",
                 "--min-top1-agreement", "1"]) == 0


def test_prefill_gate_reads_the_first_shape(tmp_path, capsys):
    old, new = result(ms=10), result("int4", ms=5)   # 2x faster at 1x2048
    for doc, second in ((old, 1000.0), (new, 1000.0)):   # the same at a second shape
        doc["metrics"]["speed"]["prefill"].append({"batch": 8, "tokens": 512,
                                                   "tokens_per_s": second, "ttft_ms": 1.0})
        doc["protocol"]["speed"] = dict(SPEED_PROTOCOL, prefill=[[1, 2048], [8, 512]])
    paths = _write(tmp_path, old=old, new=new)
    assert main(["report", "--baseline", paths["old"], paths["new"],
                 "--min-prefill-speedup", "1.5"]) == 0


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_percentage_is_bad_input(tmp_path, capsys, value):
    paths = _write(tmp_path, old=result(), new=result("x"))
    assert main(["report", "--baseline", paths["old"], paths["new"],
                 "--max-ppl-increase", value]) == 2
