"""FID plots of an evaluation grid (Nichol & Dhariwal 2021, fig. 8 style): against steps and against skipping.

One line per checkpoint x sampler: the colour is the checkpoint, the dash the sampler, so a linear and a
cosine model read side by side. Each plot has one panel per value of the variable it holds fixed. Drawn on
a bare Agg canvas, never through pyplot, so no global backend or figure state is touched and nothing needs
a display.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

Series = dict[tuple[str, str], list[tuple[float, float]]]
_DASHES = {"ddpm": "-", "ddim": "--"}


def fid_series(rows: Sequence[dict[str, Any]], x: str, panel: str) -> dict[Any, Series]:
    """{panel value: {(label, sampler): [(x, fid), ...] sorted by x}}, in the order values first appear."""
    panels: dict[Any, Series] = {}
    for row in rows:
        line = panels.setdefault(row[panel], {}).setdefault((row["label"], row["sampler"]), [])
        line.append((float(row[x]), float(row["fid"])))
    for series in panels.values():
        for line in series.values():
            line.sort()
    return dict(sorted(panels.items()))


def _draw(panels: dict[Any, Series], path: Union[str, Path], xlabel: str, title: str, log_x: bool) -> Path:
    labels = list(dict.fromkeys(label for series in panels.values() for label, _ in series))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (value, series) in enumerate(panels.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        for (label, sampler), points in series.items():
            xs, fids = zip(*points)
            axes.plot(xs, fids, _DASHES.get(sampler, ":"), marker="o", color=colours[label], label=f"{label} {sampler}")
        if log_x:
            # Ticks at the evaluated step counts, written as plain numbers rather than 10^k.
            steps = sorted({x for points in series.values() for x, _ in points})
            axes.set_xscale("log")
            axes.set_xticks(steps, [f"{x:g}" for x in steps])
            axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set(xlabel=xlabel, ylabel="FID", title=title.format(value))
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


def plot_fid_vs_steps(rows: Sequence[dict[str, Any]], path: Union[str, Path]) -> Path:
    """FID against sampling steps (log x), one panel per skip fraction."""
    return _draw(fid_series(rows, "steps", "skip_fraction"), path, "sampling steps", "skip fraction {}", log_x=True)


def plot_fid_vs_skip(rows: Sequence[dict[str, Any]], path: Union[str, Path]) -> Path:
    """FID against the fraction of noisiest steps skipped, one panel per step count."""
    return _draw(fid_series(rows, "skip_fraction", "steps"), path, "skip fraction", "{} sampling steps", log_x=False)
