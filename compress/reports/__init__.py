"""Comparison reports of results JSONs: tables with deltas against a baseline (pandas), trade-off
plots (matplotlib), Markdown and self-contained HTML, results.csv, and the regression gate."""
from __future__ import annotations

import os

from compress.reports.content import report_blocks
from compress.reports.frame import results_frame
from compress.reports.render import to_html, to_markdown


def markdown_report(results: list[dict], baseline: dict | None = None, title: str = "",
                    failures: dict | None = None) -> str:
    """The report as Markdown without plots (for a terminal or a single .md file)."""
    return to_markdown(report_blocks(results, baseline, title, plots=False, failures=failures))


def html_report(results: list[dict], baseline: dict | None = None, title: str = "",
                failures: dict | None = None) -> str:
    return to_html(report_blocks(results, baseline, title, failures=failures))


def write_report_files(folder: str, results: list[dict], baseline: dict | None = None,
                       title: str = "", failures: dict | None = None) -> list[str]:
    """report.md (+ the PNGs it links), report.html (PNGs embedded) and results.csv, written into
    an existing folder (the caller's temporary one); returns the file names."""
    blocks = report_blocks(results, baseline, title, failures=failures)
    names = ["report.md", "report.html", "results.csv"]
    _write(os.path.join(folder, "report.md"), to_markdown(blocks))
    _write(os.path.join(folder, "report.html"), to_html(blocks))
    results_frame(results, baseline).to_csv(os.path.join(folder, "results.csv"), index=False)
    for block in blocks:
        if block[0] == "img":
            with open(os.path.join(folder, block[1]), "wb") as handle:
                handle.write(block[2])
            names.append(block[1])
    return names


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
