"""The speed-up verdict: for each recipe, the shapes at which it is faster or slower than the
baseline measured in the same run, so that "memory only" is said where that is the truth.

A speed-up within NOISE of 1.0 counts as "the same": the speed protocol asks two runs of one
command to agree within 5%, so a smaller difference is not evidence of a change.
"""
from __future__ import annotations

import math

NOISE = 0.05


def shape_speedups(row: dict, prefill: list[str], batches: list[int]) -> list[tuple[str, float]]:
    """(label, speed-up over the baseline) for every measured shape of one frame row."""
    out = [(f"prefill {shape}", row.get(f"prefill_speedup_{shape}", math.nan)) for shape in prefill]
    out += [(f"decode b{b}", row.get(f"decode_speedup_b{b}", math.nan)) for b in batches]
    return [(label, float(value)) for label, value in out
            if isinstance(value, (int, float)) and not math.isnan(value)]


def verdict(speedups: list[tuple[str, float]], weight_ratio: float) -> tuple[str, str, str, str]:
    """(faster at, the same at, slower at, verdict) from `shape_speedups`.

    weight_ratio: baseline weight bytes over this model's; above 1 the model is smaller, which
    is what "memory only" means when no shape got faster.
    """
    faster = [label for label, s in speedups if s > 1 + NOISE]
    slower = [label for label, s in speedups if s < 1 - NOISE]
    same = [label for label, s in speedups if 1 - NOISE <= s <= 1 + NOISE]
    if not speedups:
        word = "not measured"
    elif faster and not slower:
        word = "faster at every measured shape" if not same else "faster or the same"
    elif faster:
        word = "mixed: faster at some shapes, slower at others"
    elif weight_ratio > 1 + NOISE:
        word = ("memory only: smaller, no faster" if not slower else
                "memory only: smaller, no faster, slower at some shapes" if same else
                "memory only: smaller but slower at every measured shape")
    else:
        word = "no change" if not slower else "slower"
    return (", ".join(faster) or "-", ", ".join(same) or "-", ", ".join(slower) or "-", word)
