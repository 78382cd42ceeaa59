"""The regression gate: thresholds on a new result against a baseline result, for CI pipelines.

A broken threshold is a failure (exit 1, one line each); a threshold whose figure is missing from
either JSON, or figures measured on different protocols, is bad input (UserError, exit 2): a gate
that silently passes because nothing was measured would be worse than none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from compress.errors import UserError
from compress.reports.frame import check_comparable, speed_device


@dataclass
class Thresholds:
    max_ppl_increase_pct: float | None = None
    min_decode_speedup: float | None = None
    min_prefill_speedup: float | None = None
    max_kl: float | None = None
    min_top1_agreement: float | None = None
    decode_batch: int | None = None        # None: the smallest batch both results measured

    def any(self) -> bool:
        return any(v is not None for k, v in vars(self).items() if k != "decode_batch")


def parse_percent(text: str, flag: str) -> float:
    """'2%' or '2' -> 2.0 (percent)."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise UserError(f"{flag} expects a percentage such as 2% or 0.5%, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{flag} must be a percentage >= 0, got {text!r}")
    return value


def check(name: str, base: dict, new: dict, t: Thresholds) -> list[str]:
    """One line per broken threshold (empty: the gate passes)."""
    check_comparable(base, [new])
    broken = []
    bm, nm = base["metrics"], new["metrics"]
    if t.max_ppl_increase_pct is not None:
        change = 100 * (nm["perplexity"] / bm["perplexity"] - 1)
        if not change <= t.max_ppl_increase_pct:  # NaN (a broken model) fails too
            broken.append(f"{name}: perplexity {change:+.2f}% > allowed "
                          f"+{t.max_ppl_increase_pct:g}% ({bm['perplexity']:.4f} -> "
                          f"{nm['perplexity']:.4f})")
    if t.max_kl is not None:
        kl = _metric(nm, "kl_divergence", name, "--max-kl", "evaluate it in a sweep (KL needs "
                     "the baseline in the same run)")
        if not kl <= t.max_kl:
            broken.append(f"{name}: KL divergence {kl:.3g} > allowed {t.max_kl:g}")
    if t.min_top1_agreement is not None:
        agree = _metric(nm, "top1_agreement", name, "--min-top1-agreement",
                        "evaluate it in a sweep")
        if not agree >= t.min_top1_agreement:
            broken.append(f"{name}: top-1 agreement {agree:.4f} < required "
                          f"{t.min_top1_agreement:g}")
    if t.min_decode_speedup is not None:
        batch, b_ms, n_ms = _decode(base, new, name, t.decode_batch)
        speedup = b_ms / n_ms
        if not speedup >= t.min_decode_speedup:
            broken.append(f"{name}: decode speed-up {speedup:.3f}x < required "
                          f"{t.min_decode_speedup:g}x at batch {batch} ({b_ms:.3f} -> "
                          f"{n_ms:.3f} ms/token on {speed_device(new['metrics']['speed'])})")
    if t.min_prefill_speedup is not None:
        shape, b_tps, n_tps = _prefill(base, new, name)
        speedup = n_tps / b_tps
        if not speedup >= t.min_prefill_speedup:
            broken.append(f"{name}: prefill speed-up {speedup:.3f}x < required "
                          f"{t.min_prefill_speedup:g}x at {shape} ({b_tps:,.0f} -> {n_tps:,.0f} "
                          f"tokens/s on {speed_device(new['metrics']['speed'])})")
    return broken


def _metric(metrics: dict, key: str, name: str, flag: str, hint: str) -> float:
    value = metrics.get(key)
    if value is None:
        raise UserError(f"{flag} needs {key}, which {name} does not have; {hint}")
    return value


def _speed(result: dict, name: str, flag: str) -> dict:
    speed = result["metrics"].get("speed")
    if not speed:
        raise UserError(f"{flag} needs speed figures, which {name} does not have; measure them "
                        "with `compress sweep --bench`")
    return speed


def _decode(base: dict, new: dict, name: str, batch: int | None) -> tuple[int, float, float]:
    flag = "--min-decode-speedup"
    b = {d["batch"]: d["ms_per_token"] for d in _speed(base, "the baseline", flag)["decode"]}
    n = {d["batch"]: d["ms_per_token"] for d in _speed(new, name, flag)["decode"]}
    common = sorted(set(b) & set(n))
    if batch is None:
        if not common:
            raise UserError(f"{flag}: the baseline and {name} share no decode batch size")
        batch = common[0]
    if batch not in common:
        raise UserError(f"--decode-batch {batch} was not measured for both the baseline and "
                        f"{name}; measured for both: {', '.join(map(str, common)) or 'none'}")
    return batch, b[batch], n[batch]


def _prefill(base: dict, new: dict, name: str) -> tuple[str, float, float]:
    flag = "--min-prefill-speedup"
    b = {f"{p['batch']}x{p['tokens']}": p["tokens_per_s"]
         for p in _speed(base, "the baseline", flag)["prefill"]}
    n = {f"{p['batch']}x{p['tokens']}": p["tokens_per_s"] for p in _speed(new, name, flag)["prefill"]}
    common = [shape for shape in b if shape in n]
    if not common:
        raise UserError(f"{flag}: the baseline and {name} share no prefill shape")
    return common[0], b[common[0]], n[common[0]]
