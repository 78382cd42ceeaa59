"""Speed measured on another model of the same shape, attached to quality results.

The real model's file cannot always travel to the GPU machine (SmolLM2's GGUF here), and speed
does not depend on the weights' values: a sweep of the same recipes on `random:<shape>` on the
GPU gives the speed, the CPU sweep of the real model the quality. `compress report QUALITY...
--speed-from SPEED_SWEEP` joins them; every borrowed figure says where it came from.
"""
from __future__ import annotations

import json

from compress.errors import UserError


def recipe_key(result: dict) -> tuple:
    """What makes two results the same compression: the recipe's name and its resolved passes
    (calibration data and corpus may differ; they do not change the stored format)."""
    recipe = result.get("recipe")
    if not recipe:
        return ("baseline",)
    return (recipe["name"], json.dumps(recipe["passes"], sort_keys=True))


def model_shape(result: dict) -> tuple:
    """(architecture, parameter count) of the source model a result was measured on."""
    return result["model"].get("architecture"), result["model"].get("parameters")


def attach_speed(results: list[dict], donors: list[tuple[str, dict]]) -> list[str]:
    """Give each result the speed of the donor with the same recipe key, in place. The donors
    must be one run (one GPU, one speed protocol) that includes the baseline, and their model the
    same architecture and parameter count. Returns the names of results left without speed."""
    timed = [(path, d) for path, d in donors if d["metrics"].get("speed")]
    if not timed:
        raise UserError("--speed-from: none of its results holds speed figures (a sweep run "
                        "with --bench, or compress run with a bench section)")
    runs = {(d["metrics"]["speed"].get("gpu") or d["metrics"]["speed"].get("cpu"),
             json.dumps(d["protocol"].get("speed"), sort_keys=True)) for _, d in timed}
    if len(runs) > 1:
        raise UserError("--speed-from: its results come from different machines or speed "
                        "protocols; give one sweep's results")
    by_key = {}
    for path, donor in timed:
        key = recipe_key(donor)
        if key in by_key:  # two runs given together: a speed-up must not mix their baselines
            raise UserError(f"--speed-from: {by_key[key][0]} and {path} both time "
                            f"{key[0]}; give one run's results")
        by_key[key] = (path, donor)
    if ("baseline",) not in by_key:
        raise UserError("--speed-from: no baseline among its results; speed-ups need the "
                        "baseline timed in the same run")
    missing = []
    for result in results:
        found = by_key.get(recipe_key(result))
        if found is None:
            result["metrics"].pop("speed", None)  # never mix a borrowed baseline with own figures
            result["protocol"].pop("speed", None)
            missing.append((result.get("recipe") or {}).get("name", "baseline"))
            continue
        path, donor = found
        if model_shape(donor) != model_shape(result):
            raise UserError(f"--speed-from: {path} timed a model of {model_shape(donor)} "
                            f"(architecture, parameters), the results are of "
                            f"{model_shape(result)}")
        result["metrics"]["speed"] = {**donor["metrics"]["speed"], "borrowed_from": {
            "file": path, "model": donor["model"]["source"],
            "dtype": donor["protocol"].get("dtype"),  # not the quality protocol's dtype
            "why": "speed does not depend on weight values; timed on this model of the "
                   "same shape"}}
        result["protocol"]["speed"] = donor["protocol"]["speed"]
    return missing
