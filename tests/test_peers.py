"""Peers beside our engine in `compress bench`: measured where they can run, a skipped row with
the reason where they cannot, and no process-wide setting of theirs left behind."""

import pytest
import torch
from torch._inductor import config as inductor_config

from compress.evaluate import peers


def test_peers_on_cpu_measure_hf_and_skip_the_cuda_only_ones(tiny_bench):
    # Medians of 5: decode is generate(5) - generate(1), a few ms here, and one repeat of each
    # on a busy 2-core machine can order them the wrong way (then no figure is reported).
    doc, _ = tiny_bench("--peers", "hf-eager,bnb-int8,torchao-int4", "--warmup", "1",
                        "--repeats", "5", new="4")
    rows = {row["name"]: row for row in doc["rows"]}
    assert len(rows) == 4 and {"hf-eager", "bnb-int8", "torchao-int4"} <= set(rows)
    (decode,) = rows["hf-eager"]["decode"]
    assert decode["ms_per_token"] > 0 and decode["new_tokens"] == 4
    assert rows["hf-eager"]["prefill"][0]["ttft_ms"] > 0
    assert rows["bnb-int8"]["skipped"] == rows["torchao-int4"]["skipped"] == "CUDA only"


def test_a_failing_peer_is_a_skipped_row_with_its_reason(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this GPU\nsecond line")

    monkeypatch.setattr(peers, "bench_hf_generate", broken)
    row = peers.run_peer("hf", None, "random:tiny", None, "cpu", {})
    assert row == {"name": "hf", "skipped": "failed: RuntimeError: no kernel image for this GPU"}


def test_a_library_peer_that_cannot_compile_is_measured_eager_and_says_why(monkeypatch):
    """bitsandbytes' LLM.int8 syncs with the host in every forward, so a compiled step fails:
    the row is measured eager, not lost; a failure without compiling stays a failure."""
    from compress.evaluate.bench import BenchConfig

    calls = []

    def bench(model, cfg, device, name, ceil):
        calls.append(cfg.compile)
        if cfg.compile:
            raise RuntimeError("Unsupported: data-dependent branch\nmore")
        return {"name": name, "runner": "compress engine", "compiled": cfg.compile}

    monkeypatch.setattr(peers, "bench_engine", bench)
    row = peers._bench_compiled_else_eager(None, BenchConfig(compile=True), "cpu", "bnb-int8", {})
    assert calls == [True, False] and row["compiled"] is False
    assert row["runner"] == ("compress engine (eager: compiling failed, RuntimeError: "
                             "Unsupported: data-dependent branch)")
    calls.clear()

    def out_of_memory(model, cfg, device, name, ceil):
        calls.append(cfg.compile)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(peers, "bench_engine", out_of_memory)
    with pytest.raises(RuntimeError):
        peers._bench_compiled_else_eager(None, BenchConfig(), "cpu", "bnb-int8", {})
    assert calls == [False]


def test_settings_a_peer_changes_are_restored_even_when_it_fails():
    before = (inductor_config.coordinate_descent_tuning, torch.get_float32_matmul_precision())
    with pytest.raises(ValueError):
        with peers.restored_global_settings():
            inductor_config.coordinate_descent_tuning = not before[0]  # as torchao's quantize_
            torch.set_float32_matmul_precision("medium" if before[1] != "medium" else "high")
            raise ValueError
    assert (inductor_config.coordinate_descent_tuning,
            torch.get_float32_matmul_precision()) == before


def test_torchao_int4_asks_for_tinygemm_packing_where_the_option_exists():
    class Since014:  # torchao >= 0.14: the default packing needs fbgemm-gpu-genai
        def __init__(self, group_size=128, int4_packing_format="plain", version=2):
            pass

    class Before014:  # tinygemm's layout is the default
        def __init__(self, group_size=128, layout=None, version=1):
            pass

    assert peers.torchao_int4_options(Since014) == {"int4_packing_format": "tile_packed_to_4d"}
    assert peers.torchao_int4_options(Before014) == {}


def test_hf_rows_run_on_the_static_cache_each_row_needs(tiny_model, monkeypatch):
    """transformers keeps the longest static cache it allocated as a floor for later calls:
    without a reset the decode rows would attend over the longest prefill's slots."""
    from transformers import StaticCache

    from compress.evaluate.bench import BenchConfig

    lengths = []
    init = StaticCache.__init__

    def spy(self, *args, **kwargs):
        lengths.append(kwargs.get("max_cache_len"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(StaticCache, "__init__", spy)
    model = tiny_model.eval()
    cfg = BenchConfig(batches=(1,), prompt=16, new=4, prefill=((1, 200), (2, 50)), warmup=0,
                      repeats=1)
    peers.bench_hf_generate(model, cfg, "cpu", {}, compile_auto=False)
    # Prefill rows: their prompt (the one new token needs no slot); both decode runs: prompt +
    # new, what the longer one (new + 1 tokens) needs, as our engine allocates.
    assert lengths == [200, 50, 20, 20]


def test_hf_decode_slower_than_noise_has_no_figure_rather_than_a_clamped_one(tiny_model,
                                                                             monkeypatch):
    from compress.evaluate.bench import BenchConfig
    from compress.evaluate.bench_run import markdown, print_table

    times = iter([0.010, 0.030, 0.020])   # prefill; decode generate(1), generate(new + 1)
    monkeypatch.setattr(peers, "time_it", lambda *args: {"median_s": next(times)})
    cfg = BenchConfig(batches=(1,), prompt=16, new=4, prefill=((1, 16),), warmup=0, repeats=1)
    row = peers.bench_hf_generate(tiny_model.eval(), cfg, "cpu", {}, False)
    (decode,) = row["decode"]
    assert decode["ms_per_token"] is None and decode["tokens_per_s"] is None
    assert "no decode time to report" in decode["note"]
    lines = []
    print_table({"rows": [row]}, lines.append)
    assert lines[-1].endswith(decode["note"])
    doc = {"model": {"source": "random:tiny", "dtype": "float32"}, "rows": [row],
           "environment": {"torch": "2", "transformers": "5"},
           "protocol": {"device": "cpu", "prompt": 16, "new_tokens": 4, "decode": "", "repeats": 1,
                        "warmup": 0, "inputs": ""},
           "ceilings": {"device": "cpu", "copy": {"bytes_per_s": 1e9},
                        "matmul": {"dtype": "float32", "n": 8, "flop_per_s": 1e12}}}
    assert "| hf-eager | 1 | - | - |" in markdown(doc)


def test_hf_peer_figures_follow_from_its_generate_times(tiny_model, monkeypatch):
    from compress.evaluate.bench import BenchConfig

    # prefill 2x16: generate(1) 10 ms; decode at batch 2: generate(1) 20 ms, generate(5) 60 ms
    times = iter([0.010, 0.020, 0.060])
    monkeypatch.setattr(peers, "time_it", lambda *args: {"median_s": next(times)})
    cfg = BenchConfig(batches=(2,), prompt=16, new=4, prefill=((2, 16),), warmup=0, repeats=1)
    row = peers.bench_hf_generate(tiny_model.eval(), cfg, "cpu", {}, False)
    (prefill,), (decode,) = row["prefill"], row["decode"]
    assert prefill["ttft_ms"] == pytest.approx(10.0)
    assert prefill["tokens_per_s"] == pytest.approx(2 * 16 / 0.010)
    assert decode["ms_per_token"] == pytest.approx(40.0 / 4)       # (60 - 20) ms over 4 tokens
    assert decode["tokens_per_s"] == pytest.approx(2 * 4 / 0.040)  # both sequences' tokens
