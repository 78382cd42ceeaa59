"""Results JSONs -> one pandas row per result: absolute figures and deltas against a baseline.

Columns are plain floats (NaN where a result lacks the figure), so results.csv, the tables and
the plots read the same numbers. Speed columns are per measured shape (decode_ms_b1, ...) and
task columns per task and metric ('task:pydoc_mc:acc'), because one number per model hides what
changes with batch size.
"""
from __future__ import annotations

import math

import pandas as pd

from compress.errors import UserError
from compress.reports.verdict import shape_speedups, verdict

MB = 1e6
PROTOCOL_KEYS = ("corpus", "eval_seq_len", "eval_windows", "dtype")
TASK_PROTOCOL_KEYS = ("names", "limit", "num_fewshot")
SPEED_PROTOCOL_KEYS = ("batches", "prompt", "new_tokens", "prefill", "compile", "device")
# Runtime options of a speed run: results written before an option existed lack it, which means
# it was off (compared as `value or None`).
SPEED_OPTION_KEYS = ("tune_kernels", "compile_prefill", "semi_structured", "fuse_projections",
                     "gqa_decode", "kernel_choices")


def pick_baseline(results: list[dict], baseline: dict | None = None) -> dict:
    """`baseline`, else the first result without a recipe (the uncompressed model), else the first."""
    if not results:
        raise UserError("no results to report")
    return baseline or next((r for r in results if not r.get("recipe")), results[0])


def with_baseline(results: list[dict], baseline: dict | None = None
                  ) -> tuple[list[dict], dict]:
    """(the results with the baseline among them, first when it was given apart; the baseline).
    Every table shows the row its deltas are against."""
    base = pick_baseline(results, baseline)
    return (results if any(r is base for r in results) else [base, *results]), base


def results_frame(results: list[dict], baseline: dict | None = None) -> pd.DataFrame:
    """One row per result; `is_baseline` marks the baseline by identity, not by name (a CI gate
    compares a recipe against an earlier run of the same recipe)."""
    results, base = with_baseline(results, baseline)
    check_comparable(base, results)
    frame = pd.DataFrame([row(r) for r in results])
    frame["is_baseline"] = [r is base for r in results]
    b = row(base)
    if b["name"] != "baseline":  # a recipe as the baseline: say which row it is
        frame.loc[frame["is_baseline"], "name"] = f"{b['name']} (baseline)"
    frame["ppl_delta_pct"] = 100 * (frame["perplexity"] / b["perplexity"] - 1)
    frame["weight_ratio"] = b["weight_mb"] / frame["weight_mb"]
    frame["linear_ratio"] = b["linear_mb"] / frame["linear_mb"]
    for column in [c for c in frame.columns if c.startswith(("decode_ms_b", "prefill_tok_s_"))]:
        ref = b.get(column, math.nan)
        if column.startswith("decode_ms_b"):
            frame[column.replace("decode_ms_", "decode_speedup_")] = ref / frame[column]
        else:
            frame[column.replace("prefill_tok_s_", "prefill_speedup_")] = frame[column] / ref
    prefill, batches = speed_shapes(frame)
    if prefill or batches:
        frame["speed_verdict"] = [
            verdict(shape_speedups(r, prefill, batches), r["weight_ratio"])[3]
            if not r["is_baseline"] else "baseline" for r in frame.to_dict("records")]
    for column in [c for c in frame.columns if c.startswith("task:") and
                   not c.endswith("_stderr")]:
        frame[column + "_delta"] = frame[column] - b.get(column, math.nan)
    return frame


def row(result: dict) -> dict:
    metrics, recipe = result["metrics"], result.get("recipe") or {}
    wb = metrics["weight_bytes"]
    out = {"name": recipe.get("name", "baseline"), "hash": recipe.get("hash"),
           "perplexity": metrics["perplexity"],
           "kl_divergence": metrics.get("kl_divergence", math.nan),
           "top1_agreement": metrics.get("top1_agreement", math.nan),
           "sparsity": (metrics.get("sparsity") or {}).get("overall", math.nan),
           "weight_mb": wb["total"] / MB, "linear_mb": wb["linear"] / MB,
           "compress_s": metrics.get("compress_seconds", math.nan),
           "eval_s": metrics.get("eval_seconds", math.nan)}
    speed = metrics.get("speed")
    if speed:
        out["speed_device"] = speed_device(speed)
        for p in speed["prefill"]:
            shape = f"{p['batch']}x{p['tokens']}"
            out[f"prefill_tok_s_{shape}"] = p["tokens_per_s"]
            out[f"ttft_ms_{shape}"] = p["ttft_ms"]
        for d in speed["decode"]:
            out[f"decode_ms_b{d['batch']}"] = d["ms_per_token"]
            out[f"decode_tok_s_b{d['batch']}"] = d["tokens_per_s"]
            out[f"roofline_pct_b{d['batch']}"] = d.get("pct_of_roofline") or math.nan
    for task, scores in (metrics.get("tasks") or {}).items():
        for metric, value in scores.items():
            if metric not in ("samples", "version"):
                out[f"task:{task}:{metric}"] = value
    return out


