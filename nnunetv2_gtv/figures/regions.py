"""The regions picture (``gtv-regions``): where the local, middle and global models sample, on axial, coronal and
sagittal views, with the body's area profile.

Input is either a CT file in Hounsfield units (anything SimpleITK reads), optionally with a label file, or an
nnU-Net preprocessed case (folder + case id; its cached regions are shown when present, so the picture is what the
trainers use). Views pass through the label's centre (else the volume centre) and are oriented by
:mod:`nnunetv2_gtv.figures.slices` (radiological convention, superior up, whatever the file's orientation).
"""
from __future__ import annotations

import io
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunetv2_gtv.io.atomic import write_file
from nnunetv2_gtv.figures.slices import VIEWS, DisplayFrame, View
from nnunetv2_gtv.training.regions import (
    BODY_THRESHOLD_HU, BONE_THRESHOLD_HU, CACHE_FOLDER, REGION_NAMES, CaseRegions, air_threshold_from_plans,
    anterior_axis_from_direction, body_threshold_from_plans, bone_threshold_from_plans, compute_regions,
    superior_axis_from_direction,
)

COLOURS = {"local": "#2ca02c", "middle": "#ff7f0e", "global": "#1f77b4"}
LABEL_COLOUR = "#d62728"
HU_WINDOW = (-250.0, 350.0)


class InputError(Exception):
    """Bad command-line input; the message names the file and the problem."""


@dataclass
class Case:
    name: str
    image: np.ndarray  # array axes as stored (z, y, x after nnU-Net's transpose)
    label: np.ndarray | None
    spacing: tuple[float, ...]
    direction: tuple[float, ...]
    transpose_forward: tuple[int, ...]
    window: tuple[float, float]
    regions: CaseRegions
    source: str


def _read_sitk(path: Path, what: str):
    import SimpleITK as sitk

    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"cannot read {what} file {path}: {str(error).strip().splitlines()[-1]}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} file {path} is not a 3D single-channel image "
                         f"(dimension {image.GetDimension()}, {image.GetNumberOfComponentsPerPixel()} components)")
    return image


def load_raw_case(image_path: Path, label_path: Path | None, threshold: float | None) -> Case:
    """A CT file in HU: regions are computed on its own grid, with the superior end taken from its direction."""
    import SimpleITK as sitk

    image = _read_sitk(image_path, "image")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    label = None
    if label_path is not None:
        label_image = _read_sitk(label_path, "label")
        label = sitk.GetArrayFromImage(label_image)
        if label.shape != array.shape:
            raise InputError(f"label file {label_path} has shape {label.shape}, image {image_path} has {array.shape}")
    spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
    direction = tuple(image.GetDirection())
    regions = compute_regions(array, spacing, *superior_axis_from_direction(direction),
                              BODY_THRESHOLD_HU if threshold is None else threshold,
                              bone_threshold=BONE_THRESHOLD_HU, anterior=anterior_axis_from_direction(direction),
                              air_threshold=BODY_THRESHOLD_HU)
    name = image_path.name.split(".")[0]
    return Case(name, array, label, spacing, direction, (0, 1, 2), HU_WINDOW, regions, "computed")


def _read_plans(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"plans file not found: {path}")
    try:
        plans = json.loads(path.read_text())
    except ValueError as error:
        raise InputError(f"plans file {path} is not valid JSON: {error}") from None
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise InputError(f"plans file {path} has no 'configurations'")
    return plans


def _find_plans(folder: Path) -> dict:
    """The plans file in the folder above whose configuration writes into ``folder``."""
    for candidate in sorted(folder.parent.glob("*.json")):
        try:
            plans = _read_plans(candidate)
        except InputError:
            continue
        if any(cfg.get("data_identifier") == folder.name for cfg in plans["configurations"].values()):
            return plans
    raise InputError(f"no plans file in {folder.parent} has a configuration with data_identifier {folder.name!r}; "
                     "pass --plans")


