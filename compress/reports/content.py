"""What a comparison report says, as a list of blocks that the Markdown and HTML writers render
the same way: ('h', level, text), ('p', text), ('ul', [text]), ('table', headers, rows),
('img', file name, png bytes, caption). Every report states its protocol, each recipe's hash,
the package version and the machine; every speed figure names the device that measured it."""
from __future__ import annotations

import json
import math

import pandas as pd

from compress.reports.frame import (results_frame, shared_protocol, speed_shapes, task_columns,
                                    with_baseline)
from compress.reports.verdict import NOISE, shape_speedups, verdict


def report_blocks(results: list[dict], baseline: dict | None = None, title: str = "",
                  plots: bool = True, failures: dict | None = None) -> list[tuple]:
    """`failures` {recipe name: one-line reason}: recipes of a sweep that produced no results,
    listed so that a table without them does not read as the whole sweep."""
    results, base = with_baseline(results, baseline)
    frame = results_frame(results, base)
    blocks: list[tuple] = [("h", 1, title or "Comparison")]
    blocks += _setup(results, base)
    if failures:
        blocks += [("h", 2, "Failed recipes"),
                   ("table", ["recipe", "why (failures.json)"], sorted(failures.items()))]
    blocks += [("h", 2, "Quality and memory"), _quality_table(frame)]
    # KL and top-1 were measured in the sweep, against its uncompressed model: a compressed
    # baseline given with --baseline is not what they compare with.
    reference = "the uncompressed model of the sweep that measured them, not the baseline row" \
        if base.get("recipe") else "the baseline"
    blocks.append(("p", "Δ columns are against the baseline row. KL = KL(reference || model) in "
                   "nats, mean over every predicted position of the evaluation windows; top-1 = "
                   "share of positions where both models' most likely next token agree; the "
                   f"reference of both is {reference}. Weights "
                   "count every stored byte (embedding, linears, norms; a tied lm_head once); "
                   "sparsity is the share of zeros actually reached in the decoder linears."))
    tasks = task_columns(frame)
    if tasks:
        blocks += [("h", 2, "lm-eval tasks"), _task_table(frame, tasks)]
        blocks.append(("p", _task_note([base, *results])))
    prefill, batches = speed_shapes(frame)
    if batches or prefill:
        blocks += [("h", 2, "Speed"), *_speed_blocks(frame, base, results, prefill, batches),
                   _verdict_table(frame, prefill, batches), ("p", VERDICT_NOTE),
                   _kernel_table(results)]
    if plots:
        from compress.reports.plots import ppl_vs_decode, ppl_vs_memory

        blocks += [("h", 2, "Trade-offs"),
                   ("img", "ppl_vs_memory.png", ppl_vs_memory(frame),
                    "Perplexity against weight memory; red: the Pareto front (no other recipe is "
                    "both smaller and better).")]
        speed_png = ppl_vs_decode(frame)
        if speed_png is not None:
            blocks.append(("img", "ppl_vs_decode.png", speed_png,
                           "Perplexity against decode tokens/s; red: the Pareto front (no other "
                           "recipe is both faster and better)."))
    blocks += [("h", 2, "Recipes"), _recipe_table(results)]
    return blocks


def _setup(results: list[dict], base: dict) -> list[tuple]:
    model, proto = base["model"], base["protocol"]
    prov = model.get("provenance") or {}
    source = f"`{model.get('source')}`"
    if prov.get("sha256"):
        source += f" ({prov.get('loader')}, sha256 {prov['sha256'][:12]})"
    items = [f"Model: {source}, {model.get('architecture')}, "
             f"{model.get('parameters', 0) / 1e6:,.1f}M parameters.",
             f"Protocol: corpus `{proto['corpus']}`, {proto['eval_windows']} windows of "
             f"{proto['eval_seq_len']} tokens, {proto['dtype']} on {proto['device']}; perplexity "
             "= exp(mean next-token NLL over every predicted position)."]
    if proto.get("divergence"):
        items.append(f"Divergence: {proto['divergence'].get('kind')}; reference: "
                     f"{proto['divergence'].get('reference')}.")
    machines = sorted({_machine(r["environment"]) for r in results})
    env = base["environment"]
    # Every row's software, not only the baseline's: rows added to a folder later ran other
    # code. Commits are listed under the versions they ran with.
    commits: dict[tuple, list[str]] = {}
    for row_env in (r["environment"] for r in [base, *results]):
        codes = commits.setdefault(_versions(row_env), [])
        if _commit(row_env) not in codes + [""]:
            codes.append(_commit(row_env))
    software = [_software(versions, codes) for versions, codes in commits.items()]
    items.append(f"Software: {'; '.join(software)}.")
    items.append(f"Machine{'s' if len(machines) > 1 else ''}: {'; '.join(machines)}.")
    items.append(f"Date: {env.get('date')}.")
    if prov.get("loader") == "gguf":
        items.append("The baseline is de-quantized from a GGUF file: results measure change "
                     "against this float baseline; group-wise asymmetric rounding can partly "
                     "re-create the file's own grid.")
    return [("ul", items)]


