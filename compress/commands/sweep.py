"""`compress sweep RECIPE... --model M --out DIR [--tasks T,...] [--bench]`: the baseline and every
recipe on one protocol, the model loaded once, written as one report folder: report.md,
report.html (self-contained), results.csv, plots, baseline.json and one JSON per recipe."""
from __future__ import annotations

import gc
import os
import sys

from tqdm.auto import tqdm

from compress.checkpoint import atomic_output_dir, check_out_spares_inputs, check_output
from compress.commands import (add_calibration_options, add_eval_options, add_model_options,
                               apply_calibration_options, apply_eval_options,
                               check_flags_have_effect, resolve_dtype)
from compress.commands.bench import (add_runtime_switches, build_bench_config, runtime_switches,
                                     switch_flags)
from compress.data import window_shape
from compress.errors import UserError, check_number
from compress.evaluate.bench import sync_and_free
from compress.evaluate.divergence import Reference
from compress.evaluate.lm_eval_tasks import BUNDLED, TaskRunner, TaskSettings, parse_task_names
from compress.evaluate.results import environment, write_json
from compress.evaluate.timing import is_cuda
from compress.pipeline import Session, compress_model, evaluate, evaluation_windows
from compress.recipe import BenchSettings, load_recipe
from compress.reports import markdown_report, write_report_files

# How a recipe's failure is labelled when its input was bad (a UserError): the sweep exits 2.
BAD_INPUT = "bad input"
# The --bench-* flags' defaults. The flags themselves default to None, so that one given without
# --bench is refused rather than ignored.
BENCH_DEFAULTS = {"bench_batch": "1,8,32", "bench_prompt": 512, "bench_new": 128,
                  "bench_prefill": "1x2048,8x512", "bench_warmup": 2, "bench_repeats": 5,
                  "bench_kernel": ""}
TASKS_BATCH_SIZE = 16


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="baseline + several recipes, one report",
        description="Evaluate the baseline and every recipe on the same protocol (perplexity, "
        "KL and top-1 agreement against the baseline, weight memory; optionally lm-eval tasks "
        "and speed) and write a report folder.")
    p.add_argument("recipes", nargs="+", help="recipe YAML files")
    p.add_argument("--model", required=True, help="model source for every recipe")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument("--title", default="", help="report title (default: model and recipes)")
    p.add_argument("--kl-cache-gb", type=float, default=4.0,
                   help="memory for the baseline's float16 log-probs, in GiB (2^30 bytes; "
                        "default 4; SmolLM2 on the pydoc protocol needs 1.87); above it the "
                        "baseline is recomputed per window instead, 0 always recomputes")
    add_calibration_options(p)
    add_eval_options(p, corpus_default="the recipes'", batch_default="the recipes', else 1")
    add_model_options(p)
    t = p.add_argument_group("lm-eval tasks (scored on the in-memory models)")
    t.add_argument("--tasks", default=None, metavar="NAME[,NAME]",
                   help=f"lm-eval tasks: bundled ({', '.join(BUNDLED)}, offline), YAML tasks in "
                        "--tasks-dir (local files, offline), or lm-eval's registry (needs the hub)")
    t.add_argument("--tasks-dir", default=None, help="folder of lm-eval task YAML files")
    t.add_argument("--tasks-limit", type=int, default=None, help="documents per task (default all)")
    t.add_argument("--tasks-fewshot", type=int, default=None, help="few-shot examples (default: "
                                                                   "each task's own)")
    t.add_argument("--tasks-batch-size", type=int, default=None, help="lm-eval batch size (16)")
    b = p.add_argument_group("speed (the compress engine, evaluate/bench.py)")
    b.add_argument("--bench", action="store_true",
                   help="measure prefill and decode speed of the baseline and every recipe")
    b.add_argument("--bench-batch", default=None, help="decode batch sizes (1,8,32)")
    b.add_argument("--bench-prompt", type=int, default=None, help="decode prompt tokens (512)")
    b.add_argument("--bench-new", type=int, default=None, help="timed decode tokens (128)")
    b.add_argument("--bench-prefill", default=None,
                   help="prefill shapes BATCHxTOKENS (1x2048,8x512)")
    b.add_argument("--bench-warmup", type=int, default=None, help="warm-up runs (2)")
    b.add_argument("--bench-repeats", type=int, default=None, help="timed runs, median kept (5)")
    b.add_argument("--compile", action="store_true", help="compile the decode step")
    b.add_argument("--bench-kernel", default=None, metavar="FORMAT=KERNEL[,...]",
                   help="kernel per layer format instead of the measured default, e.g. "
                        "int4=triton; layers of other formats keep theirs")
    add_runtime_switches(b, "bench-")  # the baseline runs with them too
    p.set_defaults(run=run)


