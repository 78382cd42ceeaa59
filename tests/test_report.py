"""Comparison reports and the regression gate (compress/reports, `compress report`), on hand-built
results JSONs: fast, and every figure known in advance."""
import json
import math
import re

import pytest

from compress.cli import main
from compress.reports import html_report, markdown_report, write_report_files
from compress.reports.frame import pareto_front, results_frame
from compress.reports.verdict import shape_speedups, verdict

PROTOCOL = {"corpus": "pydoc", "eval_seq_len": 64, "eval_windows": 2, "dtype": "float32",
            "device": "cpu"}
ENV = {"compress": "0.1.0", "torch": "2", "transformers": "5", "python": "3.11",
       "platform": "Linux", "cpu": "x86_64", "threads": 2, "gpu": None, "date": "2025-01-01"}
SPEED_PROTOCOL = {"batches": [1, 8], "prompt": 512, "new_tokens": 128, "prefill": [[1, 2048]],
                  "warmup": 2, "repeats": 5, "compile": False, "device": "cpu"}


def result(name=None, ppl=10.0, total=1000e6, ms=None, kl=None, tasks=None) -> dict:
    metrics = {"perplexity": ppl, "weight_bytes": {"total": total, "linear": total * 0.7,
                                                   "embedding": total * 0.3, "lm_head": 0,
                                                   "other": 0}}
    protocol = dict(PROTOCOL)
    if kl is not None:
        metrics.update(kl_divergence=kl, top1_agreement=1 - kl)
    if ms is not None:  # decode ms/token at batch 1 and 8; prefill 1000 tokens/s per ms saved
        metrics["speed"] = {"gpu": None, "cpu": "x86_64", "threads": 2,
                            "prefill": [{"batch": 1, "tokens": 2048, "tokens_per_s": 1e4 / ms,
                                         "ttft_ms": ms * 20}],
                            "decode": [{"batch": b, "ms_per_token": ms * b ** 0.5,
                                        "tokens_per_s": 1e3 * b / (ms * b ** 0.5),
                                        "pct_of_roofline": 50.0} for b in (1, 8)]}
        protocol["speed"] = SPEED_PROTOCOL
    if tasks is not None:
        metrics["tasks"] = {"t": {"acc": tasks, "acc_stderr": 0.02, "samples": 100}}
        protocol["tasks"] = {"names": ["t"], "limit": None, "num_fewshot": None,
                             "lm_eval": "0.4.13", "data_files": {}}
    recipe = None if name is None else {"name": name, "hash": f"hash-{name}",
                                        "passes": [{"pass": "rtn", "bits": 4}]}
    return {"model": {"source": "random:tiny", "architecture": "llama", "parameters": 1e6},
            "recipe": recipe, "protocol": protocol, "metrics": metrics, "environment": ENV}


def _write(tmp_path, **docs) -> dict:
    paths = {}
    for key, doc in docs.items():
        paths[key] = str(tmp_path / f"{key}.json")
        (tmp_path / f"{key}.json").write_text(json.dumps(doc))
    return paths


def test_frame_has_absolute_figures_and_deltas():
    frame = results_frame([result(ppl=10.0, ms=10), result("a", ppl=10.5, total=250e6, ms=5,
                                                          kl=0.02, tasks=0.6)])
    a = frame.iloc[1]
    assert a["ppl_delta_pct"] == pytest.approx(5.0)
    assert a["weight_ratio"] == pytest.approx(4.0)
    assert a["decode_speedup_b1"] == pytest.approx(2.0)
    assert a["prefill_speedup_1x2048"] == pytest.approx(2.0)
    assert a["kl_divergence"] == 0.02
    assert math.isnan(frame.iloc[0]["kl_divergence"])
    assert math.isnan(a["task:t:acc_delta"])  # the baseline has no task score to compare with


def test_speed_verdict_names_where_a_recipe_wins_and_says_memory_only_otherwise():
    speedups = [("prefill 1x2048", 0.8), ("decode b1", 2.1), ("decode b8", 1.03)]
    assert verdict(speedups, 4.0) == ("decode b1", "decode b8", "prefill 1x2048",
                                      "mixed: faster at some shapes, slower at others")
    assert verdict([("decode b1", 0.97), ("decode b8", 0.5)], 4.0)[3] == \
        "memory only: smaller, no faster, slower at some shapes"
    assert verdict([("decode b1", 0.97)], 4.0)[3] == "memory only: smaller, no faster"
    assert verdict([("decode b1", 1.5), ("decode b8", 1.2)], 4.0)[3] == \
        "faster at every measured shape"
    assert verdict([("decode b1", 0.99)], 1.0)[3] == "no change"
    assert verdict([], 4.0)[3] == "not measured"
    # The same figures through the frame: a 4x smaller model, 2x slower everywhere.
    frame = results_frame([result(ms=10), result("slow", total=250e6, ms=20)])
    assert list(frame["speed_verdict"]) == ["baseline", "memory only: smaller but slower at "
                                            "every measured shape"]
    row = frame.iloc[1].to_dict()
    assert shape_speedups(row, ["1x2048"], [1, 8]) == [("prefill 1x2048", 0.5),
                                                      ("decode b1", 0.5), ("decode b8", 0.5)]
    assert "| slow | memory only" in markdown_report([result(ms=10), result("slow", ms=20,
                                                                          total=250e6)])