def _versions(env: dict) -> tuple:
    return env["compress"], env["torch"], env["transformers"], env.get("python")


def _software(versions: tuple, commits: list[str]) -> str:
    code = f" ({'; '.join(commits)})" if commits else ""
    return (f"compress {versions[0]}{code}, torch {versions[1]}, transformers {versions[2]}, "
            f"python {versions[3]}")


def _commit(env: dict) -> str:
    src = env.get("source")
    if not src:
        return ""
    return f"git {src['commit']}{', with uncommitted changes' if src['dirty'] else ''}"


def _machine(env: dict) -> str:
    if env.get("gpu"):
        return (f"GPU {env['gpu']} (driver {env.get('driver') or '?'}, CUDA "
                f"{env.get('cuda') or '?'})")
    return f"CPU {env.get('cpu')} ({env.get('threads')} threads), {env.get('platform')}"


def _quality_table(frame: pd.DataFrame) -> tuple:
    headers = ["recipe", "perplexity", "Δ ppl %", "KL", "top-1 %", "sparsity %", "weights MB",
               "x smaller", "linear MB", "linear x smaller", "compress s", "hash"]
    rows = []
    for _, r in frame.iterrows():
        rows.append([r["name"], always(r["perplexity"], 3), always(r["ppl_delta_pct"], 2, True),
                     sig(r["kl_divergence"], 3), fmt(100 * r["top1_agreement"], 2),
                     fmt(100 * r["sparsity"], 1), fmt(r["weight_mb"], 1),
                     fmt(r["weight_ratio"], 2), fmt(r["linear_mb"], 1), fmt(r["linear_ratio"], 2),
                     fmt(r["compress_s"], 1), r["hash"] if isinstance(r["hash"], str) else "-"])
    return ("table", headers, rows)


def _task_table(frame: pd.DataFrame, tasks: list[tuple[str, str]]) -> tuple:
    headers = ["recipe"] + [f"{t} {m}" for t, m in tasks]
    rows = []
    for _, r in frame.iterrows():
        cells = [r["name"]]
        for task, metric in tasks:
            key = f"task:{task}:{metric}"
            value, err = r.get(key, math.nan), r.get(f"{key}_stderr", math.nan)
            cell = fmt(value, 3) + (f" ± {err:.3f}" if _num(err) else "")
            if not r["is_baseline"] and _num(r.get(f"{key}_delta", math.nan)):
                cell += f" ({r[key + '_delta']:+.3f})"
            cells.append(cell)
        rows.append(cells)
    return ("table", headers, rows)


def _task_note(results: list[dict]) -> str:
    proto = shared_protocol(results, "tasks") or {}
    files = ", ".join(f"{k} = {v['path']} (sha256 {v['sha256'][:12]})"
                      for k, v in (proto.get("data_files") or {}).items())
    return (f"lm-eval {proto.get('lm_eval', '?')} on the in-memory model (HFLM); "
            f"limit {proto.get('limit') or 'none'}, few-shot "
            f"{'task default' if proto.get('num_fewshot') is None else proto['num_fewshot']}. "
            "± is the standard error of the mean; (Δ) is against the baseline. A Δ smaller than "
            "about twice the ± is not evidence of a change." + (f" Local data: {files}." if files
                                                                else ""))


def runtime_options(proto: dict, rows: list[dict] | None = None) -> str:
    """How the timed model ran, from a speed protocol: 'True (Triton kernels tuned, ...)'.
    With the timed rows, --gqa-decode is named only where a row ran it (MHA models skip it)."""
    gqa_ran = rows is None or any(r.get("gqa_decode_attention") for r in rows)
    extras = [text for key, text in (("tune_kernels", "Triton kernels tuned"),
                                     ("compile_prefill", "prefill compiled"),
                                     ("fuse_projections", "q/k/v and gate/up fused"),
                                     ("gqa_decode", "GQA decode attention" if gqa_ran else
                                      "GQA decode attention not used: no key/value groups"))
              if proto.get(key)]
    return f"{proto.get('compile')}" + (f" ({', '.join(extras)})" if extras else "")


