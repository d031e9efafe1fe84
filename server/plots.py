"""PNG figures from the results database: accuracy over time, privacy spend, comparisons.

Figures are drawn with matplotlib's object API on an Agg canvas, so importing or
calling this module never selects a backend or touches pyplot's global figure
state (safe in servers, tests and threads). Empty input yields a figure with a
"no data" note rather than an exception, so a report is always complete.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from itertools import count, groupby
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from server.run_store import EvalRecord

__all__ = ["plot_accuracy_vs_time", "plot_comparison", "plot_epsilon_distribution"]

_FIGSIZE = (7.0, 4.5)
_DPI = 120
_SIM_TIME_LABEL = "simulated time (s)"


def _new_axes(title: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    # Attaching the Agg canvas explicitly keeps rendering independent of the
    # process-wide backend selection.
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if title:
        ax.set_title(title)
    return fig, ax


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=14, color="gray")


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_accuracy_vs_time(evals: Sequence[EvalRecord], path: Path, title: str = "") -> Path:
    """Plot NDCG@k and HR@k against simulated time.

    Full-ranking metrics are solid lines, the sampled-negatives protocol dashed
    lines of the same colour; each (split, k) present gets its own curves.

    Parameters
    ----------
    evals
        Evaluation records, in any order.
    path
        Output PNG file; parent directories are created.
    title
        Figure title.

    Returns
    -------
    Path
        ``path``.
    """
    fig, ax = _new_axes(title)
    ax.set_xlabel(_SIM_TIME_LABEL)
    ax.set_ylabel("metric value")
    if not evals:
        _no_data(ax)
        return _save(fig, path)

    def group_key(record: EvalRecord) -> tuple[str, int]:
        return record.split, record.k

    colours = (f"C{i}" for i in count())
    for (split, k), group in groupby(sorted(evals, key=group_key), key=group_key):
        records = sorted(group, key=lambda r: (r.sim_time, r.version))
        times = [r.sim_time for r in records]
        suffix = f" ({split})"
        for metric, full, sampled in (
            ("NDCG", [r.ndcg for r in records], [r.sampled_ndcg for r in records]),
            ("HR", [r.hr for r in records], [r.sampled_hr for r in records]),
        ):
            colour = next(colours)
            ax.plot(times, full, color=colour, marker=".", label=f"{metric}@{k}{suffix}")
            ax.plot(times, sampled, color=colour, linestyle="--", label=f"{metric}@{k} sampled{suffix}")
    ax.grid(alpha=0.3)
    # Outside the axes: up to four curves per (split, k) would hide the data.
    fig.legend(loc="outside right upper", fontsize="small")
    return _save(fig, path)


def plot_epsilon_distribution(
    epsilons: Sequence[float], path: Path, budget: float | None, delta: float, title: str = ""
) -> Path:
    """Histogram of per-device cumulative epsilon, with the budget and max/median marked.

    Parameters
    ----------
    epsilons
        One cumulative epsilon per device. Infinite values (no noise) cannot be
        binned; they are counted in the annotation instead.
    path
        Output PNG file; parent directories are created.
    budget
        Per-device epsilon budget drawn as a vertical line; None for no line.
    delta
        The delta all epsilons are stated at (shown in the axis label).
    title
        Figure title.

    Returns
    -------
    Path
        ``path``.
    """
    fig, ax = _new_axes(title)
    ax.set_xlabel(f"per-device cumulative ε at δ = {delta:g}")
    ax.set_ylabel(f"devices (n = {len(epsilons)})")
    # Histogram counts are whole devices.
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    # NaN is not a privacy guarantee; infinity (no noise) is, but cannot be binned.
    values = [float(e) for e in epsilons if not math.isnan(e)]
    finite = [e for e in values if math.isfinite(e)]
    if budget is not None and math.isfinite(budget):
        ax.axvline(budget, color="C3", linestyle="--", label=f"budget ε = {budget:g}")
    if not finite:
        _no_data(ax)
    else:
        ax.hist(finite, bins="auto", color="C0", edgecolor="white", label="devices")
        # Max and median over all devices, so an unbounded device shows up as ∞.
        for name, value, style in (
            ("median", statistics.median(values), "-."),
            ("max", max(values), ":"),
        ):
            label = f"{name} ε = {value:.3g}" if math.isfinite(value) else f"{name} ε = ∞"
            if math.isfinite(value):
                ax.axvline(value, color="black", linestyle=style, label=label)
            else:
                ax.plot([], [], " ", label=label)
        if len(finite) < len(values):
            ax.plot([], [], " ", label=f"devices with ε = ∞ (not binned): {len(values) - len(finite)}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small", framealpha=0.9)
    return _save(fig, path)


def plot_comparison(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: Path,
    ylabel: str,
    target: float | None = None,
    title: str = "",
) -> Path:
    """Plot several ``(sim_time, value)`` curves on one axis, e.g. async vs sync.

    Parameters
    ----------
    curves
        Curve label to its points; points are sorted by time before drawing.
    path
        Output PNG file; parent directories are created.
    ylabel
        Label of the value axis.
    target
        Value drawn as a horizontal dotted line (e.g. a target NDCG); None for none.
    title
        Figure title.

    Returns
    -------
    Path
        ``path``.
    """
    fig, ax = _new_axes(title)
    ax.set_xlabel(_SIM_TIME_LABEL)
    ax.set_ylabel(ylabel)
    drawn = False
    for label, points in curves.items():
        if not points:
            continue
        ordered = sorted(points)
        ax.plot([t for t, _ in ordered], [v for _, v in ordered], marker=".", label=label)
        drawn = True
    if target is not None:
        ax.axhline(target, color="gray", linestyle=":", label=f"target {target:g}")
    if not drawn:
        _no_data(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)
