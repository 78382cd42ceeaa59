"""The `compress` command line. Each sub-command lives in compress/commands/<name>.py with
`add_parser(subparsers)` and `main(args) -> int`; bad input ends as one line and exit code 2."""
from __future__ import annotations

import argparse
import importlib
import sys

from compress import __version__
from compress.errors import UserError

SUBCOMMANDS = ("quantize", "prune", "run", "eval", "report", "sweep", "bench")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (still exit code 2)."""

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as exc:
        print(f"compress {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