def _speed_blocks(frame, base, results, prefill, batches) -> list[tuple]:
    headers = ["recipe", "measured on"]
    for shape in prefill:
        headers += [f"prefill {shape} tok/s", "speed-up"]
    for b in batches:
        headers += [f"decode b{b} ms/tok", f"b{b} tok/s", "speed-up", "% roofline"]
    rows = []
    for _, r in frame.iterrows():
        cells = [r["name"], r.get("speed_device") if isinstance(r.get("speed_device"), str)
                 else "not measured"]
        for shape in prefill:
            cells += [fmt(r.get(f"prefill_tok_s_{shape}"), 0),
                      fmt(r.get(f"prefill_speedup_{shape}"), 2)]
        for b in batches:
            cells += [fmt(r.get(f"decode_ms_b{b}"), 3), fmt(r.get(f"decode_tok_s_b{b}"), 1),
                      fmt(r.get(f"decode_speedup_b{b}"), 2), fmt(r.get(f"roofline_pct_b{b}"), 1)]
        rows.append(cells)
    proto = shared_protocol([base, *results], "speed") or {}
    timed = [r["metrics"]["speed"] for r in [base, *results] if r["metrics"].get("speed")]
    note = (f"compress engine (static KV cache, own token loop): decode prompt "
            f"{proto.get('prompt')}, {proto.get('new_tokens')} new tokens, greedy, no early stop; "
            f"median of {proto.get('repeats')} after {proto.get('warmup')} warm-up; compile "
            f"{runtime_options(proto, timed)}; inputs {proto.get('inputs')}. "
            + _same_run_note(timed))
    devices = set(frame.get("speed_device", pd.Series(dtype=object)).dropna())
    if any(d.startswith("CPU") for d in devices):
        note += (" Measured on a CPU: these are not GPU figures, and kernels chosen for GPUs "
                 "(int4/int8 matmuls, 2:4 sparsity) may run slower here than float.")
    return [("table", headers, rows), ("p", note)]


def _same_run_note(timed: list[dict]) -> str:
    """A sweep measures the copy / matmul ceilings once: timed rows (their speed metrics) with
    other ceilings (or none) were timed in another run, and their speed-up is not over a
    baseline of their own run."""
    runs = {json.dumps(s.get("ceilings"), sort_keys=True) for s in timed}
    if len(runs) <= 1 or not all(s.get("ceilings") for s in timed):  # older JSONs lack them
        return ("Speed-up is over the baseline measured in the same run. % roofline = the bytes "
                "a step must read over the copy bandwidth measured in the same run.")
    return ("Speed-up is over the baseline row, but these rows were timed in different runs "
            "(their measured bandwidths differ): run-to-run noise is in the ratios. % roofline = "
            "the bytes a step must read over the copy bandwidth its own run measured.")


VERDICT_NOTE = (f"Verdict: a speed-up within {NOISE:.0%} of 1.0 counts as the same (the speed "
                "protocol's run-to-run tolerance). \"Memory only\": the recipe is smaller but no "
                "measured shape got faster.")


def _verdict_table(frame: pd.DataFrame, prefill: list[str], batches: list[int]) -> tuple:
    rows = []
    for r in frame.to_dict("records"):
        if r.get("speed_verdict") == "baseline":
            continue
        faster, same, slower, word = verdict(shape_speedups(r, prefill, batches),
                                             r["weight_ratio"])
        rows.append([r["name"], word, faster, same, slower])
    return ("table", ["recipe", "speed-up verdict", "faster at", "the same at", "slower at"], rows)


def _kernel_table(results: list[dict]) -> tuple:
    """Which kernels ran the linear layers of each timed model, at decode and at prefill."""
    rows = []
    for r in results:
        speed = r["metrics"].get("speed") or {}
        cells = []
        for phases in (speed.get("decode") or [], speed.get("prefill") or []):
            labels = sorted({label for p in phases for label in (p.get("kernels") or {}).values()})
            cells.append("; ".join(labels) if labels else "-")
        if cells == ["-", "-"]:  # results written before kernels were recorded per phase
            cells[0] = "; ".join(sorted(set((speed.get("kernels") or {}).values()))) or "-"
        rows.append([(r.get("recipe") or {}).get("name", "baseline"), *cells])
    return ("table", ["recipe", "decode kernels", "prefill kernels"], rows)


def _recipe_table(results: list[dict]) -> tuple:
    rows = []
    for r in results:
        recipe = r.get("recipe")
        if not recipe:
            rows.append(["baseline", "-", "the source model, uncompressed", "-"])
            continue
        passes = "; ".join(
            f"{p['pass']}(" + ", ".join(f"{k}={v}" for k, v in p.items() if k != "pass") + ")"
            for p in recipe.get("passes", []))
        calib = r["protocol"].get("calibration")
        calib_text = (f"{calib['samples']} x {calib['seq_len']} tokens, {calib.get('source')}"
                      + (f", forwards in {calib['dtype']}" if calib.get("dtype") else "")
                      if calib else "-")
        rows.append([recipe.get("name"), recipe.get("hash") or "-", passes, calib_text])
    return ("table", ["recipe", "hash", "passes", "calibration"], rows)


def _num(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def sig(value, digits: int) -> str:
    """Significant digits: KL spans 1e-6 (noise floor) to 1 (a broken model)."""
    return f"{value:.{digits}g}" if _num(value) else "-"


def always(value, digits: int, sign: bool = False) -> str:
    """A figure every result has (perplexity): NaN is a broken model, not "not measured"."""
    return "nan" if isinstance(value, float) and math.isnan(value) else fmt(value, digits, sign)


def fmt(value, digits: int, sign: bool = False) -> str:
    if not _num(value):
        return "-"
    return f"{value:+,.{digits}f}" if sign else f"{value:,.{digits}f}"
