"""`compress report RESULTS... --out FILE`: a Markdown comparison with deltas against a baseline."""
from __future__ import annotations

import os

from compress.errors import UserError
from compress.report import markdown_report
from evaluate.results import read_json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="render a comparison of results JSON files",
                              description="Render results JSON files (or folders holding "
                              "results.json) as a Markdown table with deltas against a baseline.")
    p.add_argument("results", nargs="+", help="results JSON files or checkpoint folders")
    p.add_argument("--baseline", default=None,
                   help="results JSON of the baseline (default: the one without a recipe)")
    p.add_argument("--out", required=True, help="Markdown file to write")
    p.add_argument("--title", default="", help="report title")
    p.set_defaults(run=run)


def load_results(path: str) -> dict:
    file = os.path.join(path, "results.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"results file {file!r} does not exist")
    try:
        data = read_json(file)
    except ValueError as exc:
        raise UserError(f"{file} is not valid JSON: {exc}") from exc
    missing = {"model", "recipe", "protocol", "metrics", "environment"} - set(data)
    if missing:
        raise UserError(f"{file} is not a compress results file (missing {', '.join(sorted(missing))})")
    return data


def run(args) -> int:
    results = [load_results(p) for p in args.results]
    baseline = load_results(args.baseline) if args.baseline else None
    text = markdown_report(results, baseline, args.title)
    write_text(args.out, text)
    print(text)
    return 0


def write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
