"""The timing statistics, the device ceilings and the figures `compress bench` derives from the
median time, each recomputed from the row's own timing; the bytes a decode step reads; the
profile tables' kernel counts."""
import json
from types import SimpleNamespace

import pytest
import torch

from compress.cli import main
from compress.evaluate import timing
from compress.sources import load_random


def test_time_it_reports_the_median(monkeypatch):
    samples = iter([3.0, 1.0, 2.0, 10.0, 4.0])
    monkeypatch.setattr(timing, "_one", lambda fn, device: next(samples))
    out = timing.time_it(lambda: None, "cpu", warmup=0, repeats=5)
    assert out["median_s"] == 3.0 and out["min_s"] == 1.0 and out["max_s"] == 10.0


def test_ceilings_count_read_plus_write_and_2n3_flops(monkeypatch):
    monkeypatch.setattr(timing, "time_it", lambda *a, **k: {"median_s": 1.0})
    assert timing.copy_bandwidth("cpu", 1 << 20)["bytes_per_s"] == 2 * (1 << 20)
    assert timing.matmul_rate("cpu", 8, torch.float32)["flop_per_s"] == 2 * 8 ** 3


def test_bench_figures_follow_from_the_median_time(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "random:tiny", "--batch", "2", "--prompt", "8", "--new", "4",
                 "--prefill", "2x16", "--warmup", "0", "--repeats", "1", "--peers", "none",
                 "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    (row,) = report["rows"]
    (prefill,), (decode,) = row["prefill"], row["decode"]
    s = prefill["timing"]["median_s"]
    model = load_random("tiny").model
    cfg = model.config
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n)
    flops = (2 * linear * 2 * 16
             + 2 * 2 * 16 * 16 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
             + 2 * 2 * cfg.hidden_size * cfg.vocab_size)          # causal half; lm_head: last rows
    assert prefill["tokens_per_s"] == pytest.approx(2 * 16 / s)
    assert prefill["flop_per_s"] == pytest.approx(flops / s)
    assert prefill["pct_of_matmul"] == pytest.approx(
        100 * flops / s / report["ceilings"]["matmul"]["flop_per_s"])
    d = decode["timing"]["median_s"]
    assert decode["ms_per_token"] == pytest.approx(d / 4 * 1e3)   # `new` forward steps timed
    assert decode["tokens_per_s"] == pytest.approx(2 * 4 / d)
    assert decode["achieved_bytes_per_s"] == pytest.approx(decode["bytes_per_step"] / (d / 4))


def _profiler_event(key, device, us, count=1):
    """What torch.profiler's key_averages() yields per operation, as top_operations reads it."""
    return SimpleNamespace(key=key, device_type=f"DeviceType.{device}", count=count,
                           self_device_time_total=us, self_cpu_time_total=5.0)


def test_gpu_profiles_count_kernels_not_the_operators_that_launched_them():
    from compress.evaluate.profile import top_operations

    events = [_profiler_event("aten::mm", "CPU", 300.0),
              _profiler_event("sm90_gemm_kernel", "CUDA", 300.0, 2),
              _profiler_event("triton_poi_fused_mul", "CUDA", 100.0, 4)]
    profile = top_operations(events, cuda=True)
    assert profile["total_ms"] == 0.4 and profile["calls"] == 6
    assert [r["op"] for r in profile["top"]] == ["sm90_gemm_kernel", "triton_poi_fused_mul"]
    assert profile["top"][0]["share_pct"] == 75.0
    # The host's table (what _profiled adds on a GPU) ranks the CPU side: kernels take none.
    host = top_operations(events, cuda=False)
    assert [r["op"] for r in host["top"]] == ["aten::mm"] and host["total_ms"] == 0.005


def test_profile_calls_count_only_operations_with_time():
    from compress.evaluate.profile import top_operations

    events = [_profiler_event("gemm", "CUDA", 300.0, 2),
              _profiler_event("idle_marker", "CUDA", 0.0, 50)]
    profile = top_operations(events, cuda=True)
    assert profile["calls"] == 2 and [r["op"] for r in profile["top"]] == ["gemm"]


def test_prefill_flops_count_the_band_a_sliding_window_attends():
    """A layer with window w attends w keys per query past the window, not half the square; the
    prefill's share of the matmul ceiling would otherwise be overstated on Mistral-style models."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    from compress.evaluate.bench import attention_windows, prefill_flops

    def flops(config, length):
        return prefill_flops(AutoModelForCausalLM.from_config(config), 2, length)

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=320)
    per_pair = 2 * 2 * 2 * 4 * 16                # QK^T and PV, 2 flops each, batch 2, 4 heads
    full = flops(MistralConfig(**shape, sliding_window=None), 64)
    assert attention_windows(MistralConfig(**shape, sliding_window=16)) == [16] * 3
    # per layer, 64 x 64 / 2 pairs without a window; 16 x 16 / 2 + 48 x 16 with one
    assert full - flops(MistralConfig(**shape, sliding_window=16), 64) == pytest.approx(
        3 * per_pair * (64 * 64 / 2 - (16 * 16 / 2 + 48 * 16)))
    assert flops(MistralConfig(**shape, sliding_window=64), 64) == pytest.approx(full)
    mixed = Qwen2Config(**shape, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert attention_windows(mixed) == [None, 16, 16]
    assert full - flops(mixed, 64) == pytest.approx(
        2 * per_pair * (64 * 64 / 2 - (16 * 16 / 2 + 48 * 16)))


@pytest.mark.parametrize("lm_head,expected", [(0, 1000 + 50), (300, 700 + 50)])
def test_untied_embedding_table_is_not_read_by_a_decode_step(lm_head, expected):
    from compress.evaluate.bench import decode_bytes_per_step

    engine = SimpleNamespace(cache=SimpleNamespace(layers=[_kv_layer(200, 8)]))
    weights = {"total": 1000, "embedding": 300, "lm_head": lm_head}
    assert decode_bytes_per_step(weights, engine, 2) == expected


def _kv_layer(nbytes, slots):
    half = SimpleNamespace(nbytes=nbytes // 2)
    return SimpleNamespace(keys=half, values=half, max_cache_len=slots)


def test_a_sliding_window_layer_reads_at_most_its_window_per_step():
    """A full layer of 8 slots reads 4 / 8 of its K/V at a mean context of 4; a sliding layer's
    cache holds its 2-token window, all of which a step reads."""
    from compress.evaluate.bench import decode_bytes_per_step

    engine = SimpleNamespace(cache=SimpleNamespace(layers=[_kv_layer(200, 8), _kv_layer(200, 2)]))
    weights = {"total": 1000, "embedding": 300, "lm_head": 0}
    assert decode_bytes_per_step(weights, engine, 4) == 1000 + 100 + 200
