"""`compress prune MODEL --method NAME [method flags] --out DIR [--eval]`."""
from __future__ import annotations

import json
import os

from compress.checkpoint import read_meta
from compress.commands.quantize import add_single_pass_options, run_single_pass

# Flags that map one-to-one onto pass config fields (argparse dest == field name).
PRUNE_FLAGS = ("sparsity", "pattern", "profile", "ratio", "drop")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prune", help="prune a model (unstructured, N:M or structured) and save a checkpoint",
        description="Prune MODEL with one method and write a checkpoint. Unstructured and N:M "
        "methods: magnitude, wanda, sparsegpt. Structured: mlp-channels, heads, layers.")
    p.add_argument("model", help="smollm2-135m, random:<shape>, a folder, a .gguf file or a hub id")
    p.add_argument("--method", required=True,
                   help="magnitude, wanda, sparsegpt, mlp-channels, heads or layers")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights to zero (unstructured; default 0.5)")
    p.add_argument("--pattern", default=None, help="unstructured (default) or N:M, e.g. 2:4, 4:8")
    p.add_argument("--profile", default=None, help="per-layer sparsity: uniform (default) or owl")
    p.add_argument("--ratio", type=float, default=None,
                   help="mlp-channels/heads: fraction of channels/heads to remove (default 0.25)")
    p.add_argument("--drop", type=int, default=None,
                   help="layers: decoder layers to remove (default 4)")
    add_single_pass_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    code = run_single_pass(args, "prune", PRUNE_FLAGS)
    if code != 0:
        return code
    results = os.path.join(args.out, "results.json")
    if os.path.exists(results):
        with open(results) as handle:
            print(pruning_summary(json.load(handle)["metrics"]))
    else:  # not evaluated: the checkpoint's own record of what was pruned
        print(pruning_summary(read_meta(args.out).get("reports", {})))
    return code


def pruning_summary(metrics: dict) -> str:
    """One line on what the pruning really did: sparsity reached, or the shape removed."""
    parts = []
    sparsity = metrics.get("sparsity")
    if sparsity:
        per_layer = list(sparsity["per_layer"].values())
        parts.append(f"sparsity reached {sparsity['overall']:.4f} of decoder linear weights "
                     f"(per layer {min(per_layer):.4f} to {max(per_layer):.4f})")
    structured = metrics.get("structured")
    if structured:
        parts.append(f"parameters {structured['parameters_before']:,} -> "
                     f"{structured['parameters_after']:,}")
    if metrics.get("compress_seconds") is not None:
        parts.append(f"in {metrics['compress_seconds']} s")
    return "; ".join(parts)
