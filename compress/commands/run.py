"""`compress run RECIPE.yaml [--model M] --out DIR`: apply a recipe's passes, save, evaluate, and
when the recipe has a `bench` section, time the model before and after (OUT/baseline.json)."""
from __future__ import annotations

from compress.checkpoint import check_out_spares_inputs, check_output
from compress.commands import (add_calibration_options, add_eval_options, add_model_options,
                               apply_calibration_options, apply_eval_options,
                               check_flags_have_effect, resolve_dtype)
from compress.commands.bench import build_bench_config
from compress.commands.quantize import print_summary
from compress.commands.sweep import Measure
from compress.errors import UserError
from compress.pipeline import Session, evaluate, run_recipe
from compress.recipe import load_recipe
from compress.reports import markdown_report


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="run a YAML recipe (a chain of passes)",
                              description="Apply the passes of RECIPE to its model, save the "
                              "checkpoint to OUT and evaluate it (OUT/results.json).")
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("--model", default=None, help="model source; overrides the recipe's")
    p.add_argument("--out", required=True, help="output folder for the checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-eval", dest="eval", action="store_false",
                   help="skip evaluation even if the recipe asks for it")
    add_calibration_options(p)
    add_eval_options(p, corpus_default="the recipe's", batch_default="the recipe's, else 1")
    add_model_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    recipe = load_recipe(args.recipe)
    recipe.model = args.model or recipe.model
    if not recipe.model:
        raise UserError(f"recipe {args.recipe} names no model; pass --model")
    # The command line's inputs were checked in compress.cli; the recipe's model and corpus too.
    check_out_spares_inputs(args.out, args.overwrite, [recipe.model, recipe.corpus], recipe.model)
    check_output(args.out, args.overwrite)
    do_eval = args.eval and recipe.evaluation.enabled
    check_flags_have_effect(args, [recipe], do_eval, "with --no-eval" if not args.eval else
                            "when the recipe's evaluation.enabled is false")
    apply_calibration_options(recipe, args)
    apply_eval_options(recipe, args)
    if recipe.bench is not None and not do_eval:
        why = "drop --no-eval" if not args.eval else "set the recipe's evaluation.enabled: true"
        raise UserError("the recipe asks for a benchmark, which is reported beside the "
                        f"evaluation; {why} (or drop the recipe's bench section)")
    session = Session.open(recipe.model, recipe.corpus, args.device, resolve_dtype(args))
    measure, extra = None, {}
    if recipe.bench is not None:
        # Before: the source model, evaluated and timed in this run; after: the compressed one.
        bench = build_bench_config(recipe.bench, lambda field: f"bench.{field}")
        measure = Measure(args, session, None, bench).add
        source = session.loaded.model
        extra["baseline.json"] = measure(evaluate(session, source, recipe.evaluation, None,
                                                  desc="baseline"), source, "baseline")
    results = run_recipe(session, recipe, args.out, args.overwrite, do_eval, measure, extra)
    print(f"wrote {args.out}")
    if results and extra:
        print(markdown_report([extra["baseline.json"], results], title=recipe.name))
    elif results:
        print_summary(results)
    return 0

