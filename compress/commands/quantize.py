"""`compress quantize MODEL --method NAME [method flags] --out DIR [--eval]`."""
from __future__ import annotations

import argparse

import yaml

from compress.commands import (add_calibration_options, add_eval_options, add_model_options,
                               apply_calibration_options, apply_eval_options,
                               check_flags_have_effect, resolve_dtype)
from compress.checkpoint import check_output
from compress.errors import UserError, choices, first_line
from compress.passes import build_config, pass_table
from compress.pipeline import Session, run_recipe
from compress.recipe import Recipe, load_yaml

# Flags that map one-to-one onto pass config fields (argparse dest == field name).
PASS_FLAGS = ("bits", "group_size", "symmetric")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="quantize a model and save a compressed checkpoint",
                              description="Quantize MODEL with one method and write a checkpoint.")
    p.add_argument("model", help="smollm2-135m, random:<shape>, a folder, a .gguf file or a hub id")
    p.add_argument("--method", required=True, help="quantization pass, e.g. rtn")
    p.add_argument("--bits", type=int, default=None,
                   help="4 or 8 (default: the method's, 8 for rtn, 4 for gptq and awq)")
    p.add_argument("--group-size", type=int, default=None,
                   help="input columns per scale; 0 = per output channel (default 64 for 4 bits, "
                        "0 for 8 bits)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="a grid symmetric around zero (the default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false",
                     help="a grid with a zero point per group")
    add_single_pass_options(p)
    p.set_defaults(run=lambda args: run_single_pass(args, "quantize", PASS_FLAGS))


def add_single_pass_options(p) -> None:
    """What `compress quantize` and `compress prune` share after their method flags."""
    add_pass_option(p)
    p.add_argument("--out", required=True, help="output folder for the checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--eval", action="store_true", help="evaluate and write OUT/results.json")
    add_calibration_options(p)
    add_eval_options(p)
    add_model_options(p)


def add_pass_option(p) -> None:
    p.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other field of the pass config (YAML value), repeatable")


def pass_fields(args, flags) -> dict:
    fields = {flag: getattr(args, flag) for flag in flags if getattr(args, flag, None) is not None}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--option expects FIELD=VALUE, got {item!r}")
        field = key.replace("-", "_")
        if field in fields:  # one value per field, not the last one silently
            given = f"--{field.replace('_', '-')}" if field in flags else f"--option {field}"
            raise UserError(f"--option {item} sets {field} again, after {given}; give it once")
        try:
            fields[field] = load_yaml(value)
        except yaml.YAMLError as exc:
            raise UserError(f"--option {item}: the value is not valid YAML "
                            f"({first_line(exc)})") from exc
    return fields


def run_single_pass(args: argparse.Namespace, kind: str, flags) -> int:
    table = {n: s for n, s in pass_table().items() if s.kind == kind}
    if args.method not in table:
        raise UserError(f"unknown {kind} method {args.method!r}; allowed: {choices(table)}")
    config = build_config(table[args.method], pass_fields(args, flags))
    check_output(args.out, args.overwrite)
    recipe = Recipe(name=recipe_name(args.method, config), passes=[(args.method, config)],
                    model=args.model)
    check_flags_have_effect(args, [recipe], args.eval, "without --eval")
    apply_calibration_options(recipe, args)
    apply_eval_options(recipe, args)
    session = Session.open(args.model, recipe.corpus, args.device, resolve_dtype(args))
    results = run_recipe(session, recipe, args.out, args.overwrite, do_eval=args.eval)
    print(f"wrote {args.out}")
    if results:
        print_summary(results)
    return 0


def recipe_name(method: str, config) -> str:
    """A short readable name such as rtn-w4-g64-sym, from the fields the config has."""
    parts = [method]
    if hasattr(config, "bits"):
        parts.append(f"w{config.bits}")
    if getattr(config, "group_size", None) is not None:
        parts.append(f"g{config.group_size}" if config.group_size else "channel")
    if hasattr(config, "symmetric"):
        parts.append("sym" if config.symmetric else "asym")
    # Pruning: what tells two runs of one method apart (wanda-s0.5, sparsegpt-2of4, heads-r0.33).
    pattern = getattr(config, "pattern", None)
    if pattern == "unstructured":
        parts.append(f"s{0.5 if config.sparsity is None else config.sparsity:g}")
    elif pattern is not None:
        parts.append(pattern.replace(":", "of"))
    if getattr(config, "profile", "uniform") != "uniform":
        parts.append(config.profile)
    if hasattr(config, "ratio"):
        parts.append(f"r{config.ratio:g}")
    if getattr(config, "mode", "kv-groups") != "kv-groups":
        parts.append(config.mode)
    if getattr(config, "scope", None) == "global":
        parts.append("global")
    if hasattr(config, "drop"):
        parts.append(f"d{config.drop}")
    return "-".join(parts)


def print_summary(results: dict) -> None:
    m = results["metrics"]
    print(f"perplexity {m['perplexity']:.3f} on {results['protocol']['eval_windows']} windows; "
          f"weights {m['weight_bytes']['total'] / 1e6:.1f} MB "
          f"(linear {m['weight_bytes']['linear'] / 1e6:.1f} MB)")
