"""The evaluation's PNG plots (the per-case overlay of CT, contours and entropy is in ``overlay``).

Figures are built with ``matplotlib.figure.Figure`` directly, which renders with the Agg canvas and never
touches pyplot's global backend, so no display is needed and an interactive session is left alone.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nnunetv2_gtv.io.atomic import atomic_path


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


def _save(figure: Figure, path: Path, dpi: int = 120) -> None:
    if figure.get_layout_engine() is None:
        figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)


def _no_data(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])


def error_rate_plot(levels: list[float], per_case: dict[str, list[float]], mean: list[float], path: Path) -> None:
    """Bars: mean error rate (%) over cases per entropy level; grey lines: the individual cases."""
    figure, axes = _figure(6, 4)
    if not levels:
        _no_data(axes, "no entropy maps")
    else:
        x = np.arange(1, len(levels) + 1)
        axes.bar(x, np.nan_to_num(mean), color="tab:blue", alpha=0.6, label="mean over cases")
        for rates in per_case.values():
            axes.plot(x, rates, color="grey", marker="o", markersize=3, linewidth=0.8, alpha=0.7)
        axes.set_xticks(x, [f"level {i}\nH={level:.3f}" for i, level in zip(x, levels)])
        axes.set_ylabel("pixel error rate (%)")
        axes.legend()
    axes.set_title("Error rate per uncertainty level")
    _save(figure, path)


def vvc_plot(one_minus_dice: list[float], vvc: list[float], stats: dict, path: Path, label: str | None = None
             ) -> None:
    """Scatter of VVC against 1 - Dice, with the correlation coefficients in the title (``label``: whose)."""
    figure, axes = _figure(5, 4)
    finite = [(x, y) for x, y in zip(one_minus_dice, vvc) if math.isfinite(x) and math.isfinite(y)]
    if not finite:
        _no_data(axes, "no VVC values")
    else:
        axes.scatter(*zip(*finite), color="tab:red")
        axes.set_xlabel("1 - Dice")
        axes.set_ylabel("VVC")
    axes.set_title(f"{label + ': ' if label else ''}VVC vs 1 - Dice: Pearson r={stats['pearson_r']:.3f}, "
                   f"Spearman rho={stats['spearman_rho']:.3f}", fontsize=9)
    _save(figure, path)


def box_plot(values_by_source: dict[str, list[float]], path: Path, ylabel: str, title: str,
             ylim: tuple[float, float] | None = None) -> None:
    """One box per source with its per-case values as points (non-finite values left out)."""
    figure, axes = _figure(max(4.0, 1.2 * len(values_by_source) + 2), 4)
    names = list(values_by_source)
    finite = {n: [v for v in values_by_source[n] if math.isfinite(v)] for n in names}
    axes.boxplot([finite[n] for n in names])
    axes.set_xticks(range(1, len(names) + 1), [textwrap.fill(n, 16) for n in names])  # long names: lines
    for i, name in enumerate(names, start=1):
        values = finite[name]
        axes.scatter(np.full(len(values), i) + np.linspace(-0.08, 0.08, len(values)), values, s=12, color="k", zorder=3)
    axes.set_ylabel(ylabel)
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.set_title(title)
    _save(figure, path)


def dice_box_plot(dice_by_source: dict[str, list[float]], path: Path) -> None:
    """One box per source (fused, model_1, ...) with the per-case Dice values as points."""
    box_plot(dice_by_source, path, "Dice", "Dice per case", (-0.02, 1.02))


def learning_curve_plot(curves: dict[str, dict[int, list[float]]], path: Path, title: str) -> None:
    """Mean Dice (line) and the per-case spread (25th-75th percentile band) against training iterations, one line
    per model; ``curves[model][iteration]`` holds the per-case Dice values of that snapshot."""
    figure, axes = _figure(6, 4)
    if not curves:
        _no_data(axes, "no snapshots")
    for name, by_iteration in curves.items():
        iterations = sorted(by_iteration)
        values = [np.asarray(by_iteration[i], dtype=float) for i in iterations]
        line, = axes.plot(iterations, [v.mean() for v in values], marker="o", label=name)
        axes.fill_between(iterations, [np.percentile(v, 25) for v in values], [np.percentile(v, 75) for v in values],
                          color=line.get_color(), alpha=0.15)
    axes.set_xlabel("training iterations")
    axes.set_ylabel("Dice on held-out cases")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    if curves:
        axes.legend()
    axes.set_title(title, fontsize=9)
    _save(figure, path)
