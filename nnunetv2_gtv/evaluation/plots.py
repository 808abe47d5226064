"""The evaluation's PNG plots, and the per-case overlay of CT, contours and entropy.

Figures are built with ``matplotlib.figure.Figure`` directly, which renders with the Agg canvas and never
touches pyplot's global backend, so no display is needed and an interactive session is left alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from nnunetv2_gtv.evaluation.folders import atomic_output
from nnunetv2_gtv.training.regions import array_axis_orientation

HU_WINDOW = (-200.0, 700.0)
FUSED_COLOUR = "red"
REFERENCE_COLOUR = "lime"
ENTROPY_CMAP = "plasma"
ENTROPY_ALPHA = 0.55
OVERLAY_DPI = 90
CROP_MARGIN_MM = 40.0


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


def _save(figure: Figure, path: Path, dpi: int = 120) -> None:
    if figure.get_layout_engine() is None:
        figure.tight_layout()
    with atomic_output(path) as tmp:
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


def vvc_plot(one_minus_dice: list[float], vvc: list[float], stats: dict, path: Path) -> None:
    """Scatter of VVC against 1 - Dice, with the correlation coefficients in the title."""
    figure, axes = _figure(5, 4)
    finite = [(x, y) for x, y in zip(one_minus_dice, vvc) if math.isfinite(x) and math.isfinite(y)]
    if not finite:
        _no_data(axes, "no VVC values")
    else:
        axes.scatter(*zip(*finite), color="tab:red")
        axes.set_xlabel("1 - Dice")
        axes.set_ylabel("VVC")
    axes.set_title(f"VVC vs 1 - Dice: Pearson r={stats['pearson_r']:.3f}, Spearman rho={stats['spearman_rho']:.3f}",
                   fontsize=9)
    _save(figure, path)


def box_plot(values_by_source: dict[str, list[float]], path: Path, ylabel: str, title: str,
             ylim: tuple[float, float] | None = None) -> None:
    """One box per source with its per-case values as points (non-finite values left out)."""
    figure, axes = _figure(max(4.0, 1.2 * len(values_by_source) + 2), 4)
    names = list(values_by_source)
    finite = {n: [v for v in values_by_source[n] if math.isfinite(v)] for n in names}
    axes.boxplot([finite[n] for n in names])
    axes.set_xticks(range(1, len(names) + 1), names)
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


# ---------------------------------------------------------------- per-case overlay


@dataclass(frozen=True)
class OverlayView:
    """One 2D view as drawn: rows top to bottom, columns left to right; ``aspect`` = row / column spacing."""

    name: str
    ct: np.ndarray
    fused: np.ndarray
    reference: np.ndarray
    entropy: np.ndarray | None
    aspect: float
    edges: tuple[str, str, str, str]  # anatomical side at the top, bottom, left and right edge


@dataclass(frozen=True)
class Overlay:
    """The views of one case; ``centre_ijk`` is the voxel they pass through, as (i, j, k) index of the file."""

    views: tuple[OverlayView, ...]
    centre_ijk: tuple[int, int, int]
    centred_on: str
    entropy_max: float | None  # None: no entropy map


def _centre(fused: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, str]:
    for mask, name in ((fused, "fused GTV"), (reference, "reference")):
        if mask.any():
            return np.rint(np.argwhere(mask).mean(axis=0)).astype(int), f"centre of the {name}"
    return np.array(fused.shape) // 2, "volume centre (both masks empty)"


def _crop(content: np.ndarray, spacing: Sequence[float]) -> tuple[slice, ...]:
    """Bounding box of ``content`` grown by CROP_MARGIN_MM on each side (the whole volume if it is empty)."""
    if not content.any():
        return tuple(slice(None) for _ in content.shape)
    box = []
    for axis, (n, step) in enumerate(zip(content.shape, spacing)):
        hits = np.flatnonzero(content.any(axis=tuple(a for a in range(content.ndim) if a != axis)))
        margin = math.ceil(CROP_MARGIN_MM / step)
        box.append(slice(max(0, hits[0] - margin), min(n, hits[-1] + 1 + margin)))
    return tuple(box)


def overlay_views(ct: np.ndarray, fused: np.ndarray, reference: np.ndarray, entropy: np.ndarray | None,
                  spacing_zyx: Sequence[float], direction: Sequence[float]) -> Overlay:
    """Axial and coronal planes through the fused GTV's centre (else the reference's, else the volume's).

    The (z, y, x) arrays are reordered to (superior, posterior, left) axes, each index increasing towards
    that side, using the file's direction; the planes are then cut in radiological convention: patient right
    on the image left, anterior up in the axial view and superior up in the coronal view. They are cropped to
    the masks and entropy > 0 plus CROP_MARGIN_MM.
    """
    orientation = array_axis_orientation(direction)
    order = [next(a for a, (world, _) in enumerate(orientation) if world == w) for w in (2, 1, 0)]
    flips = tuple(slice(None, None, orientation[a][1]) for a in order)
    spacing = [spacing_zyx[a] for a in order]

    def display(volume: np.ndarray) -> np.ndarray:
        return np.transpose(volume, order)[flips]

    centre, centred_on = _centre(display(fused), display(reference))
    content = fused | reference if entropy is None else fused | reference | (entropy > 0)
    crop = _crop(display(content), spacing)
    s, p, _ = (int(c) - (box.start or 0) for c, box in zip(centre, crop))
    cuts = (("axial", (s, slice(None), slice(None)), spacing[1] / spacing[2], ("A", "P", "R", "L")),
            ("coronal", (slice(None, None, -1), p, slice(None)), spacing[0] / spacing[2], ("S", "I", "R", "L")))
    volumes = [None if v is None else display(v)[crop] for v in (ct, fused, reference, entropy)]
    views = tuple(OverlayView(name, *(None if v is None else np.asarray(v[cut], dtype=np.float32) for v in volumes),
                              aspect, edges)
                  for name, cut, aspect, edges in cuts)
    centre_zyx = [0, 0, 0]
    for c, axis in zip(centre, order):
        centre_zyx[axis] = int(c) if orientation[axis][1] > 0 else fused.shape[axis] - 1 - int(c)
    entropy_max = None if entropy is None else float(np.max(entropy))
    return Overlay(views, tuple(centre_zyx[::-1]), centred_on, entropy_max)


def _draw_view(axes: Axes, view: OverlayView, entropy_max: float | None):
    """Draw one view; return the entropy image (for the colorbar) or None."""
    axes.imshow(view.ct, cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1], aspect=view.aspect)
    limits = axes.get_xlim(), axes.get_ylim()
    heat = None
    if view.entropy is not None and entropy_max:
        heat = axes.imshow(np.ma.masked_less_equal(view.entropy, 0), cmap=ENTROPY_CMAP, vmin=0, vmax=entropy_max,
                           alpha=ENTROPY_ALPHA, aspect=view.aspect, interpolation="nearest")
    for mask, colour, style in ((view.reference, REFERENCE_COLOUR, "--"), (view.fused, FUSED_COLOUR, "-")):
        if mask.any():
            axes.contour(mask, levels=[0.5], colors=colour, linestyles=style, linewidths=1.2)
    axes.set_xlim(*limits[0])
    axes.set_ylim(*limits[1])
    for text, (x, y) in zip(view.edges, ((0.5, 0.98), (0.5, 0.02), (0.02, 0.5), (0.98, 0.5))):
        axes.text(x, y, text, transform=axes.transAxes, color="yellow", fontsize=9, ha="center", va="center")
    axes.set_title(view.name, fontsize=10)
    axes.set_xticks([])
    axes.set_yticks([])
    return heat


def overlay_plot(case: str, overlay: Overlay, path: Path) -> None:
    """CT (window -200..700 HU), fused and reference contours and the entropy (where > 0) in each view."""
    figure = Figure(figsize=(4.2 * len(overlay.views) + 1.2, 4.8), layout="constrained")
    axes = figure.subplots(1, len(overlay.views))
    heats = [_draw_view(ax, view, overlay.entropy_max) for ax, view in zip(axes, overlay.views)]
    if heats[0] is not None:
        figure.colorbar(heats[0], ax=list(axes), shrink=0.8, label="entropy (nats), shown where > 0")
    handles = [Line2D([], [], color=FUSED_COLOUR, label="fused"),
               Line2D([], [], color=REFERENCE_COLOUR, linestyle="--", label="reference")]
    axes[0].legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.6)
    entropy = "no entropy map" if overlay.entropy_max is None else f"entropy max {overlay.entropy_max:.3f}"
    figure.suptitle(f"{case}: through the {overlay.centred_on}, voxel (i, j, k) = {overlay.centre_ijk}; "
                    f"{entropy}", fontsize=9)
    _save(figure, path, dpi=OVERLAY_DPI)


def attention_plot(ct: np.ndarray, segmentation: np.ndarray, attention: np.ndarray, aspect: float, title: str,
                   path: Path) -> None:
    """One axial slice: the CT, the CT with the segmentation's contour, the attention map as a heat map on it."""
    figure = Figure(figsize=(11, 4))
    axes = figure.subplots(1, 3)
    for ax, panel in zip(axes, ("CT", "segmentation", "attention")):
        ax.imshow(np.clip(ct, *HU_WINDOW), cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1], aspect=aspect)
        if panel == "attention":
            heat = ax.imshow(attention, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.5, aspect=aspect)
            figure.colorbar(heat, ax=ax, fraction=0.046, label="attention")
        if panel != "CT" and segmentation.any():
            ax.contour(segmentation.astype(float), levels=[0.5], colors=FUSED_COLOUR, linewidths=1.0)
        ax.set_title(panel)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(title, fontsize=9)
    _save(figure, path)
