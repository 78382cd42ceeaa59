"""`compress report RESULTS... [--baseline B] [--out FILE.md|FILE.html|DIR] [gate thresholds]`:
a comparison with deltas against a baseline, and a regression gate for CI (exit 1 when a
threshold is broken, 0 when all hold, 2 on bad input)."""
from __future__ import annotations

import os

from compress.checkpoint import atomic_output_dir, check_output, check_output_file
from compress.errors import UserError, user_error_on
from compress.evaluate.results import read_json, write_json
from compress.reports import html_report, markdown_report, write_report_files
from compress.reports.gate import Thresholds, check, parse_percent
from compress.reports.speed_source import attach_speed


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="compare results JSON files; optionally gate on thresholds",
        description="Render results JSON files (or folders holding results.json) with deltas "
        "against a baseline. With thresholds it is a regression gate: one line per broken "
        "threshold and exit status 1; exit 0 when every threshold holds; 2 on bad input "
        "(including a threshold whose figure a JSON lacks).")
    p.add_argument("results", nargs="+", help="results JSON files, checkpoint folders (their "
                   "results.json) or sweep folders (every JSON in them)")
    p.add_argument("--baseline", default=None,
                   help="results JSON of the baseline (default: the one without a recipe)")
    p.add_argument("--out", default=None,
                   help="FILE.md (Markdown), FILE.html (self-contained, plots embedded) or a "
                        "folder (report.md, report.html, results.csv, plots); default: print only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--title", default="", help="report title")
    p.add_argument("--speed-from", nargs="+", default=None, metavar="RESULTS",
                   help="take speed figures from these results instead (a sweep of the same "
                        "recipes on random:<shape> on a GPU, say): matched by recipe name and "
                        "passes, same architecture and parameter count, one run with its baseline")
    g = p.add_argument_group("regression gate (each compared result against the baseline)")
    g.add_argument("--max-ppl-increase", default=None, metavar="PCT",
                   help="largest allowed perplexity increase, in percent (e.g. 2%%)")
    g.add_argument("--min-decode-speedup", type=float, default=None, metavar="X",
                   help="smallest allowed decode speed-up (baseline ms/token / new ms/token)")
    g.add_argument("--decode-batch", type=int, default=None, metavar="N",
                   help="decode batch size the speed-up is read at (default: the smallest "
                        "measured for both)")
    g.add_argument("--min-prefill-speedup", type=float, default=None, metavar="X",
                   help="smallest allowed prefill speed-up (tokens/s ratio, first shape)")
    g.add_argument("--max-kl", type=float, default=None, metavar="NATS",
                   help="largest allowed KL(uncompressed || new), as the sweep that evaluated "
                        "NEW measured it against its uncompressed model")
    g.add_argument("--min-top1-agreement", type=float, default=None, metavar="FRACTION",
                   help="smallest allowed top-1 token agreement with the sweep's uncompressed "
                        "model (0-1)")
    p.set_defaults(run=run)


def expand_paths(paths: list[str]) -> list[str]:
    """A folder with results.json stands for that file; any other folder (a sweep's report
    folder) for its JSON files, baseline.json first."""
    out = []
    for path in paths:
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "results.json")):
            if os.path.isfile(os.path.join(path, "compress.json")):
                raise UserError(f"checkpoint {path!r} has no results.json (written without "
                                f"--eval); evaluate it: compress eval {path} --out FILE.json")
            names = sorted((n for n in os.listdir(path)
                            if n.endswith(".json") and n != "failures.json"),  # a sweep's log
                           key=lambda n: (n != "baseline.json", n))
            if not names:
                nested = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
                hint = f"; give one of its folders ({', '.join(nested[:4])})" if nested else ""
                raise UserError(f"folder {path!r} holds neither results.json nor any .json "
                                f"file{hint}")
            out += [os.path.join(path, n) for n in names]
        else:
            out.append(path)
    return out


def folder_failures(paths: list[str]) -> dict:
    """{recipe: reason} from the failures.json of any sweep folder among `paths`."""
    failures = {}
    for path in paths:
        file = os.path.join(path, "failures.json")
        if os.path.isdir(path) and os.path.isfile(file):
            data = _read_json(file)
            if not isinstance(data, dict):
                raise UserError(f"{file} is not a sweep's failure log ({{recipe: reason}})")
            failures.update(data)
    return failures