def bench_config(args):
    switches = runtime_switches(args, "bench-")
    if not args.bench:
        given = [f"--{dest.replace('_', '-')}" for dest in BENCH_DEFAULTS
                 if getattr(args, dest) is not None]
        given += ["--compile"] if args.compile else []
        given += [flag for field, flag in switch_flags("bench-").items() if switches[field]]
        if given:
            raise UserError(f"{given[0]} has no effect without --bench")
        return None
    value = {dest: BENCH_DEFAULTS[dest] if getattr(args, dest) is None else getattr(args, dest)
             for dest in BENCH_DEFAULTS}
    settings = BenchSettings(batches=value["bench_batch"], prompt=value["bench_prompt"],
                             new=value["bench_new"], prefill=value["bench_prefill"],
                             warmup=value["bench_warmup"], repeats=value["bench_repeats"],
                             compile=args.compile, kernel=value["bench_kernel"], **switches)
    return build_bench_config(settings, {"batches": "--bench-batch", "kernel": "--bench-kernel",
                                         "compile": "--compile",
                                         **switch_flags("bench-")}.get)


def load_recipes(args) -> list:
    recipes = [load_recipe(path) for path in args.recipes]
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):  # (baseline and failures are refused by load_recipe)
        raise UserError(f"recipe names must be unique: {', '.join(names)}")
    check_flags_have_effect(args, recipes, True, "")   # a sweep always evaluates
    for recipe in recipes:
        if not recipe.evaluation.enabled:
            raise UserError(f"recipe {recipe.name} sets evaluation.enabled: false, which compress "
                            "sweep does not read: a sweep evaluates every model; drop the key "
                            "(compress run reads it)")
        if recipe.bench is not None:
            raise UserError(f"recipe {recipe.name} has a bench section, which compress sweep does "
                            "not read: a sweep times every model alike with --bench and the "
                            "--bench-* flags; drop the section (compress run reads it)")
        recipe.model = args.model
        apply_calibration_options(recipe, args)
        apply_eval_options(recipe, args)
    def windows(r):  # unset values are the corpus default, as evaluation resolves them
        return window_shape(r.corpus, r.evaluation.seq_len, r.evaluation.windows)

    for what, key in (("corpora", lambda r: r.corpus),
                      ("evaluation windows (tokens, count)", windows)):
        if len({key(r) for r in recipes}) > 1:
            raise UserError(f"recipes use different {what} "
                            f"({', '.join(f'{r.name}: {key(r)}' for r in recipes)}); a sweep "
                            "compares one protocol (set --corpus / --windows / --seq-len)")
    return recipes


class Measure:
    """What the sweep measures on every model beyond perplexity: lm-eval tasks and speed."""

    def __init__(self, args, session: Session, tasks: TaskRunner | None, bench):
        self.session, self.tasks, self.bench = session, tasks, bench
        self.source = source_state()
        self.ceilings = None
        if bench is not None:
            from compress.evaluate.bench import measure_ceilings

            # Once per sweep: every row's roofline is against the same measured bandwidth.
            self.ceilings = measure_ceilings(bench, session.device, resolve_dtype(args))

    def add(self, result: dict, model, name: str) -> dict:
        if self.source:
            result["environment"]["source"] = self.source
        if self.tasks is not None:
            result["metrics"]["tasks"] = self.tasks.run(model, self.session.loaded.tokenizer)
            result["protocol"]["tasks"] = self.tasks.protocol()
        if self.bench is not None:
            from compress.evaluate.bench import bench_engine

            # Last: the engine prepares quantized layers' fast layouts on the model it times.
            row = bench_engine(model, self.bench, self.session.device, name, self.ceilings)
            env = environment(self.session.device)
            on_gpu = is_cuda(self.session.device)  # a CPU run on a GPU host is a CPU run
            result["metrics"]["speed"] = {
                **row, "device": self.session.device, "gpu": env["gpu"] if on_gpu else None,
                "driver": env.get("driver"), "cpu": env["cpu"], "threads": env["threads"],
                "ceilings": self.ceilings}
            result["protocol"]["speed"] = self.bench.protocol(self.session.device)
        return result


