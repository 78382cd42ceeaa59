"""Memory accounting and `compress bench` on the CPU: the figures it reports are the true byte
counts, and the command writes every field the GPU run will fill."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from compress.cli import main
from compress.evaluate.memory import weight_bytes
from compress.quant.rtn import RTNConfig, rtn


def _unique_parameter_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())   # tied: counted once


def test_weight_bytes_of_a_float_model_are_its_parameter_bytes(tiny_model):
    config = tiny_model.config
    measured = weight_bytes(tiny_model)
    assert measured["total"] == _unique_parameter_bytes(tiny_model)
    assert measured["embedding"] == config.vocab_size * config.hidden_size * 4
    assert measured["lm_head"] == 0                  # tied: stored once, under the embedding
    layers = tiny_model.model.layers
    linear = sum(m.weight.numel() * 4 for layer in layers for m in layer.modules()
                 if isinstance(m, torch.nn.Linear))
    assert measured["linear"] == linear


def test_weight_bytes_count_what_tensor_subclasses_store(tiny_model):
    """2:4 semi-structured and torchao weights are tensor subclasses: data_ptr 0 (two weights of
    one shape looked like one) and a logical numel. What counts is their inner tensors."""
    from torch.testing._internal.two_tensor import TwoTensor

    before = weight_bytes(tiny_model)["linear"]
    for layer in tiny_model.model.layers:  # two weights of one shape, each stored twice
        w = layer.self_attn.q_proj.weight
        layer.self_attn.q_proj.weight = torch.nn.Parameter(
            TwoTensor(w.detach().clone(), w.detach().clone()), requires_grad=False)
    q_bytes = tiny_model.model.layers[0].self_attn.q_proj.weight.a.nbytes
    assert weight_bytes(tiny_model)["linear"] == before + 2 * q_bytes


def test_weight_bytes_count_the_scales_of_bitsandbytes_parameters(tiny_model):
    """The bnb peers' weights keep their scales as attributes of the parameter, not as buffers."""
    import bitsandbytes as bnb

    layer = tiny_model.model.layers[0].mlp
    w = layer.up_proj.weight.detach()
    before = weight_bytes(tiny_model)["linear"]
    layer.up_proj.weight = bnb.nn.Int8Params(w.half(), requires_grad=False,
                                             has_fp16_weights=False).to("cpu")
    int8 = weight_bytes(tiny_model)["linear"]
    assert int8 == before - w.nbytes + w.numel() + w.shape[0] * 4   # int8 codes, fp32 row scales
    blocks = w.numel() // 64
    for double_quant, scales in ((False, blocks * 4),               # fp32 absmax per block
                                 (True, blocks + 4 * -(-blocks // 256))):  # uint8 + fp32 per 256
        layer.up_proj.weight = bnb.nn.Params4bit(w.bfloat16(), requires_grad=False, blocksize=64,
                                                 compress_statistics=double_quant,
                                                 quant_type="nf4").to("cpu")
        assert weight_bytes(tiny_model)["linear"] == before - w.nbytes + w.numel() // 2 + scales


def test_weight_bytes_of_an_int4_model_are_its_stored_bytes(tiny_model):
    config = tiny_model.config
    float_linear = weight_bytes(tiny_model)["linear"]
    quantized = rtn(tiny_model, RTNConfig(bits=4, group_size=32, symmetric=True))
    stored = {t.data_ptr(): t.numel() * t.element_size()          # the tied lm_head once
              for t in quantized.state_dict().values()}
    measured = weight_bytes(quantized)
    assert measured["total"] == sum(stored.values())
    # Half a byte per weight plus one float32 scale per group of 32 (symmetric: no zeros stored).
    assert measured["linear"] == float_linear // 4 * (1 / 2 + 4 / 32)
    assert measured["embedding"] == config.vocab_size * config.hidden_size * 4


def test_bench_on_cpu_writes_every_figure(tmp_path):
    out = tmp_path / "bench"
    code = main(["bench", "random:tiny", "--batch", "1,2", "--prompt", "8", "--new", "4",
                 "--prefill", "1x16", "--warmup", "0", "--repeats", "1", "--peers", "none",
                 "--out", str(out)])
    assert code in (0, None)
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").read_text().count("|") > 10
    assert report["ceilings"]["copy"]["bytes_per_s"] > 0
    assert report["ceilings"]["matmul"]["flop_per_s"] > 0
    (row,) = report["rows"]
    assert row["weight_bytes"]["total"] == 476416                  # the tiny model, float32
    (prefill,) = row["prefill"]
    assert prefill["tokens_per_s"] > 0 and prefill["ttft_ms"] > 0
    one, two = row["decode"]
    assert (one["batch"], two["batch"]) == (1, 2)
    assert one["ms_per_token"] > 0 and 0 < one["pct_of_roofline"] <= 100
    # Static cache: key + value, 2 layers x 2 KV heads x 16 dims of float32 per token, for the
    # prompt and the 4 tokens the timed steps feed back: the first from the prefill logits, the
    # last step's own token needs no slot. A prefill holds its prompt exactly.
    per_token = 2 * 2 * 2 * 16 * 4
    assert one["kv_cache_bytes"] == per_token * (8 + 4)
    assert two["kv_cache_bytes"] == 2 * one["kv_cache_bytes"]
    assert prefill["kv_cache_bytes"] == per_token * 16
    assert row["kernels"]["mlp.down_proj"] == "Linear: torch.nn.functional.linear"
    assert prefill["kernels"] == one["kernels"] == row["kernels"]   # float: one kernel everywhere


def test_a_bench_killed_mid_run_leaves_its_measured_rows_and_no_output(tmp_path):
    """A device call's time limit kills the process (SIGKILL / SIGTERM, no clean-up): the rows
    measured before it stay in the hidden temporary folder, marked incomplete; OUT is not made."""
    out = tmp_path / "bench"
    # The hf peer is measured first; the process dies as our engine's row starts.
    script = ("import os, sys\n"
              "import compress.evaluate.bench_run as run\n"
              "run.bench_engine = lambda *a, **k: os._exit(137)\n"
              "from compress.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, "bench", "random:tiny", "--batch", "1",
                           "--prompt", "8", "--new", "2", "--prefill", "1x16", "--warmup", "1",
                           "--repeats", "5", "--peers", "hf", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 137, done.stderr[-2000:]
    assert not out.exists()
    (partial,) = tmp_path.glob(".bench.tmp-*")
    doc = json.loads((partial / "bench.json").read_text())
    assert doc["incomplete"] and [row["name"] for row in doc["rows"]] == ["hf"]
    # Medians of 5 after a warm-up: the hf decode figure is generate(3) - generate(1), and one
    # repeat of each on a busy 2-core machine once ordered them the wrong way (no figure).
    (prefill,), (decode,) = doc["rows"][0]["prefill"], doc["rows"][0]["decode"]
    assert prefill["ttft_ms"] > 0 and decode["batch"] == 1 and decode["ms_per_token"] > 0
    assert "Incomplete" in (partial / "bench.md").read_text()


def test_a_one_token_prefill_is_timed_like_any_other_shape(tiny_bench):
    doc, _ = tiny_bench("--peers", "hf-eager", prefill="1x16,8x1")
    for row in doc["rows"]:
        shapes = {(p["batch"], p["tokens"]): p for p in row["prefill"]}
        assert set(shapes) == {(1, 16), (8, 1)} and shapes[8, 1]["ttft_ms"] > 0, row["name"]


def test_a_finished_bench_is_complete_with_our_engine_first(tiny_bench):
    doc, text = tiny_bench("--peers", "hf")
    assert "incomplete" not in doc and "Incomplete" not in text
    assert [row["name"] for row in doc["rows"]] == ["compress", "hf"]


def test_kernel_choices_reach_the_layers_and_bad_ones_are_refused(tiny_model, capsys):
    from compress.evaluate.bench import choose_kernels
    from compress.formats.base import QuantizedLinear

    model = rtn(tiny_model, RTNConfig(bits=4, group_size=32))
    assert choose_kernels(model, (("int8", "auto"),)) == 0   # no int8 layers: untouched
    assert choose_kernels(model, (("int4", "auto"),)) == 14  # 2 layers x 7 linears
    assert all(m._triton is None for m in model.modules() if isinstance(m, QuantizedLinear))
    assert main(["bench", "random:tiny", "--kernel", "int4", "--peers", "none"]) == 2
    assert "FORMAT=KERNEL" in capsys.readouterr().err
    # A typo is refused even on a model without layers of that format (random:tiny is float).
    for choice, message in (("int4=bogus", "int4 layers have no kernel 'bogus'; allowed: auto, "
                                           "fused-gemv, triton"),
                            ("int5=auto", "unknown format 'int5'; allowed: bnb-fp4")):
        assert main(["bench", "random:tiny", "--kernel", choice, "--peers", "none"]) == 2
        assert message in capsys.readouterr().err


def test_prefill_and_decode_rows_name_the_kernels_their_own_shapes_ran(tiny_model):
    """bf16 int4 on the CPU: torch's int4 kernel for decode rows, dequantize + matmul for a
    prefill of more than 64 rows; each row reads labels its own forwards set."""
    from compress.evaluate.bench import BenchConfig, bench_engine, measure_ceilings

    model = rtn(tiny_model, RTNConfig(bits=4, group_size=32, symmetric=True)).to(torch.bfloat16)
    for compile_prefill in (True, False):  # the second starts after the first one's decode
        cfg = BenchConfig(batches=(1,), prompt=8, new=2, prefill=((1, 100),), warmup=0,
                          repeats=1, compile_prefill=compile_prefill)
        row = bench_engine(model, cfg, "cpu", "int4", measure_ceilings(cfg, "cpu", torch.bfloat16))
        assert row["prefill"][0]["kernels"]["mlp.down_proj"] == "Int4Linear: reference"
        assert row["decode"][0]["kernels"]["mlp.down_proj"] == \
            "Int4Linear: torch._weight_int4pack_mm_for_cpu"


def test_bench_profile_names_the_operations_of_each_phase(tiny_bench):
    doc, md = tiny_bench("--profile", new="4")
    profile = doc["rows"][0]["profile"]
    for phase in ("decode", "prefill"):
        top = profile[phase]["top"]
        assert top and all(r["self_ms"] > 0 and r["calls"] > 0 for r in top)
        assert abs(sum(r["share_pct"] for r in top) - 100) < 100  # shares of one total
        assert any("mm" in r["op"] or "linear" in r["op"] for r in top)
        # CPU self time of the operators cannot exceed the wall time they ran in.
        assert 0 < profile[phase]["total_ms"] <= profile[phase]["wall_ms"]
        assert "host" not in profile[phase]  # the CPU table is already the host's
    assert (profile["decode"]["batch"], profile["decode"]["steps"]) == (1, 4)
    assert (profile["prefill"]["batch"], profile["prefill"]["tokens"]) == (1, 16)
    assert "## Profile" in md


def test_a_failing_profile_keeps_the_figures(tiny_model, monkeypatch):
    from compress.evaluate import bench
    from compress.evaluate.bench import BenchConfig, bench_engine, measure_ceilings

    def broken(*args, **kwargs):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\ndetails")

    monkeypatch.setattr(bench, "profile_phases", broken)
    cfg = BenchConfig(batches=(1,), prompt=8, new=2, prefill=((1, 8),), warmup=0, repeats=1,
                      profile=True)
    row = bench_engine(tiny_model, cfg, "cpu", "x", measure_ceilings(cfg, "cpu", torch.float32))
    assert row["decode"][0]["ms_per_token"] > 0
    assert row["profile"] == {"failed": "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED"}


def test_a_rows_peak_leaves_out_what_other_models_hold(tiny_model, monkeypatch):
    """A sweep keeps its source model on the GPU while it times each recipe: a row's own peak is
    the process-wide peak less what was resident before it and is not this model's weights."""
    from compress.evaluate.bench_run import own_peak
    from compress.evaluate.memory import model_peak, other_resident_bytes

    weights = weight_bytes(tiny_model)["total"]
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: weights + 5000)
    assert other_resident_bytes(weights, "cuda") == 5000
    assert other_resident_bytes(weights, "cpu") is None
    assert model_peak(12000, 5000) == 7000 and model_peak(None, 5000) is None
    assert own_peak({"peak_allocated_bytes": 12000, "model_peak_bytes": 7000}) == 7000
    assert own_peak({"peak_allocated_bytes": 12000}) == 12000   # files from before the field


@pytest.mark.gpu
def test_gpu_row_peaks_exclude_other_models_and_include_this_ones_kernel_layouts(tiny_model):
    from compress.evaluate.bench import BenchConfig, bench_engine, measure_ceilings

    cfg = BenchConfig(batches=(1,), prompt=8, new=2, prefill=((1, 16),), warmup=0, repeats=1)
    ceilings = measure_ceilings(cfg, "cuda", torch.bfloat16)
    # What the process holds before any model, such as cuBLAS's workspace (allocated by the first
    # matmul and kept: 32 MiB on an H100, which failed this test when it was left out).
    # Earlier tests' engines (test_attention's 2.5 GB llama3.2-1b) live on in reference cycles
    # until collected; bench_engine collects them before it reads what is resident: so here.
    import gc

    torch.compiler.reset()
    gc.collect()
    process = torch.cuda.memory_allocated()
    model = rtn(tiny_model, RTNConfig(bits=4, group_size=32, symmetric=True))
    model = model.to("cuda", torch.bfloat16).eval()
    with torch.inference_mode():   # builds tinygemm layouts, as a sweep's perplexity run does
        model(torch.randint(1, model.config.vocab_size, (1, 8), device="cuda"))
    other = torch.ones(16 << 20, device="cuda")   # 64 MB another model would hold
    garbage = [torch.ones(8 << 20, device="cuda")]   # 32 MB an earlier row's cycle holds
    garbage.append(garbage)
    del garbage
    row = bench_engine(model, cfg, "cuda", "int4", ceilings)
    # The layouts were dropped and rebuilt inside the row: they count as this model's.
    assert abs(row["other_resident_bytes"] - process - other.nbytes) < 1 << 20
    for phase in row["prefill"] + row["decode"]:
        assert phase["model_peak_bytes"] == \
            phase["peak_allocated_bytes"] - row["other_resident_bytes"]
        assert row["weight_bytes"]["total"] <= phase["model_peak_bytes"] < other.nbytes


def test_results_name_the_gpu_the_run_used_not_the_first(monkeypatch):
    from compress.evaluate import results

    gpus = ["NVIDIA A10", "NVIDIA H100 80GB HBM3"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name=gpus[i], total_memory=i + 1))
    monkeypatch.setattr(results, "_nvidia_driver", lambda: "1.0")
    assert results.environment("cuda:1")["gpu"] == gpus[1]
    assert results.environment("cuda")["gpu"] == results.environment()["gpu"] == gpus[0]


def test_a_compiled_prefill_is_profiled_compiled(tiny_model, monkeypatch):
    from compress.evaluate.engine import Engine
    from compress.evaluate.profile import markdown, profile_phases

    engine = Engine(tiny_model.eval())
    engine.allocate(1, 16)
    modes, seen = [], []
    monkeypatch.setattr(engine, "compile_prefill", modes.append)   # no compile on the CPU here
    prefill = engine.prefill
    monkeypatch.setattr(engine, "prefill", lambda ids: (seen.append(modes[-1:]), prefill(ids))[1])
    profile = profile_phases(engine, 8, 2, (1, 12), "cpu", compiled_prefill=True)
    # The decode phase's prompts run as they were (no mode set yet); the profiled prefill (the
    # last two: warm-up and profiled run) in the compiled mode; eager again after.
    assert seen[:2] == [[], []] and seen[-2:] == [[True], [True]] and modes == [True, False]
    assert profile["prefill"]["compiled"] is True
    assert "1 x 12 tokens, compiled" in "\n".join(markdown(profile))


def test_a_flushed_timing_subtracts_the_flush_and_says_so(monkeypatch):
    import time

    from compress.evaluate import timing

    seconds, clock = timing.seconds_per_call(lambda: time.sleep(0.004), "cpu", 3, 0, 3,
                                             flush=lambda: time.sleep(0.006))
    assert seconds == pytest.approx(0.004, abs=0.0015)
    assert clock.endswith("L2 flushed before each call (flush subtracted)")
    # Where the flush's noise swamps the call, the warm figure is kept and labelled as such.
    runs = iter([(0.010, "c"), (0.011, "c"), (0.003, "c")])
    monkeypatch.setattr(timing, "_per_run", lambda *args: next(runs))
    assert timing.seconds_per_call(lambda: None, "cpu", 3, 0, 1, flush=lambda: None) == \
        (0.001, "c, warm L2 (the flush's noise exceeded the call)")
    assert timing.l2_flush("cpu") is None


def test_bench_reports_the_bytes_a_decode_step_reads(tiny_bench):
    doc, _ = tiny_bench(batch="1,2", new="4")
    row = doc["rows"][0]
    total = row["weight_bytes"]["total"]            # tied lm_head: the table is read once
    for step in row["decode"]:
        # K and V of the mean context (prompt 8 + (4 + 1) / 2) of a 12-slot cache.
        kv = step["kv_cache_bytes"] * (8 + 5 / 2) / 12
        assert step["bytes_per_step"] == pytest.approx(total + kv, rel=1e-12)
        assert step["pct_of_roofline"] == pytest.approx(
            100 * step["roofline_ms_per_token"] / step["ms_per_token"])


def test_our_model_is_freed_before_the_quantized_peers_load_theirs(monkeypatch):
    """The peers load their own copies (16 GB for an 8B bf16 model): ours must be gone by then,
    though the row's Engine held it in a reference cycle."""
    import weakref

    from compress.evaluate import bench_run
    from compress.evaluate.bench import BenchConfig

    seen = {}
    real = bench_run.bench_engine

    def spy_engine(model, *args, **kwargs):
        seen["model"] = weakref.ref(model)
        return real(model, *args, **kwargs)

    def spy_peer(name, model, source, cfg, device, ceil):
        seen["alive"] = seen["model"]() is not None
        return {"name": name, "skipped": "spy"}

    monkeypatch.setattr(bench_run, "bench_engine", spy_engine)
    monkeypatch.setattr(bench_run, "run_peer", spy_peer)
    cfg = BenchConfig(batches=(1,), prompt=8, new=2, prefill=((1, 8),), warmup=0, repeats=1,
                      peers=("torchao-int8",))
    bench_run.run_bench("random:tiny", cfg, "cpu", torch.float32, progress=lambda m: None)
    assert seen["alive"] is False


def test_the_2of4_timer_runs_the_dense_product_without_autograd(monkeypatch):
    """Dense and sparse products are timed as the engine runs them (inference mode): an autograd
    graph on the dense side only would tilt the 2:4 choice toward sparse."""
    from compress.evaluate import bench
    from compress.sources import load_model

    outputs = []
    monkeypatch.setattr(bench, "seconds_per_call", lambda call, *a, **k: (outputs.append(call())
                                                                           or (1e-3, "clock")))
    weight = load_model("random:tiny").model.model.layers[0].mlp.gate_proj.weight
    bench.linear_timer("cpu")(weight, 8)
    assert outputs[0].grad_fn is None