def speed_device(speed: dict) -> str:
    """Which device measured the speed figures, in words: 'NVIDIA H100 80GB HBM3' or 'CPU (...)'."""
    borrowed = speed.get("borrowed_from") or {}
    device = speed.get("gpu") or \
        f"CPU ({speed.get('cpu') or 'unknown'}, {speed.get('threads', '?')} threads)"
    if not borrowed.get("model"):
        return device
    dtype = f" in {borrowed['dtype']}" if borrowed.get("dtype") else ""
    return device + f", timed on {borrowed['model']}{dtype}"


def shared_protocol(results: list[dict], section: str) -> dict | None:
    """The protocol `section` ("tasks", "speed") of the first result that has one: the one every
    other result must share (check_comparable); the baseline may have been run without it."""
    return next((r["protocol"][section] for r in results if r["protocol"].get(section)), None)


def check_comparable(base: dict, results: list[dict]) -> None:
    """Deltas only mean something on one model and one protocol: same windows, dtype, tasks and
    speed shapes."""
    for r in results:
        if not same_model(base, r):
            raise UserError(f"results of different models cannot be compared: "
                            f"{_model_name(base)} vs {_model_name(r)}")
    want = {k: base["protocol"].get(k) for k in PROTOCOL_KEYS}
    for r in results:
        got = {k: r["protocol"].get(k) for k in PROTOCOL_KEYS}
        if got != want:
            raise UserError(f"results measured on different protocols cannot be compared: "
                            f"{want} vs {got}")
    for section, keys in (("tasks", TASK_PROTOCOL_KEYS), ("speed", SPEED_PROTOCOL_KEYS),
                          ("speed", SPEED_OPTION_KEYS)):
        ref = shared_protocol([base, *results], section)
        for r in results:
            other = r["protocol"].get(section)
            if ref and other and _compared(ref, keys) != _compared(other, keys):
                raise UserError(f"{section} figures measured on different protocols cannot be "
                                f"compared: {_compared(ref, keys)} vs {_compared(other, keys)}")
    machines = {_speed_machine(r["metrics"]["speed"]) for r in [base, *results]
                if r["metrics"].get("speed")}
    if len(machines) > 1:
        raise UserError(f"speed figures measured on different machines cannot be compared: "
                        f"{', '.join(sorted(machines))}")


def same_model(a: dict, b: dict) -> bool:
    """The same source model (a checkpoint's provenance names the model it was made from): by
    file hash where both have one (one GGUF found at two paths), else by source name."""
    pa, pb = _provenance(a), _provenance(b)
    if pa.get("sha256") and pb.get("sha256"):
        return pa["sha256"] == pb["sha256"]
    return _model_name(a) == _model_name(b)


def _provenance(result: dict) -> dict:
    return (result.get("model") or {}).get("provenance") or {}


def _model_name(result: dict) -> str:
    return str(_provenance(result).get("source") or (result.get("model") or {}).get("source"))


def _compared(protocol: dict, keys) -> dict:
    """What must agree: task names as a set, the task data files by content (a pydoc task built
    from another Python's documentation has other items), a missing option as off."""
    out = {k: protocol.get(k) or None for k in keys}
    if "names" in keys:
        out["names"] = sorted(out["names"] or [])
        out["data_files"] = {name: f.get("sha256")
                             for name, f in (protocol.get("data_files") or {}).items()}
    return out


def _speed_machine(speed: dict) -> str:
    return speed.get("gpu") or f"CPU ({speed.get('cpu')}, {speed.get('threads')} threads)"


def task_columns(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(task, metric) pairs present in the frame, in a stable order."""
    pairs = []
    for column in frame.columns:
        if column.startswith("task:") and not column.endswith(("_stderr", "_delta")):
            _, task, metric = column.split(":", 2)
            pairs.append((task, metric))
    return sorted(pairs)


def speed_shapes(frame: pd.DataFrame) -> tuple[list[str], list[int]]:
    """Prefill shapes ('1x2048') and decode batches present in the frame."""
    prefill = [c.removeprefix("prefill_tok_s_") for c in frame.columns
               if c.startswith("prefill_tok_s_")]
    batches = sorted(int(c.removeprefix("decode_ms_b")) for c in frame.columns
                     if c.startswith("decode_ms_b"))
    return prefill, batches


def pareto_front(x: list[float], y: list[float], maximize_x: bool = False) -> list[int]:
    """Indices of the points no other point beats on both axes (y always minimized; x minimized,
    or maximized with `maximize_x`), sorted by x. NaN points are never on the front."""
    points = [(i, (-xi if maximize_x else xi), yi) for i, (xi, yi) in enumerate(zip(x, y))
              if not (math.isnan(xi) or math.isnan(yi))]
    front = []
    for i, xi, yi in points:
        dominated = any(xj <= xi and yj <= yi and (xj < xi or yj < yi) for _, xj, yj in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: x[i])
