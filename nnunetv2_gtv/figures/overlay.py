"""gtv-evaluate's per-case overlay: CT, fused and reference contours and the entropy in axial and coronal views.

One foreground label: fused contour red, reference lime dashed. Several: each label in its colour
(:mod:`nnunetv2_gtv.label_colours`), fused solid, reference dashed.

Figures are built with ``matplotlib.figure.Figure`` directly, which renders with the Agg canvas and never
touches pyplot's global backend, so no display is needed and an interactive session is left alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from nnunetv2_gtv.io.atomic import atomic_path
from nnunetv2_gtv.figures.slices import AXIAL, CORONAL, DisplayFrame, crop_box
from nnunetv2_gtv.label_colours import label_colour_hex

HU_WINDOW = (-200.0, 700.0)
FUSED_COLOUR = "red"
REFERENCE_COLOUR = "lime"
ENTROPY_CMAP = "plasma"
ENTROPY_ALPHA = 0.55
OVERLAY_DPI = 90
CROP_MARGIN_MM = 40.0


@dataclass(frozen=True)
class OverlayView:
    """One 2D view as drawn: rows top to bottom, columns left to right; ``aspect`` = row / column spacing."""

    name: str
    ct: np.ndarray
    fused: np.ndarray  # label values (0 background)
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
    labels: dict[int, str] | None = None  # label value -> name; None: one label, drawn as "fused" / "reference"


def _centre(fused: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, str]:
    for mask, name in ((fused, "fused GTV"), (reference, "reference")):
        if mask.any():
            return np.rint(np.argwhere(mask).mean(axis=0)).astype(int), f"centre of the {name}"
    return np.array(fused.shape) // 2, "volume centre (both masks empty)"


def overlay_views(ct: np.ndarray, fused: np.ndarray, reference: np.ndarray, entropy: np.ndarray | None,
                  spacing_zyx: Sequence[float], direction: Sequence[float],
                  labels: Mapping[int, str] | None = None) -> Overlay:
    """Axial and coronal planes through the fused labels' centre (else the reference's, else the volume's),
    oriented by :mod:`nnunetv2_gtv.figures.slices` and cropped to the labels and entropy > 0 plus
    CROP_MARGIN_MM. ``fused`` and ``reference`` are masks or label maps; ``labels`` names the labels to draw when
    there are several."""
    frame = DisplayFrame.from_direction(direction)
    spacing = frame.spacing(spacing_zyx)
    fused, reference = np.asarray(fused).astype(np.uint16), np.asarray(reference).astype(np.uint16)
    centre, centred_on = _centre(frame.volume(fused > 0), frame.volume(reference > 0))
    content = (fused > 0) | (reference > 0) if entropy is None else (fused > 0) | (reference > 0) | (entropy > 0)
    crop = crop_box(frame.volume(content), spacing, CROP_MARGIN_MM)
    local = [int(c) - box.start for c, box in zip(centre, crop)]
    volumes = [None if v is None else frame.volume(v)[crop] for v in (ct, fused, reference, entropy)]
    views = tuple(OverlayView(view.name, *(None if v is None else np.asarray(view.plane(v, local[view.fixed]),
                                                                             dtype=np.float32) for v in volumes),
                              view.aspect(spacing), view.edges)
                  for view in (AXIAL, CORONAL))
    entropy_max = None if entropy is None else float(np.max(entropy))
    several = dict(labels) if labels is not None and len(labels) > 1 else None
    return Overlay(views, frame.array_index(centre, fused.shape)[::-1], centred_on, entropy_max, several)


def _contour_styles(labels: dict[int, str] | None) -> list[tuple[int, str, str, str]]:
    """(label, colour, line style, source) of each contour: reference first, so the fused one is drawn on top."""
    if labels is None:
        return [(-1, REFERENCE_COLOUR, "--", "reference"), (-1, FUSED_COLOUR, "-", "fused")]
    return ([(label, label_colour_hex(label), "--", "reference") for label in labels]
            + [(label, label_colour_hex(label), "-", "fused") for label in labels])


def _draw_view(axes: Axes, view: OverlayView, entropy_max: float | None, labels: dict[int, str] | None):
    """Draw one view; return the entropy image (for the colorbar) or None."""
    axes.imshow(view.ct, cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1], aspect=view.aspect)
    limits = axes.get_xlim(), axes.get_ylim()
    heat = None
    if view.entropy is not None and entropy_max:
        heat = axes.imshow(np.ma.masked_less_equal(view.entropy, 0), cmap=ENTROPY_CMAP, vmin=0, vmax=entropy_max,
                           alpha=ENTROPY_ALPHA, aspect=view.aspect, interpolation="nearest")
    for label, colour, style, source in _contour_styles(labels):
        plane = view.reference if source == "reference" else view.fused
        mask = plane > 0 if label < 0 else plane == label
        if mask.any():
            axes.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linestyles=style, linewidths=1.2)
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
    heats = [_draw_view(ax, view, overlay.entropy_max, overlay.labels) for ax, view in zip(axes, overlay.views)]
    if heats[0] is not None:
        figure.colorbar(heats[0], ax=list(axes), shrink=0.8, label="entropy (nats), shown where > 0")
    if overlay.labels is None:
        handles = [Line2D([], [], color=FUSED_COLOUR, label="fused"),
                   Line2D([], [], color=REFERENCE_COLOUR, linestyle="--", label="reference")]
    else:
        handles = [Line2D([], [], color=label_colour_hex(label), label=name) for label, name in overlay.labels.items()]
        handles.append(Line2D([], [], color="grey", linestyle="--", label="reference (dashed)"))
    axes[0].legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.6)
    entropy = "no entropy map" if overlay.entropy_max is None else f"entropy max {overlay.entropy_max:.3f}"
    figure.suptitle(f"{case}: through the {overlay.centred_on}, voxel (i, j, k) = {overlay.centre_ijk}; "
                    f"{entropy}", fontsize=9)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=OVERLAY_DPI)


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
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
