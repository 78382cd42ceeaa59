"""One `compress bench` run: load, ceilings, our engine, peers; the JSON document and its
Markdown table. Every figure carries the device it was measured on; on a CPU no GPU-only field
(peak allocated, CUDA events) holds a number."""
from __future__ import annotations

import gc

import torch

from compress.evaluate.bench import (HF_PEERS, BenchConfig, bench_engine, measure_ceilings,
                                     sync_and_free)
from compress.evaluate.peers import run_peer
from compress.evaluate.profile import markdown as profile_markdown
from compress.evaluate.results import environment
from compress.reports.content import runtime_options


def run_bench(source: str, cfg: BenchConfig, device: str, dtype: torch.dtype,
              progress=print, on_row=None) -> dict:
    """The bench document; `on_row(partial_doc)` after every measured row, so that a run stopped
    by a time limit still leaves what it measured (rows in measured order, marked incomplete)."""
    from compress.sources import load_model

    loaded = load_model(source, dtype=dtype, device=device)
    model = loaded.model
    progress(f"measuring ceilings on {device}")
    ceil = measure_ceilings(cfg, device, dtype)
    env = environment(device)
    if torch.device(device).type != "cuda":
        env["measured_on"] = "cpu: no GPU figure in this file"
    engine_rows, hf_rows, other_rows = [], [], []

    def document(complete: bool) -> dict:
        doc = {"kind": "bench", "model": {"source": source, "provenance": loaded.provenance,
                                          "dtype": str(dtype).removeprefix("torch.")},
               "protocol": cfg.protocol(device), "ceilings": ceil,
               "rows": engine_rows + hf_rows + other_rows, "environment": env}
        if not complete:
            doc["incomplete"] = "written after each row: the rows measured so far"
        return doc

    def measured(rows: list, row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(document(complete=False))

    # The hf peers time our model object as loaded: before our engine, whose runtime transforms
    # (semi-structured 2:4 weights, fused projections) change it in place.
    for peer in [p for p in cfg.peers if p in HF_PEERS]:
        progress(f"peer {peer}")
        measured(hf_rows, run_peer(peer, model, source, cfg, device, ceil))
        sync_and_free(device)
    progress(f"benchmarking {source} with the compress engine")
    measured(engine_rows, bench_engine(model, cfg, device, "compress", ceil))
    # The quantized peers load their own copies: free ours first (an 8B bf16 model is 16 GB).
    # The row's Engine holds the model in a reference cycle (its steps are bound methods of
    # itself, its compiled step too): only dynamo's reset and a cyclic collection free it.
    model = loaded.model = None
    torch.compiler.reset()
    gc.collect()
    sync_and_free(device)
    for peer in [p for p in cfg.peers if p not in HF_PEERS]:
        progress(f"peer {peer}")
        measured(other_rows, run_peer(peer, model, source, cfg, device, ceil))
    return document(complete=True)


def _fmt(value, digits=2, scale=1.0) -> str:
    return "-" if value is None else f"{value * scale:,.{digits}f}"


def markdown(doc: dict) -> str:
    env, proto, ceil = doc["environment"], doc["protocol"], doc["ceilings"]
    device = env.get("gpu") if proto["device"].startswith("cuda") else \
        f"CPU ({env.get('cpu')}, {env.get('threads')} threads): not a GPU figure"
    lines = [f"# Benchmark: {doc['model']['source']} ({doc['model']['dtype']})", "",
             f"- Device: {device}; torch {env['torch']}, transformers {env['transformers']}"
             + (f", driver {env.get('driver')}" if env.get("driver") else ""),
             f"- Protocol: prompt {proto['prompt']}, {proto['new_tokens']} new tokens, "
             f"{proto['decode']}; median of {proto['repeats']} after {proto['warmup']} warm-up; "
             f"compile {runtime_options(proto, doc['rows'])}; {proto['inputs']}",
             f"- Ceilings measured in this run on {ceil['device']}: copy "
             f"{ceil['copy']['bytes_per_s'] / 1e9:,.1f} GB/s (read + write), "
             f"{ceil['matmul']['dtype']} {ceil['matmul']['n']}^3 matmul "
             f"{ceil['matmul']['flop_per_s'] / 1e12:,.2f} TFLOP/s", ""]
    if doc.get("incomplete"):
        lines[-1:] = ["- Incomplete: the run stopped before its last row; these are the rows it "
                      "had measured.", ""]
    lines += ["## Decode", "", "| runner | batch | ms/token | tokens/s | roofline ms | % roofline "
              "| KV cache MB | peak MB | compile s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in doc["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['name']} | skipped: {row['skipped']} |||||||")
            continue
        for d in row["decode"]:
            lines.append(f"| {row['name']} | {d['batch']} | {_fmt(d['ms_per_token'], 3)} | "
                         f"{_fmt(d['tokens_per_s'], 1)} | {_fmt(d.get('roofline_ms_per_token'), 3)}"
                         f" | {_fmt(d.get('pct_of_roofline'), 1)} | "
                         f"{_fmt(d.get('kv_cache_bytes'), 1, 1e-6)} | "
                         f"{_fmt(own_peak(d), 0, 1e-6)} | "
                         f"{_fmt(d.get('compile_s'), 1)} |")
    lines += ["", "## Prefill", "", "| runner | batch x tokens | TTFT ms | tokens/s | % of matmul "
              "| peak MB | compile s |", "|---|---|---|---|---|---|---|"]
    for row in doc["rows"]:
        for p in row.get("prefill", []):
            lines.append(f"| {row['name']} | {p['batch']} x {p['tokens']} | "
                         f"{_fmt(p['ttft_ms'], 2)} | {_fmt(p['tokens_per_s'], 0)} | "
                         f"{_fmt(p.get('pct_of_matmul'), 1)} | "
                         f"{_fmt(own_peak(p), 0, 1e-6)} | "
                         f"{_fmt(p.get('compile_s'), 1)} |")
    lines += ["", "## Memory and kernels", "", "| runner | weights MB | embedding MB | linear MB "
              "| lm_head MB | kernels |", "|---|---|---|---|---|---|"]
    for row in doc["rows"]:
        if "skipped" in row:
            continue
        w = row["weight_bytes"]
        kernels = "; ".join(f"{k}: {v}" for k, v in _compact(row["kernels"]).items())
        prefill = (row.get("prefill") or [{}])[0].get("kernels")
        if prefill and prefill != row["kernels"]:  # ours: the first decode batch, then prefill
            kernels = f"decode: {kernels}. Prefill: " + "; ".join(
                f"{k}: {v}" for k, v in _compact(prefill).items())
        lines.append(f"| {row['name']} | {_fmt(w['total'], 1, 1e-6)} | "
                     f"{_fmt(w['embedding'], 1, 1e-6)} | {_fmt(w['linear'], 1, 1e-6)} | "
                     f"{_fmt(w['lm_head'], 1, 1e-6)} | {kernels} |")
    profiled = [row for row in doc["rows"] if row.get("profile")]
    if profiled:
        lines += ["", "## Profile", "", "One profiled run of each phase after the timed ones "
                  "(profiling adds overhead: read shares, not times)."]
        for row in profiled:
            lines += ["", f"### {row['name']}"] + profile_markdown(row["profile"])
    lines += ["", "Decode roofline = bytes a step must read (weights, the embedding only when "
              "tied to the lm_head, K and V at the mean context) / the copy bandwidth above. "
              "Peak MB: the most GPU memory allocated during the phase, less what other models "
              "held (`model_peak_bytes`; the process-wide peak is `peak_allocated_bytes`). "
              "Peak memory is null on a CPU: there is no allocator figure comparable to CUDA's.",
              ""]
    return "\n".join(lines)


def own_peak(phase: dict) -> int | None:
    """The phase's peak of its own model; files from before that figure have the process's."""
    own = phase.get("model_peak_bytes")
    return phase.get("peak_allocated_bytes") if own is None else own


def _compact(kernels: dict) -> dict:
    """Group kinds of linear that ran the same kernel: 'q_proj, k_proj: Linear: F.linear'."""
    by_label: dict[str, list[str]] = {}
    for kind, label in kernels.items():
        by_label.setdefault(label, []).append(kind.rsplit(".", 1)[-1])
    return {", ".join(kinds): label for label, kinds in by_label.items()}


def print_table(doc: dict, write=print) -> None:
    for row in doc["rows"]:
        if "skipped" in row:
            write(f"{row['name']:>14}: skipped ({row['skipped']})")
            continue
        for p in row["prefill"]:
            write(f"{row['name']:>14}: prefill {p['batch']}x{p['tokens']}: TTFT "
                  f"{p['ttft_ms']:.2f} ms, {p['tokens_per_s']:,.0f} tokens/s")
        for d in row["decode"]:
            pct = d.get("pct_of_roofline")
            if d["ms_per_token"] is None:
                write(f"{row['name']:>14}: decode batch {d['batch']}: {d['note']}")
                continue
            write(f"{row['name']:>14}: decode batch {d['batch']}: {d['ms_per_token']:.3f} ms/token, "
                  f"{d['tokens_per_s']:,.1f} tokens/s"
                  + (f", {pct:.1f}% of roofline" if pct is not None else ""))
