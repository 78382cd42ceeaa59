"""`compress sweep RECIPE... --model M --out DIR`: the baseline and every recipe on one protocol,
the model loaded once; writes each results JSON and report.md into DIR."""
from __future__ import annotations

import os

from compress.checkpoint import atomic_output_dir, check_output
from compress.commands import add_eval_options, add_model_options, apply_eval_options, resolve_dtype
from compress.commands.report import write_text
from compress.errors import UserError
from compress.pipeline import Session, evaluate, run_recipe
from compress.recipe import load_recipe
from compress.report import markdown_report
from evaluate.results import write_json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="baseline + several recipes, one report",
                              description="Evaluate the baseline and every recipe on the same "
                              "protocol and write a report folder.")
    p.add_argument("recipes", nargs="+", help="recipe YAML files")
    p.add_argument("--model", required=True, help="model source for every recipe")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    add_eval_options(p)
    add_model_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    recipes = [load_recipe(path) for path in args.recipes]
    names = [r.name for r in recipes]
    if len(set(names)) != len(names) or "baseline" in names:
        raise UserError(f"recipe names must be unique and not 'baseline': {', '.join(names)}")
    for recipe in recipes:
        recipe.model = args.model
        apply_eval_options(recipe, args)
    corpora = {r.corpus for r in recipes}
    if len(corpora) > 1:
        raise UserError(f"recipes use different corpora ({', '.join(sorted(corpora))}); "
                        "a sweep compares one protocol")
    check_output(args.out, args.overwrite)
    session = Session.open(args.model, corpora.pop(), args.device, resolve_dtype(args))
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        baseline = evaluate(session, session.loaded.model, recipes[0].evaluation, None,
                            desc="baseline")
        write_json(baseline, os.path.join(tmp, "baseline.json"))
        results = [baseline]
        for recipe in recipes:
            result = run_recipe(session, recipe, None, False, do_eval=True)
            write_json(result, os.path.join(tmp, f"{recipe.name}.json"))
            results.append(result)
            print(f"{recipe.name}: perplexity {result['metrics']['perplexity']:.3f}", flush=True)
        text = markdown_report(results, title=f"{args.model}: {', '.join(names)}")
        write_text(os.path.join(tmp, "report.md"), text)
    print(text)
    return 0