def source_state() -> dict | None:
    """The git commit of the compress source and whether it had uncommitted changes: during
    development the package version alone does not say which code produced a figure."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "."],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None  # an installed package, not a checkout
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def run(args) -> int:
    recipes = load_recipes(args)
    bench = bench_config(args)
    task_settings = None
    if args.tasks:
        batch_size = TASKS_BATCH_SIZE if args.tasks_batch_size is None else args.tasks_batch_size
        task_settings = TaskSettings(parse_task_names(args.tasks), args.tasks_dir,
                                     args.tasks_limit, batch_size, args.tasks_fewshot)
    else:
        for flag, value in (("--tasks-dir", args.tasks_dir), ("--tasks-limit", args.tasks_limit),
                            ("--tasks-fewshot", args.tasks_fewshot),
                            ("--tasks-batch-size", args.tasks_batch_size)):
            if value is not None:
                raise UserError(f"{flag} needs --tasks NAME[,NAME] naming the tasks to run")
    check_number("--kl-cache-gb", args.kl_cache_gb, 0)
    check_out_spares_inputs(args.out, args.overwrite, [r.corpus for r in recipes], args.model)
    check_output(args.out, args.overwrite)
    dtype = resolve_dtype(args)
    title = args.title or f"{args.model}: {', '.join(r.name for r in recipes)}"
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        tasks = None
        if task_settings is not None:
            os.makedirs(os.path.join(tmp, "tasks"))
            # Before loading the model: a bad task name fails in seconds, not after the baseline.
            tasks = TaskRunner(task_settings, os.path.join(tmp, "tasks"))
        session = Session.open(args.model, recipes[0].corpus, args.device, dtype)
        measure = Measure(args, session, tasks, bench)
        failures = {}
        results = sweep(session, recipes, measure, tmp, int(args.kl_cache_gb * 2**30), failures)
        write_report_files(tmp, results, title=title, failures=failures)
    print(markdown_report(results, title=title, failures=failures))
    print(f"wrote {args.out}")
    for name, reason in failures.items():
        print(f"compress sweep: error: recipe {name} failed: {reason}", file=sys.stderr)
    if any(reason.startswith(BAD_INPUT) for reason in failures.values()):
        return 2
    return 1 if failures else 0


def sweep(session: Session, recipes: list, measure: Measure, folder: str, cache_bytes: int,
          failures: dict) -> list:
    """Measure the baseline and each recipe. A recipe that fails at run time is recorded in
    `failures` {name: one-line reason} (and failures.json) and the sweep goes on."""
    settings = recipes[0].evaluation
    base_model = session.loaded.model
    reference = Reference.plan(base_model, evaluation_windows(session, settings), cache_bytes)
    progress = tqdm(total=len(recipes) + 1, desc="sweep", unit="model")
    progress.set_postfix_str("baseline")
    baseline = evaluate(session, base_model, settings, None, desc="baseline",
                        record_into=reference)
    results = [measure.add(baseline, base_model, "baseline")]
    write_json(baseline, os.path.join(folder, "baseline.json"))
    progress.update()
    for recipe in recipes:
        progress.set_postfix_str(recipe.name)
        try:
            result = measure_recipe(session, recipe, measure, reference)
        except Exception as exc:  # one recipe's failure must not lose the others' measurements
            # A recipe that does not fit the model (a group size that does not divide a
            # width) is bad input: named as such, and the sweep exits 2 once it is written.
            kind = BAD_INPUT if isinstance(exc, UserError) else type(exc).__name__
            failures[recipe.name] = f"{kind}: {exc}".splitlines()[0][:300]
            progress.write(f"{recipe.name}: FAILED, {failures[recipe.name]}")
        else:
            write_json(result, os.path.join(folder, f"{recipe.name}.json"))
            results.append(result)
            m = result["metrics"]
            progress.write(f"{recipe.name}: perplexity {m['perplexity']:.3f}, KL "
                           f"{m['kl_divergence']:.4f}, top-1 {100 * m['top1_agreement']:.2f}%")
        gc.collect()  # the recipe's model, before the next one is built
        sync_and_free(session.device)
        progress.update()
    progress.close()
    if failures:
        write_json(failures, os.path.join(folder, "failures.json"))
    return results


def measure_recipe(session: Session, recipe, measure: Measure, reference) -> dict:
    model, seconds = compress_model(session, recipe)
    extra = {"compress_seconds": seconds, **(getattr(model, "compress_report", None) or {})}
    result = evaluate(session, model, recipe.evaluation, recipe.resolved(), desc=recipe.name,
                      extra_metrics=extra, reference=reference)
    return measure.add(result, model, recipe.name)