def test_pareto_front_minimizes_perplexity_against_memory_or_speed():
    memory, ppl = [100, 50, 60, 25, 30], [10, 11, 12, 14, 13]
    # 60 MB at ppl 12 is beaten by 50 MB at 11; the others each win somewhere.
    assert pareto_front(memory, ppl) == [3, 4, 1, 0]
    speed = [10, 20, 15, float("nan")]
    assert pareto_front(speed, [10, 11, 12, 9], maximize_x=True) == [0, 1]


def test_markdown_and_html_state_protocol_machine_and_hashes():
    results = [result(ppl=10.0, ms=10), result("int4", ppl=10.4, total=300e6, ms=8, kl=0.01)]
    text = markdown_report(results, title="T")
    assert "hash-int4" in text and "pydoc" in text and "compress 0.1.0" in text
    assert "CPU x86_64 (2 threads)" in text and "not GPU figures" in text
    assert "| int4 | 10.400 | +4.00 | 0.01 | 99.00 |" in text
    page = html_report(results, title="T")
    assert page.count("data:image/png;base64,") == 2  # memory and decode plots


def test_report_folder_command_writes_every_file(tmp_path):
    paths = _write(tmp_path, base=result(), new=result("int4", ppl=10.2, total=300e6))
    out = tmp_path / "rep"
    assert main(["report", paths["base"], paths["new"], "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ppl_vs_memory.png", "report.html",
                                                     "report.md", "results.csv"]
    assert main(["report", paths["base"], paths["new"], "--out", str(tmp_path / "r.html")]) == 0
    assert "<img" in (tmp_path / "r.html").read_text()


def test_different_protocols_are_refused(tmp_path, capsys):
    other = result("x")
    other["protocol"]["eval_windows"] = 20
    paths = _write(tmp_path, old=result(), new=other)
    assert main(["report", paths["old"], paths["new"], "--max-ppl-increase", "1%"]) == 2
    assert "different protocols" in capsys.readouterr().err


def test_html_has_no_external_reference(tmp_path):
    results = [result(ms=10), result("a", ppl=11, total=500e6, ms=9, kl=0.1, tasks=0.5)]
    names = write_report_files(str(tmp_path), results, title="offline")
    page = (tmp_path / "report.html").read_text()
    assert set(names) >= {"report.md", "report.html", "results.csv", "ppl_vs_memory.png",
                          "ppl_vs_decode.png"}
    assert_self_contained(page, images=2)


def assert_self_contained(page: str, images: int) -> None:
    """No script, stylesheet link, import or URL; every image is an embedded PNG."""
    import base64

    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == images
    assert all(base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n") for data in embedded)
    rest = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    for banned in ("http:", "https:", "//cdn", "<script", "<link", "@import", "url(", "src=\"/"):
        assert banned not in rest.lower()
    assert rest.count("<img") == images


def test_a_sweep_folder_stands_for_its_json_files(tmp_path, capsys):
    folder = tmp_path / "sweep"
    folder.mkdir()
    _write(folder, baseline=result(ppl=10.0), a=result("a", ppl=10.1), b=result("b", ppl=10.5))
    assert main(["report", str(folder), "--max-ppl-increase", "2%"]) == 1
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("GATE")] == \
        [f"GATE FAILED b ({folder / 'b.json'})"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2


def test_plot_labels_stay_in_the_order_of_their_points():
    """Two recipes at one size a few pixels apart: the upper point's name is above the lower
    one's, and a label moved off its point is tied to it by a leader line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from compress.reports.plots import _label

    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x, y, names = [173.1, 173.1, 220.2, 90.0], [14.719, 14.875, 12.43, 30.0], ["gptq", "awq", "i8", "x"]
    ax.scatter(x, y)
    ax.set_ylim(0, 400)                       # 14.7 and 14.9 are under a pixel apart
    _label(ax, fig, x, y, names)
    text_y = {}
    for note in ax.texts:
        point_y = ax.transData.transform(note.xy)[1]
        text_y[note.get_text()] = point_y + note.xyann[1]
        assert (note.arrow_patch is not None) == (note.xyann[1] != -6), note.get_text()
    assert text_y["awq"] > text_y["gptq"]
    assert ax.texts[[t.get_text() for t in ax.texts].index("x")].arrow_patch is None


def test_speed_is_not_borrowed_from_two_runs_at_once():
    from compress.errors import UserError
    from compress.reports.speed_source import attach_speed

    quality = [result(), result("int4")]
    run1 = [("run1/baseline.json", result(ms=10)), ("run1/int4.json", result("int4", ms=8))]
    run2 = [("run2/baseline.json", result(ms=12)), ("run2/int4.json", result("int4", ms=9))]
    with pytest.raises(UserError, match="run1/baseline.json and run2/baseline.json both time"):
        attach_speed(quality, run1 + run2)
    assert attach_speed(quality, run1) == []


def test_a_baseline_given_apart_is_a_row_and_is_told_by_identity_not_name(tmp_path):
    # CI: the same recipe against its earlier run. The new run must get a verdict, and the row
    # its deltas are against must be in the tables.
    old, new = result("int4", ppl=10.0, ms=10), result("int4", ppl=10.2, ms=20)
    frame = results_frame([new], old)
    assert list(frame["name"]) == ["int4 (baseline)", "int4"]
    assert list(frame["speed_verdict"]) == ["baseline", "slower"]
    assert frame["decode_speedup_b1"].iloc[1] == pytest.approx(0.5)
    text = markdown_report([new], old)
    assert "| int4 (baseline) |" in text and "| int4 | slower |" in text


def test_speed_from_other_machines_or_runtime_options_is_not_compared():
    from compress.errors import UserError

    old, new = result(ms=10), result("int4", ms=8)
    new["metrics"]["speed"]["gpu"] = "NVIDIA H200"
    with pytest.raises(UserError, match="different machines"):
        results_frame([old, new])
    new = result("int4", ms=8)
    new["protocol"]["speed"] = dict(SPEED_PROTOCOL, tune_kernels=True)
    with pytest.raises(UserError, match="speed figures measured on different protocols"):
        results_frame([old, new])
    new["protocol"]["speed"] = dict(SPEED_PROTOCOL, tune_kernels=False)  # absent means off
    assert len(results_frame([old, new])) == 2


def test_the_speed_note_comes_from_a_timed_result_when_the_baseline_was_not_timed():
    text = markdown_report([result("int4", ms=8)], result())
    assert "decode prompt 512, 128 new tokens" in text and "prompt None" not in text


def test_task_scores_compare_only_on_the_same_items():
    from compress.errors import UserError

    old, new = result(tasks=0.5), result("int4", tasks=0.4)
    old["protocol"]["tasks"].update(names=["t", "u"], data_files={"t": {"path": "a", "sha256": "1"}})
    new["protocol"]["tasks"].update(names=["u", "t"], data_files={"t": {"path": "b", "sha256": "1"}})
    assert len(results_frame([old, new])) == 2        # order of names and file paths do not matter
    new["protocol"]["tasks"]["data_files"]["t"]["sha256"] = "2"
    with pytest.raises(UserError, match="tasks figures measured on different protocols"):
        results_frame([old, new])


def _drop(doc: dict, *keys) -> dict:
    inner = doc
    for key in keys[:-1]:
        inner = inner[key]
    del inner[keys[-1]]
    return doc


@pytest.mark.parametrize("doc,message", [
    ([1, 2], "a JSON list, not an object"),
    (_drop(result("x"), "metrics", "perplexity"), "metrics.perplexity is not a number"),
    (dict(result("x"), metrics=[]), "metrics.perplexity is not a number"),
    (_drop(result("x"), "metrics", "weight_bytes", "linear"), "metrics.weight_bytes.total"),
    (dict(result("x"), protocol=None), "protocol is not an object"),
    (_drop(result("x", ms=1), "metrics", "speed", "decode"), "metrics.speed must hold"),
])
def test_a_results_file_of_another_shape_is_one_line_of_bad_input(tmp_path, capsys, doc, message):
    paths = _write(tmp_path, old=result(), new=doc)
    assert main(["report", paths["old"], paths["new"]]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a compress results file" in err and message in err and "\n" not in err


def test_a_baseline_inside_the_sweep_folder_is_one_row(tmp_path, capsys):
    folder = tmp_path / "sweep"
    folder.mkdir()
    _write(folder, baseline=result(ppl=10.0), a=result("a", ppl=10.1))
    assert main(["report", str(folder), "--baseline", str(folder / "baseline.json"),
                 "--max-ppl-increase", "2%"]) == 0
    out = capsys.readouterr().out
    # One row in each of the two tables (quality, recipes), where it was two in each.
    assert out.count("| baseline |") == 2 and "gate passed: 1 result(s)" in out


def test_results_of_another_model_are_refused(tmp_path, capsys):
    other = result("a")
    other["model"] = dict(other["model"], source="random:llama3.2-1b")
    paths = _write(tmp_path, old=result(), new=other)
    assert main(["report", "--baseline", paths["old"], paths["new"], "--max-ppl-increase",
                 "5%"]) == 2
    assert "results of different models cannot be compared: random:tiny vs random:llama3.2-1b" \
        in capsys.readouterr().err
    # A checkpoint's provenance names the model it came from; one GGUF at two paths is one model.
    for doc, source, sha in ((other, "random:tiny", None), (result(), "/a/m.gguf", "f00"),
                             (result("b"), "/b/m.gguf", "f00")):
        doc["model"]["provenance"] = {"source": source, **({"sha256": sha} if sha else {})}
    assert results_frame([result(), other]).shape[0] == 2
    assert results_frame([result(), result("b")]).shape[0] == 2


def test_kl_of_a_compressed_baseline_says_what_it_was_measured_against():
    plain = markdown_report([result("a", kl=0.1)], result(kl=0.0))
    given = markdown_report([result("a", kl=0.1)], result("b", kl=0.05))
    assert "reference of both is the baseline." in plain
    assert "the uncompressed model of the sweep that measured them" in given


def test_a_baseline_without_tasks_or_speed_does_not_let_other_protocols_through():
    # The baseline evaluated alone (compress eval): the recipes' task and speed figures still
    # share one table and one note, so they must share one protocol.
    from compress.errors import UserError

    a, b = result("a", tasks=0.5, ms=10), result("b", tasks=0.4, ms=8)
    b["protocol"]["tasks"] = dict(b["protocol"]["tasks"], limit=10)
    with pytest.raises(UserError, match="tasks figures measured on different protocols"):
        results_frame([result(), a, b])
    b = result("b", ms=8)
    b["protocol"]["speed"] = dict(SPEED_PROTOCOL, prompt=2048)
    with pytest.raises(UserError, match="speed figures measured on different protocols"):
        results_frame([result(), a, b])


def test_the_task_note_comes_from_a_scored_result_when_the_baseline_was_not_scored():
    scored = result("int4", tasks=0.4)
    scored["protocol"]["tasks"].update(limit=10, num_fewshot=5)
    text = markdown_report([scored], result())
    assert "lm-eval 0.4.13" in text and "limit 10, few-shot 5" in text


def test_borrowed_speed_names_the_dtype_it_was_timed_in():
    from compress.reports.speed_source import attach_speed

    quality = [result(), result("int4")]                     # float32 on the CPU
    donors = [(f"gpu/{n}.json", result(n if n != "baseline" else None, ms=m))
              for n, m in (("baseline", 10), ("int4", 5))]
    for _, d in donors:
        d["protocol"]["dtype"] = "bfloat16"
        d["model"]["source"] = "random:tiny-gpu"
    assert attach_speed(quality, donors) == []
    text = markdown_report(quality)
    assert "timed on random:tiny-gpu in bfloat16" in text


def test_speed_of_two_runs_is_not_said_to_be_of_the_same_run():
    old, new = result(ms=10), result("int4", ms=8)
    old["metrics"]["speed"]["ceilings"] = {"copy": {"bytes_per_s": 27e9}}
    new["metrics"]["speed"]["ceilings"] = {"copy": {"bytes_per_s": 37e9}}
    assert "measured in the same run" not in markdown_report([old, new])
    new["metrics"]["speed"]["ceilings"] = old["metrics"]["speed"]["ceilings"]
    assert "Speed-up is over the baseline measured in the same run" in markdown_report([old, new])


def test_a_nan_perplexity_reads_nan_not_unmeasured():
    """Perplexity is always measured: NaN means a broken model and must not read as "-"."""
    text = markdown_report([result("x", ppl=float("nan"))], result())
    assert "| x | nan | nan |" in text


def test_software_line_names_the_code_of_every_row_not_only_the_baselines():
    base = result(ppl=10.0)
    base["environment"] = dict(ENV, source={"commit": "aaaaaaaaaaaa", "dirty": True})
    later = result("int4", ppl=10.4, total=300e6)
    later["environment"] = dict(ENV, torch="2.9", source={"commit": "bbbbbbbbbbbb", "dirty": False})
    same = result("int8", ppl=10.1, total=500e6)
    same["environment"] = dict(ENV, source={"commit": "cccccccccccc", "dirty": False})
    text = markdown_report([base, later, same], title="T")
    software = next(line for line in text.splitlines() if line.startswith("- Software:"))
    # Commits of the same versions share one entry; other versions get their own.
    assert f"(git aaaaaaaaaaaa, with uncommitted changes; git cccccccccccc), torch {ENV['torch']}" \
        in software
    assert "(git bbbbbbbbbbbb), torch 2.9" in software
