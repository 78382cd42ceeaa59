"""The `compress` command line. Each sub-command lives in compress/commands/<name>.py with
`add_parser(subparsers)` and `main(args) -> int`; bad input ends as one line and exit code 2."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from compress import __version__
from compress.errors import UserError

SUBCOMMANDS = ("quantize", "prune", "run", "eval", "report", "sweep", "bench")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (still exit code 2). A value option given
    twice keeps the last, as argparse and most tools do (wrappers append their overrides);
    `--option FIELD=...` refuses a field its own flag also set, since neither comes last by
    design there."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="compress", description="Compress LLMs (quantize, prune) and "
                           "measure what it bought and cost: perplexity, memory, speed.")
    parser.add_argument("--version", action="version", version=f"compress {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in SUBCOMMANDS:
        importlib.import_module(f"compress.commands.{name}").add_parser(subparsers)
    return parser


# Arguments that name files or folders a command reads.
INPUT_ARGS = ("model", "recipe", "recipes", "results", "baseline", "speed_from", "corpus",
              "tasks_dir")


def check_out_holds_no_input(args) -> None:
    """`--out` must spare every input the command line names (compress.checkpoint.
    check_out_spares_inputs); commands check again what a recipe names."""
    out = getattr(args, "out", None)
    if out is None:
        if getattr(args, "overwrite", False):
            raise UserError("--overwrite has no effect without --out (it replaces an existing "
                            "--out)")
        return
    if not out.strip():
        raise UserError("--out is empty; give the path of the output to write")
    from compress.checkpoint import check_out_spares_inputs

    inputs = []
    for name in INPUT_ARGS:
        value = getattr(args, name, None)
        inputs += value if isinstance(value, list) else [value] if isinstance(value, str) else []
    check_out_spares_inputs(out, getattr(args, "overwrite", False), inputs,
                            getattr(args, "model", None))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()   # imports torch and transformers: seconds
    except KeyboardInterrupt:
        print("compress: interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    # SIGTERM (kill, timeout, a job scheduler) unwinds like Ctrl-C, so unfinished outputs are
    # removed instead of left as .OUT.tmp-* folders.
    previous = (signal.signal(signal.SIGTERM, _interrupt)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        check_out_holds_no_input(args)
        return args.run(args) or 0
    except UserError as exc:
        print(f"compress {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"compress {args.command}: interrupted; its unfinished outputs were removed",
              file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
