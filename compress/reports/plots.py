"""Trade-off plots as PNG bytes: perplexity against weight memory and against decode speed, with
the Pareto front marked. Uses matplotlib's object API on an Agg canvas (no pyplot): no global
backend switch, no figure registry, nothing left open, safe in tests and headless machines."""
from __future__ import annotations

import io
import math

import pandas as pd

from compress.reports.frame import pareto_front, speed_shapes


def ppl_vs_memory(frame: pd.DataFrame) -> bytes:
    return _scatter(frame, "weight_mb", "weights (MB, every stored byte)",
                    "perplexity vs weight memory", maximize_x=False)


def ppl_vs_decode(frame: pd.DataFrame) -> bytes | None:
    """Against decode tokens/s at the smallest measured batch; None without speed figures."""
    _, batches = speed_shapes(frame)
    if not batches:
        return None
    batch = batches[0]
    column = f"decode_tok_s_b{batch}"
    if frame[column].isna().all():
        return None
    devices = sorted(set(frame.get("speed_device", pd.Series(dtype=str)).dropna()))
    return _scatter(frame, column, f"decode tokens/s, batch {batch} (higher is better)",
                    f"perplexity vs decode speed, measured on {', '.join(devices)}",
                    maximize_x=True)


def _scatter(frame: pd.DataFrame, x_col: str, x_label: str, title: str,
             maximize_x: bool) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = [float(v) for v in frame[x_col]]
    y = [float(v) for v in frame["perplexity"]]
    names = list(frame["name"])
    front = pareto_front(x, y, maximize_x)
    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    others = [i for i in range(len(x)) if i not in front and not math.isnan(x[i])]
    if others:
        ax.scatter([x[i] for i in others], [y[i] for i in others], color="#8a8a8a", zorder=2,
                   label="dominated")
    ax.scatter([x[i] for i in front], [y[i] for i in front], color="#c0392b", zorder=3,
               label="Pareto front")
    # The front as a staircase: each step is the best perplexity reachable at that budget.
    ax.step([x[i] for i in front], [y[i] for i in front], where="post" if not maximize_x else "pre",
            color="#c0392b", alpha=0.6, zorder=1)
    if max(y) / min(y) > 1.5:
        # Perplexity is exp(NLL): a log axis keeps 12.4 vs 12.5 readable beside a 48.
        from matplotlib.ticker import LogLocator, ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter(useOffset=False))
        ax.yaxis.set_minor_locator(LogLocator(subs=()))
    _label(ax, fig, x, y, names)
    base = frame.index[frame["is_baseline"]]
    if len(base):
        ax.axhline(y[base[0]], color="#2c3e50", linestyle=":", linewidth=1, label="baseline")
    ax.set_xlabel(x_label)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    # No "Software" text chunk: the page that embeds the image should hold no URL at all.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


# Label offsets tried, in pixels from the point to the label's baseline: centred first, then
# alternately further down and up (labels are placed from the highest point down, so a lower
# point's label goes below the labels already there). Recipes of the same size and quality
# would otherwise print on top of each other.
LABEL_OFFSETS = (-6, *(-6 + sign * step for step in range(14, 224, 14) for sign in (-1, 1)))


def _label(ax, fig, x, y, names) -> None:
    """Name each point at the first offset whose box overlaps no label placed before. Higher
    points are placed first, so of two at one size the upper name stays above the lower one;
    a label moved off its point gets a leader line to it."""
    fig.canvas.draw()  # settle the axes limits, so data -> pixel transforms are final
    placed: list[tuple[float, float, float, float]] = []
    order = sorted((i for i in range(len(x)) if not math.isnan(x[i])),
                   key=lambda i: (x[i], -y[i]))
    for i in order:
        px, py = ax.transData.transform((x[i], y[i]))
        width, height = 6 * len(names[i]) + 4, 12  # 8 pt at 110 dpi
        for dy in LABEL_OFFSETS:
            box = (px + 5, py + dy, px + 5 + width, py + dy + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                       for b in placed):
                break
        placed.append(box)
        leader = None if dy == LABEL_OFFSETS[0] else \
            {"arrowstyle": "-", "lw": 0.5, "color": "#7f8c8d", "shrinkA": 0, "shrinkB": 3}
        ax.annotate(names[i], (x[i], y[i]), textcoords="offset pixels", xytext=(5, dy),
                    fontsize=8, arrowprops=leader)
