"""`compress run RECIPE.yaml [--model M] --out DIR`: apply a recipe's passes, save, evaluate."""
from __future__ import annotations

from compress.checkpoint import check_output
from compress.commands import add_eval_options, add_model_options, apply_eval_options, resolve_dtype
from compress.commands.quantize import print_summary
from compress.errors import UserError
from compress.pipeline import Session, run_recipe
from compress.recipe import load_recipe


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
    add_eval_options(p)
    add_model_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    recipe = load_recipe(args.recipe)
    recipe.model = args.model or recipe.model
    if not recipe.model:
        raise UserError(f"recipe {args.recipe} names no model; pass --model")
    check_output(args.out, args.overwrite)
    apply_eval_options(recipe, args)
    session = Session.open(recipe.model, recipe.corpus, args.device, resolve_dtype(args))
    results = run_recipe(session, recipe, args.out, args.overwrite,
                         do_eval=args.eval and recipe.evaluation.enabled)
    print(f"wrote {args.out}")
    if results:
        print_summary(results)
    return 0
