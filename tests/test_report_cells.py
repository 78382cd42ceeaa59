"""Each rendered cell, file and plot of a comparison report shows the field its header names,
and `compress report`'s --title and --baseline reach every output."""
import csv
import json

import pytest

from compress.cli import main
from compress.reports import markdown_report, write_report_files
from compress.reports.content import report_blocks
from test_report import result


def _table(blocks, first_header):
    return next(b for b in blocks if b[0] == "table" and b[1][0] == "recipe"
                and first_header in b[1])


def test_quality_table_columns_show_their_fields():
    base = result()
    new = result("int4", total=300e6)
    new["metrics"].update(compress_seconds=12.5, eval_seconds=99.0,
                          sparsity={"overall": 0.5, "per_layer": {"0": 0.5}})
    _, headers, rows = _table(report_blocks([base, new], plots=False), "compress s")
    cells = dict(zip(headers, rows[1]))
    assert cells["compress s"] == "12.5"          # compress_seconds, not eval_seconds
    assert cells["sparsity %"] == "50.0"          # a percentage of the fraction 0.5


def test_setup_names_window_count_then_length():
    text = markdown_report([result(), result("int4")])
    assert "2 windows of 64 tokens" in text       # PROTOCOL: eval_windows 2, eval_seq_len 64


def test_prefill_speed_up_is_the_prefill_ratio():
    # ms=10 vs ms=4: prefill tokens/s 1000 vs 2500 (x2.50); decode b1 x2.50, b8 x2.50 as well,
    # so give the decode rows other times to tell them apart.
    new = result("int4", ms=4)
    for d in new["metrics"]["speed"]["decode"]:
        d["ms_per_token"] *= 2                    # decode x1.25
    _, headers, rows = _table(report_blocks([result(ms=10), new], plots=False),
                              "prefill 1x2048 tok/s")
    i = headers.index("prefill 1x2048 tok/s")
    assert rows[1][i:i + 2] == ["2,500", "2.50"]
    j = headers.index("decode b1 ms/tok")
    assert rows[1][j + 2] == "1.25"


def test_kernel_table_puts_decode_and_prefill_kernels_in_their_columns():
    new = result("int4", ms=5)
    speed = new["metrics"]["speed"]
    for d in speed["decode"]:
        d["kernels"] = {"q_proj": "int4 triton gemv"}
    speed["prefill"][0]["kernels"] = {"q_proj": "int4 dequant gemm"}
    _, headers, rows = _table(report_blocks([result(ms=10), new], plots=False), "decode kernels")
    assert headers == ["recipe", "decode kernels", "prefill kernels"]
    assert rows[1] == ["int4", "int4 triton gemv", "int4 dequant gemm"]


def test_markdown_report_file_links_the_plots_it_writes(tmp_path):
    names = write_report_files(str(tmp_path), [result(ms=10), result("int4", ppl=10.2,
                                                                     total=300e6, ms=5)])
    text = (tmp_path / "report.md").read_text()
    for png in ("ppl_vs_memory.png", "ppl_vs_decode.png"):
        assert png in names and f"]({png})" in text


def test_csv_holds_the_json_figures_and_the_baseline_given_apart(tmp_path):
    old, new = result(ms=10), result("int4", ppl=10.2, total=300e6, ms=5)
    new["metrics"].update(compress_seconds=12.5, eval_seconds=99.0)
    write_report_files(str(tmp_path), [new], baseline=old)
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["baseline", "int4"]
    assert [r["is_baseline"] for r in rows] == ["True", "False"]
    assert float(rows[1]["compress_s"]) == 12.5 and float(rows[1]["eval_s"]) == 99.0
    assert float(rows[1]["ttft_ms_1x2048"]) == new["metrics"]["speed"]["prefill"][0]["ttft_ms"]
    assert float(rows[1]["ppl_delta_pct"]) == pytest.approx(2.0)


def test_plots_use_the_columns_their_axes_name(monkeypatch):
    from compress.reports import plots
    from compress.reports.frame import results_frame

    calls = []
    monkeypatch.setattr(plots, "_scatter", lambda frame, x_col, label, title, maximize_x:
                        calls.append((x_col, maximize_x)) or b"png")
    frame = results_frame([result(ms=10), result("int4", ppl=10.2, total=300e6, ms=5)])
    plots.ppl_vs_memory(frame)
    plots.ppl_vs_decode(frame)
    # Memory: every stored byte, smaller is better; speed: the smallest batch, faster is better.
    assert calls == [("weight_mb", False), ("decode_tok_s_b1", True)]


@pytest.mark.parametrize("out", ["r.html", "r.md", "dir"])
def test_report_command_title_and_baseline_reach_every_output(tmp_path, capsys, out):
    old, new = result("int4", ppl=10.0), result("int4", ppl=10.2)
    paths = {}
    for key, doc in (("old", old), ("new", new)):
        paths[key] = str(tmp_path / f"{key}.json")
        (tmp_path / f"{key}.json").write_text(json.dumps(doc))
    target = tmp_path / out
    assert main(["report", paths["new"], "--baseline", paths["old"], "--title", "Nightly",
                 "--out", str(target)]) == 0
    assert capsys.readouterr().out.startswith("# Nightly")
    files = [target] if out != "dir" else [target / "report.md", target / "report.html"]
    for file in files:
        text = file.read_text()
        assert ("<h1>Nightly</h1>" if file.suffix == ".html" else "# Nightly\n") in text
        assert "int4 (baseline)" in text and "+2.00" in text   # the deltas are against OLD
    if out == "dir":
        with open(target / "results.csv") as handle:
            assert [r["name"] for r in csv.DictReader(handle)] == ["int4 (baseline)", "int4"]