def _cached_regions(cache: Path, shape: Sequence[int]) -> CaseRegions | None:
    """The regions a trainer cached for this case, if readable and made for an image of this shape."""
    try:
        regions = CaseRegions.from_json(json.loads(cache.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return regions if regions.shape == tuple(shape) else None


def load_preprocessed_case(folder: Path, case: str, plans_path: Path | None, threshold: float | None) -> Case:
    """An nnU-Net preprocessed case. Unless a threshold is given, regions cached by a trainer win over a fresh
    computation, so the picture shows what the trainers use."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    if not folder.is_dir():
        raise InputError(f"preprocessed folder not found: {folder}")
    try:
        dataset_class = infer_dataset_class(str(folder))
    except Exception:  # nnU-Net raises a bare RuntimeError/AssertionError on folders without cases
        raise InputError(f"{folder} holds no nnU-Net preprocessed cases (.b2nd or .npz)") from None
    identifiers = dataset_class.get_identifiers(str(folder))
    if case not in identifiers:
        raise InputError(f"case {case!r} not in {folder}; cases there: {', '.join(sorted(identifiers)[:10])}"
                         f"{' ...' if len(identifiers) > 10 else ''}")
    plans = _read_plans(plans_path) if plans_path is not None else _find_plans(folder)
    data, seg, _, properties = dataset_class(str(folder), [case]).load_case(case)
    image = np.asarray(data[0], dtype=np.float32)
    label = (np.asarray(seg[0]) > 0).astype(np.uint8)
    transpose_forward = tuple(plans.get("transpose_forward", (0, 1, 2)))
    direction = tuple(properties["sitk_stuff"]["direction"])
    cache = folder / CACHE_FOLDER / f"{case}.json"
    regions = _cached_regions(cache, image.shape) if threshold is None else None
    if regions is not None:
        source = f"cached in {cache}"
    else:
        configuration = next((cfg for cfg in plans["configurations"].values()
                              if cfg.get("data_identifier") == folder.name), None)
        if configuration is None:
            raise InputError(f"plans have no configuration with data_identifier {folder.name!r}; pass --plans")
        if threshold is None:
            try:
                threshold = body_threshold_from_plans(plans)
            except ValueError as error:
                raise InputError(f"{error} (use --threshold)") from None
        regions = compute_regions(image, tuple(configuration["spacing"]),
                                  *superior_axis_from_direction(direction, transpose_forward), threshold,
                                  bone_threshold=bone_threshold_from_plans(plans),
                                  anterior=anterior_axis_from_direction(direction, transpose_forward),
                                  air_threshold=air_threshold_from_plans(plans))
        source = "computed"
    inside = image[image > regions.body_threshold]
    window = tuple(float(v) for v in np.percentile(inside, (1, 99))) if inside.size else (image.min(), image.max())
    return Case(case, image, label, regions.spacing, direction, transpose_forward, window, regions, source)


def _draw_view(ax, case: Case, frame: DisplayFrame, centre: Sequence[int], view: View) -> None:
    """One anatomical view through ``centre`` (array index) with the label outline and the three region boxes."""
    from matplotlib.patches import Rectangle

    shape = case.image.shape
    spacing = frame.spacing(case.spacing)
    display_centre = frame.display_index(centre, shape)
    ax.imshow(view.plane(frame.volume(case.image), display_centre[view.fixed]), cmap="gray", vmin=case.window[0],
              vmax=case.window[1], aspect=view.aspect(spacing), interpolation="nearest")
    if case.label is not None and case.label.any():
        ax.contour(view.plane(frame.volume(case.label > 0), display_centre[view.fixed]).astype(float), levels=[0.5],
                   colors=LABEL_COLOUR, linewidths=1.2)
    for name, width in zip(REGION_NAMES[::-1], (3.0, 2.2, 1.4)):  # outer first, so shared edges show both
        ranges = [frame.display_range(d, case.regions.boxes[name].ranges[frame.order[d]], shape) for d in range(3)]
        lo_r, hi_r = view.rows(ranges[view.row_axis], shape[frame.order[view.row_axis]])
        lo_c, hi_c = ranges[view.col_axis]
        cut = ranges[view.fixed][0] <= display_centre[view.fixed] < ranges[view.fixed][1]
        ax.add_patch(Rectangle((lo_c - 0.5, lo_r - 0.5), hi_c - lo_c, hi_r - lo_r, fill=False, lw=width,
                               ls="-" if cut else "--", edgecolor=COLOURS[name]))
    fixed = frame.order[view.fixed]
    ax.set_title(f"{view.name} (slice {centre[fixed]} of array axis {fixed})", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def render_png(case: Case, output: Path) -> None:
    """Write the figure to ``output`` (via a temporary file), palette-compressed to stay small."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from PIL import Image

    frame = DisplayFrame.from_direction(case.direction, case.transpose_forward)
    if case.label is not None and case.label.any():
        centre = [int(round(c)) for c in np.argwhere(case.label > 0).mean(axis=0)]
        where = "label centre"
    else:
        centre = [n // 2 for n in case.image.shape]
        where = "volume centre"
    fig, axes = plt.subplots(2, 2, figsize=(10, 9.5))
    for ax, view in zip(axes.flat, VIEWS):
        _draw_view(ax, case, frame, centre, view)
    _plot_profile(axes.flat[3], case.regions)
    handles = [Line2D([], [], color=COLOURS[n], lw=2,
                      label=f"{n}: " + " x ".join(f"{(hi - lo) * s:.0f}" for (lo, hi), s in
                                                  zip(case.regions.boxes[n].ranges, case.spacing)) + " mm")
               for n in REGION_NAMES]
    if case.label is not None:
        handles.append(Line2D([], [], color=LABEL_COLOUR, lw=1.2, label="label"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9, frameon=False)
    notes = [f"{case.name}: regions {case.source}; views through the {where}; region sizes along array axes "
             "0 x 1 x 2; dashed = region does not reach this slice; superior up, patient right on the image left"]
    notes += [f"warning: {w}" for w in case.regions.warnings]
    fig.text(0.01, 0.005, "\n".join(textwrap.fill(n, 160) for n in notes), fontsize=8, va="bottom")
    fig.tight_layout(rect=(0, 0.03 + 0.02 * len(notes), 1, 0.95))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    buffer.seek(0)
    palette = Image.open(buffer).convert("RGB").quantize(colors=96)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_file(output, lambda f: palette.save(f, format="PNG", optimize=True))


def _plot_profile(ax, regions: CaseRegions) -> None:
    """Body cross-section along the superior axis, superior at the top, with each region's inferior limit."""
    profile = np.asarray(regions.area_profile_mm2) / 100.0
    if regions.superior_is_high:
        profile = profile[::-1]
    n = len(profile)
    slice_mm = regions.spacing[regions.superior_axis]
    depth = np.arange(n) * slice_mm
    ax.plot(profile, depth, color="black", lw=1.2)

    for name in ("local", "middle"):
        lo, hi = regions.boxes[name].ranges[regions.superior_axis]
        end = n - lo if regions.superior_is_high else hi  # first slice below the region, counted from the top
        ax.axhline((end - 0.5) * slice_mm, color=COLOURS[name], lw=1.5, label=f"{name} ends")
    for level, style in (("neck", ":"), ("shoulders", "-."), ("mandible", "--"), ("lungs", (0, (1, 3)))):
        index = regions.levels.get(level)
        if index is not None:
            ax.axhline((n - 1 - index if regions.superior_is_high else index) * slice_mm, color="gray", ls=style,
                       lw=1, label=level)
    ax.set_ylim(depth[-1] + slice_mm, -slice_mm)
    ax.set_xlabel("body cross-section (cm²)")
    ax.set_ylabel("mm from the superior end")
    ax.set_title("area profile along the superior axis", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
