"""`compress eval MODEL_OR_DIR [--out results.json]`: perplexity and weight memory."""
from __future__ import annotations

from compress.checkpoint import check_output_file
from compress.commands import add_eval_options, add_model_options, given_corpus, resolve_dtype
from compress.commands.quantize import print_summary
from compress.evaluate.results import write_json
from compress.pipeline import Session, evaluate
from compress.prune.common import saved_reports
from compress.recipe import EvaluationSettings


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model or a compressed checkpoint",
                              description="Perplexity (PROTOCOL.md) and weight bytes of a model.")
    p.add_argument("model", help="smollm2-135m, random:<shape>, a checkpoint folder, a .gguf "
                                 "file or a hub id")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_eval_options(p)
    add_model_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    if args.out:
        check_output_file(args.out, args.overwrite)
    settings = EvaluationSettings(windows=args.windows, seq_len=args.seq_len,
                                  batch_size=1 if args.batch_size is None else args.batch_size)
    session = Session.open(args.model, given_corpus(args) or "pydoc", args.device,
                           resolve_dtype(args))
    recipe = session.loaded.provenance.get("recipe")
    # A pruned checkpoint's sparsity and structure, as recorded when it was written.
    results = evaluate(session, session.loaded.model, settings, recipe,
                       extra_metrics=saved_reports(session.loaded.model))
    if args.out:
        write_json(results, args.out)
        print(f"wrote {args.out}")
    print_summary(results)
    return 0