def load_results(path: str) -> dict:
    file = os.path.join(path, "results.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"results file {file!r} does not exist")
    data = _read_json(file)
    problem = _shape_problem(data)
    if problem:
        raise UserError(f"{file} is not a compress results file ({problem})")
    return data


def _shape_problem(data) -> str | None:
    """What a results file lacks that every report reads, or None: a JSON of another shape
    gets one line naming the key, not a KeyError from deep inside the report."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    missing = {"model", "recipe", "protocol", "metrics", "environment"} - set(data)
    if missing:
        return f"missing {', '.join(sorted(missing))}"
    if not isinstance(data["protocol"], dict):
        return "protocol is not an object"
    metrics = data["metrics"]
    if not isinstance(metrics, dict) or not isinstance(metrics.get("perplexity"), (int, float)):
        return "metrics.perplexity is not a number"
    weights = metrics.get("weight_bytes")
    if not isinstance(weights, dict) or not all(
            isinstance(weights.get(k), (int, float)) for k in ("total", "linear")):
        return "metrics.weight_bytes.total and .linear must be numbers"
    speed = metrics.get("speed")
    if speed is not None and not (isinstance(speed, dict) and
                                  isinstance(speed.get("prefill"), list) and
                                  isinstance(speed.get("decode"), list)):
        return "metrics.speed must hold prefill and decode lists"
    return None


def _read_json(file: str):
    with user_error_on(f"{file} is not valid JSON", ValueError):
        return read_json(file)


def thresholds(args) -> Thresholds:
    t = Thresholds(
        max_ppl_increase_pct=None if args.max_ppl_increase is None
        else parse_percent(args.max_ppl_increase, "--max-ppl-increase"),
        min_decode_speedup=args.min_decode_speedup, min_prefill_speedup=args.min_prefill_speedup,
        max_kl=args.max_kl, min_top1_agreement=args.min_top1_agreement,
        decode_batch=args.decode_batch)
    if t.decode_batch is not None and t.min_decode_speedup is None:
        raise UserError("--decode-batch has no effect without --min-decode-speedup")
    for flag, value in (("--min-decode-speedup", t.min_decode_speedup),
                        ("--min-prefill-speedup", t.min_prefill_speedup), ("--max-kl", t.max_kl)):
        if value is not None and not value >= 0:
            raise UserError(f"{flag} must be >= 0, got {value}")
    if t.min_top1_agreement is not None and not 0 <= t.min_top1_agreement <= 1:
        raise UserError(f"--min-top1-agreement is a fraction in [0, 1], got {t.min_top1_agreement}")
    return t


def run(args) -> int:
    limits = thresholds(args)
    if args.out and args.out.endswith((".json", ".csv", ".png")):
        raise UserError(f"--out {args.out}: a report is written as FILE.md, FILE.html or a folder "
                        "(report.md, report.html, results.csv, plots)")
    if args.out and _is_folder(args.out):
        check_output(args.out, args.overwrite)
    elif args.out:
        check_output_file(args.out, args.overwrite)
    paths = expand_paths(args.results)
    if args.baseline:  # a sweep folder holds the baseline given apart too: one row, not two
        paths = [p for p in paths if not _same_file(p, args.baseline)]
    results = [load_results(p) for p in paths]
    baseline = load_results(args.baseline) if args.baseline else None
    if args.speed_from:
        donors = [(p, load_results(p)) for p in expand_paths(args.speed_from)]
        missing = attach_speed(results + ([baseline] if baseline else []), donors)
        if missing:
            print(f"no speed in --speed-from for: {', '.join(missing)}")
    failures = folder_failures(args.results)
    # Every input check (the gate's included) runs before --out is written: bad input exits 2
    # with nothing half-written.
    gate = gate_lines(paths, results, baseline, limits, failures) \
        if limits.any() else None
    text = markdown_report(results, baseline, args.title, failures)
    if args.out:
        write_output(args.out, results, baseline, args.title, text, args.overwrite, failures)
    print(text)
    if gate is None:
        return 0
    broken, gated = gate
    for line in broken:
        print(f"GATE FAILED {line}")
    if not broken:
        print(f"gate passed: {gated} result(s) within every threshold")
    return 1 if broken else 0


def gate_lines(paths, results, baseline, limits: Thresholds,
               failures: dict) -> tuple[list[str], int]:
    """(one line per broken threshold or failed recipe, number of results gated). A recipe that
    failed in the sweep fails the gate: it has no figures that could hold any threshold."""
    base = baseline or next((r for r in results if not r.get("recipe")), None)
    if base is None:
        raise UserError("the gate needs a baseline: pass --baseline OLD.json or a results file "
                        "without a recipe")
    broken, gated = [], 0
    for path, result in zip(paths, results):
        if result is base:
            continue
        gated += 1
        broken += check(_label(path, result), base, result, limits)
    if not gated and not failures:
        raise UserError("the gate has nothing to check: give results other than the baseline")
    broken += [f"{name}: the recipe failed in the sweep ({reason})"
               for name, reason in failures.items()]
    return broken, gated


def write_output(out: str, results, baseline, title: str, markdown: str, overwrite: bool,
                 failures: dict) -> None:
    if out.endswith(".md"):
        write_text(out, markdown)
    elif out.endswith(".html"):
        write_text(out, html_report(results, baseline, title, failures))
    else:
        with atomic_output_dir(out, overwrite) as tmp:
            write_report_files(tmp, results, baseline, title, failures)
            if failures:  # rendered again from this folder, the report still lists them
                write_json(failures, os.path.join(tmp, "failures.json"))


def _is_folder(out: str) -> bool:
    return not out.endswith((".md", ".html"))


def _label(path: str, result: dict) -> str:
    name = (result.get("recipe") or {}).get("name", "baseline")
    return f"{name} ({path})"


def _same_file(a: str, b: str) -> bool:
    resolve = lambda p: os.path.abspath(os.path.join(p, "results.json") if os.path.isdir(p) else p)
    return resolve(a) == resolve(b)


def write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    try:
        with user_error_on(f"cannot write {path}", OSError):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as handle:  # the tables hold Δ and ±
                handle.write(text)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # nothing half-written is left behind
            os.unlink(tmp)
