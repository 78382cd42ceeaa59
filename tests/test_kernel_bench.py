"""evaluate/kernel_bench.py on the CPU at a toy shape: one record per (linear, rows), bf16 as the
unit of the speed-ups, and each format's kernel choice as compress/formats makes it."""
import json

import pytest
import torch

from compress.evaluate.kernel_bench import linear_shapes, main


def test_linear_shapes_follow_the_config():
    shapes = linear_shapes("llama3-8b", ["q_proj", "k_proj", "gate_proj", "down_proj"])
    assert shapes == {"q_proj": (4096, 4096), "k_proj": (1024, 4096),
                      "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}


def test_kernel_bench_writes_every_shape_and_kernel(tmp_path):
    out = tmp_path / "k.json"
    assert main(["--shape", "tiny", "--linears", "gate_proj,down_proj", "--rows", "1,200",
                 "--group-size", "32", "--device", "cpu", "--repeats", "1",
                 "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    records = doc["records"]
    assert [(r["linear"], r["rows"]) for r in records] == [
        ("gate_proj", 1), ("gate_proj", 200), ("down_proj", 1), ("down_proj", 200)]
    for r in records:
        assert r["speedup"]["bf16 F.linear"] == 1.0
        assert {"bf16 F.linear", "int4", "int8", "w8a8 int8"} <= set(r["us"])
        assert all(v > 0 for v in r["us"].values())
        # bf16 activations on the CPU: torch's weight-only kernels for decode rows only.
        small = r["rows"] <= 64
        assert r["kernel"]["int8"] == ("torch._weight_int8pack_mm" if small else "reference")
        assert r["kernel"]["int4"] == ("torch._weight_int4pack_mm_for_cpu" if small
                                       else "reference")
    assert "not a GPU figure" in (tmp_path / "k.md").read_text()


def test_a_run_cut_short_keeps_the_records_already_measured(tmp_path, monkeypatch):
    from compress.evaluate import kernel_bench

    def one_then_killed(name, out_features, in_features, *args):
        yield {"linear": name, "out": out_features, "in": in_features, "rows": 1,
               "us": {"bf16 F.linear": 2.0}, "kernel": {"bf16 F.linear": "F.linear"},
               "clock": {}, "speedup": {"bf16 F.linear": 1.0}}
        raise TimeoutError  # as `timeout` stopping the GPU stage

    monkeypatch.setattr(kernel_bench, "bench_shape", one_then_killed)
    out = tmp_path / "k.json"
    with pytest.raises(TimeoutError):
        main(["--shape", "tiny", "--group-size", "32", "--device", "cpu", "--out", str(out)])
    assert [r["linear"] for r in json.loads(out.read_text())["records"]] == ["gate_proj"]
    assert "gate_proj" in (tmp_path / "k.md").read_text()


@pytest.mark.gpu
def test_kernel_bench_times_one_graph_kernels_on_eager_rows_of_a_gpu(tmp_path):
    out = tmp_path / "k.json"
    assert main(["--shape", "tiny", "--linears", "gate_proj", "--rows", "1,200",
                 "--group-size", "32", "--device", "cuda", "--repeats", "1",
                 "--out", str(out)]) == 0
    small, large = json.loads(out.read_text())["records"]
    assert not [k for k in small["us"] if k.endswith("inductor")]   # compiled rows: one graph
    assert large["us"]["w8a8 int8 inductor"] > 0
    assert "inductor graph" in large["kernel"]["w8a8 int8 inductor"]


def test_a_group_size_that_does_not_divide_a_width_is_refused_before_timing(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["--shape", "smollm2-135m", "--linears", "q_proj", "--rows", "1",
                 "--group-size", "128", "--device", "cpu", "--out", str(out)]) == 2
    assert "--group-size: group size 128 does not divide the input width 576 of q_proj" in \
        capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--shape", "foo"], "unknown random shape 'foo'"), (["--linears", "foo"], "--linears"),
    (["--rows", "a"], "--rows"), (["--repeats", "0"], "--repeats")])
def test_bad_arguments_are_one_line_errors_before_timing(tmp_path, capsys, flags, message):
    out = tmp_path / "k.json"
    assert main(["--shape", "tiny", "--group-size", "32", "--device", "cpu", "--out", str(out),
                 *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["--shape", "tiny", "--group-size", "32", "--device", "cuda", "--out", str(out)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err and not out.exists()


def test_an_out_folder_is_refused_before_timing(tmp_path, capsys):
    assert main(["--shape", "tiny", "--group-size", "32", "--device", "cpu", "--rows", "1",
                 "--repeats", "1", "--linears", "q_proj", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path.parent / f"{tmp_path.name}.tmp").exists()


def test_kernel_bench_records_microseconds_and_bf16_over_each_time(monkeypatch):
    from compress.evaluate import kernel_bench

    times = iter([2e-6] + [4e-6] * 100)  # bf16 F.linear is timed first, every other 2x slower
    monkeypatch.setattr(kernel_bench, "seconds_per_call",
                        lambda *args, **kwargs: (next(times), "test clock"))
    (row,) = kernel_bench.bench_shape("gate_proj", 192, 64, [1], 32, "cpu", 1)
    assert row["us"]["bf16 F.linear"] == pytest.approx(2.0)
    assert row["us"]["int4"] == pytest.approx(4.0)
    assert row["speedup"]["int4"] == pytest.approx(0.5)   # bf16 time / int4 time
    assert "| 4.0 (0.50x) |" in kernel_bench.markdown(
        {"environment": {}, "device": "cpu", "shape": "tiny", "repeats": 1, "group_size": 32,
         "records": [row]})
