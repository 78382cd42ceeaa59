"""Comparison reports: a pandas table of results JSONs with deltas against the baseline."""
from __future__ import annotations

import pandas as pd

from compress.errors import UserError

MB = 1e6


def results_frame(results: list[dict], baseline: dict | None = None) -> pd.DataFrame:
    """One row per result: absolute figures and deltas against `baseline` (default: the result
    without a recipe, else the first)."""
    if not results:
        raise UserError("no results to report")
    base = baseline or next((r for r in results if not r.get("recipe")), results[0])
    _check_same_protocol(base, results)
    rows = [_row(r) for r in results]
    frame = pd.DataFrame(rows)
    b = _row(base)
    frame["ppl_delta_pct"] = 100 * (frame["perplexity"] / b["perplexity"] - 1)
    frame["weight_ratio"] = b["weight_mb"] / frame["weight_mb"]
    frame["linear_ratio"] = b["linear_mb"] / frame["linear_mb"]
    return frame


def _row(result: dict) -> dict:
    metrics, recipe = result["metrics"], result.get("recipe") or {}
    wb = metrics["weight_bytes"]
    return {"name": recipe.get("name", "baseline"), "perplexity": metrics["perplexity"],
            "weight_mb": wb["total"] / MB, "linear_mb": wb["linear"] / MB,
            "compress_s": metrics.get("compress_seconds"), "recipe_hash": recipe.get("hash")}


def _check_same_protocol(base: dict, results: list[dict]) -> None:
    keys = ("corpus", "eval_seq_len", "eval_windows")
    want = {k: base["protocol"].get(k) for k in keys}
    for r in results:
        got = {k: r["protocol"].get(k) for k in keys}
        if got != want:
            raise UserError(f"results measured on different protocols cannot be compared: "
                            f"{want} vs {got}")


def markdown_report(results: list[dict], baseline: dict | None = None, title: str = "") -> str:
    frame = results_frame(results, baseline)
    table = frame.rename(columns={
        "name": "recipe", "perplexity": "perplexity", "ppl_delta_pct": "Δ ppl %",
        "weight_mb": "weights MB", "weight_ratio": "x smaller", "linear_mb": "linear MB",
        "linear_ratio": "linear x smaller", "compress_s": "compress s", "recipe_hash": "hash"})
    table = table[["recipe", "perplexity", "Δ ppl %", "weights MB", "x smaller", "linear MB",
                   "linear x smaller", "compress s", "hash"]]
    first = results[0]
    proto, env = first["protocol"], first["environment"]
    lines = [f"# {title or 'Comparison'}", "",
             f"Model: `{first['model'].get('source')}`. Protocol: corpus `{proto['corpus']}`, "
             f"{proto['eval_windows']} windows of {proto['eval_seq_len']} tokens, "
             f"{proto['dtype']} on {proto['device']}.",
             f"Environment: compress {env['compress']}, torch {env['torch']}, transformers "
             f"{env['transformers']}, {env.get('gpu') or 'CPU ' + str(env.get('cpu'))}.", "",
             table.to_markdown(index=False, floatfmt=".3f"), "",
             "Weights MB counts every stored byte (embedding, linears, norms; a tied lm_head "
             "once). Δ ppl % and the ratios are against the first row without a recipe.", ""]
    return "\n".join(lines)
