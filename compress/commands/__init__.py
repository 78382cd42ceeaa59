"""CLI sub-commands, one module each, plus the options they share."""
from __future__ import annotations

import torch

from compress.errors import UserError
from compress.formats.base import FLOAT_DTYPES
from compress.sources import check_device

def add_model_options(parser) -> None:
    parser.add_argument("--device", default="cpu", help="compute device: cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default=None, choices=sorted(FLOAT_DTYPES),
                        help="float dtype (default: float32 on cpu, bfloat16 on cuda)")


def add_eval_options(parser, corpus_default: str = "pydoc", batch_default: str = "1") -> None:
    parser.add_argument("--corpus", default=None,
                        help=f"pydoc, wikitext, random (token ids for timing runs), a "
                             f".txt/.jsonl/.parquet file, or a hub dataset (default: "
                             f"{corpus_default})")
    parser.add_argument("--windows", type=int, default=None,
                        help="evaluation windows (default: the corpus protocol, 20 for pydoc)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="evaluation window length (default: the corpus protocol)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"evaluation batch size (default: {batch_default})")


def resolve_dtype(args) -> torch.dtype:
    check_device(args.device)
    if args.dtype:
        return FLOAT_DTYPES[args.dtype]
    return torch.float32 if args.device == "cpu" else torch.bfloat16


def apply_eval_options(recipe, args) -> None:
    """CLI evaluation flags override the recipe's evaluation section."""
    if args.windows is not None:
        recipe.evaluation.windows = args.windows
    if args.seq_len is not None:
        recipe.evaluation.seq_len = args.seq_len
    if args.batch_size is not None:
        recipe.evaluation.batch_size = args.batch_size
    recipe.evaluation.check()
    if args.corpus is not None:
        recipe.corpus = given_corpus(args)


def given_corpus(args) -> str | None:
    """--corpus as given (None: not given); an empty one is refused, not taken as the default."""
    if args.corpus is not None and not args.corpus.strip():
        raise UserError("--corpus is empty; give a corpus name or file such as pydoc")
    return args.corpus


def add_calibration_options(p) -> None:
    p.add_argument("--calib-samples", type=int, default=None,
                   help="calibration samples (default: the recipe's, else 64)")
    p.add_argument("--calib-seq-len", type=int, default=None,
                   help="tokens per calibration sample (default: the recipe's, else 512)")
    p.add_argument("--calib-device", default=None,
                   help="device that calibrates one layer at a time (default: --device); "
                        "cuda with --device cpu compresses a model larger than the GPU")
    p.add_argument("--calib-dtype", default=None,
                   help="what calibration forwards compute in: bfloat16 or float16 (default: the "
                        "recipe's, else the weights' own); statistics stay float32")


def check_flags_have_effect(args, recipes, evaluates: bool, no_eval: str) -> None:
    """Evaluation flags when nothing is evaluated, and calibration flags when no pass of
    `recipes` calibrates, would be accepted and ignored: refuse them instead. `no_eval` says
    why nothing is evaluated ("without --eval")."""
    calibrates = any(recipe.needs_calibration() for recipe in recipes)
    methods = ", ".join(dict.fromkeys(name for recipe in recipes for name, _ in recipe.passes))
    no_eval = f"has no effect {no_eval}"
    no_calib = f"has no effect: {methods} does not calibrate"
    corpus = f"{no_eval} ({methods} does not calibrate)"
    for flag, value, used, why in (
            ("--windows", args.windows, evaluates, no_eval),
            ("--seq-len", args.seq_len, evaluates, no_eval),
            ("--batch-size", args.batch_size, evaluates, no_eval),
            ("--corpus", args.corpus, evaluates or calibrates, corpus),
            ("--calib-samples", args.calib_samples, calibrates, no_calib),
            ("--calib-seq-len", args.calib_seq_len, calibrates, no_calib),
            ("--calib-device", args.calib_device, calibrates, no_calib),
            ("--calib-dtype", args.calib_dtype, calibrates, no_calib)):
        if value is not None and not used:
            raise UserError(f"{flag} {why}")


def apply_calibration_options(recipe, args) -> None:
    """CLI calibration flags override the recipe's calibration section."""
    if args.calib_samples is not None:
        recipe.calibration.samples = args.calib_samples
    if args.calib_seq_len is not None:
        recipe.calibration.seq_len = args.calib_seq_len
    if args.calib_dtype is not None:
        recipe.calibration.dtype = args.calib_dtype
    recipe.calibration.check()
    if args.calib_device is not None:
        check_device(args.calib_device, "calibration device")
        recipe.calibration.device = args.calib_device
