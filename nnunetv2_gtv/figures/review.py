"""The review page (``gtv-review``): which cases a clinician should check, and where, from the fused outputs alone.

Reads what gtv-uncertainty and gtv-predict write (``summary.json``, ``<case>``, ``<case>_entropy``) and,
optionally, the CTs, and writes one HTML file that works offline from disk: plain HTML and JavaScript, every
image embedded as a PNG data URI (a browser lets a page read pixels of embedded images, not of files beside a
page opened from disk). Per case only the box around the fused GTV plus ``REVIEW_MARGIN_MM`` is kept (around
the uncertain voxels when the GTV is empty), oriented by :mod:`nnunetv2_gtv.figures.slices` into
(superior, posterior, left) display axes and stored as three mosaics of axial slices: CT in a soft-tissue
window, entropy codes and the fused labels (one outline colour per label, with a legend). The page cuts axial,
coronal and sagittal planes from them.

A case that cannot be shown (segmentation or entropy map missing or unreadable, a map or CT on another grid)
stays in the table, marked, with the message naming the file.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image
from scipy import ndimage

from nnunetv2_gtv.io.atomic import check_writable, write_text
from nnunetv2_gtv.evaluation.folders import (
    SUPPORTED_ENDINGS, EvaluationInputError, check_same_grid, find_image, read_summary_json, read_volume,
)
from nnunetv2_gtv.figures.overlay import ENTROPY_ALPHA, ENTROPY_CMAP
from nnunetv2_gtv.figures.slices import DisplayFrame, colour_table, compose_rgb, crop_box, window_to_uint8
from nnunetv2_gtv.label_colours import label_colour, label_colour_hex

PAGE_NAME = "review.html"
DEFAULT_ENDING = ".nii.gz"  # tried first; every ending of SUPPORTED_ENDINGS is accepted
REVIEW_MARGIN_MM = 30.0
SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # level 40 HU, width 400 HU
ENTROPY_DECIMALS = 4  # levels as in gtv-evaluate's error-rate table
THUMBNAIL_WIDTH_PX = 112
MAX_PLANE_VOXELS = 256  # in-plane size of the stored box; larger boxes are subsampled
IJK = "kji"  # file index letter of array axis 0, 1, 2 (SimpleITK arrays are (k, j, i))


class ReviewInputError(ValueError):
    """The fused folder cannot be reviewed at all (no summary.json, no images); the message names the file."""


@dataclass
class CaseReview:
    """One row of the page: the summary row, and either the case's pictures or the reason it is broken."""

    case: str
    row: dict
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    view: dict | None = None  # what the viewer needs (mosaics, grid, start slices, level counts, thumbnail)

    @property
    def priority(self) -> tuple:
        """Sort key: flagged first, then the run's review rank (``review_rank``, by the run's review score);
        summaries written before ranking existed: the highest VVC of the case and its labels descending (cases
        without VVC last); then name."""
        if isinstance(self.row.get("review_rank"), int):
            return (not self.row.get("review"), False, float(self.row["review_rank"]), self.case)
        values = [v for key, v in self.row.items() if (key == "vvc" or key.startswith("vvc_"))
                  and not key.startswith("vvc_models") and isinstance(v, (int, float)) and not isinstance(v, bool)]
        vvc = max(values) if values else None
        return (not self.row.get("review"), vvc is None, -(vvc or 0.0), self.case)


def _png_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def mosaic(volume: np.ndarray, columns: int) -> np.ndarray:
    """The slices ``volume[s]`` tiled row by row, ``columns`` per row (the page reads them back the same way)."""
    slices, height, width = volume.shape
    rows = math.ceil(slices / columns)
    tiles = np.zeros((rows * columns, height, width), volume.dtype)
    tiles[:slices] = volume
    return tiles.reshape(rows, columns, height, width).transpose(0, 2, 1, 3).reshape(rows * height, columns * width)


def level_counts(entropy: np.ndarray, gtv: np.ndarray) -> list[dict]:
    """Voxels per entropy level (rounded to ENTROPY_DECIMALS) inside the GTV (its interior: the GTV less its
    surface voxels), at its border (the voxels within one voxel of its surface, on either side) and in the
    whole viewed box. Border is found with 6-connectivity."""
    interior = ndimage.binary_erosion(gtv)
    border = ndimage.binary_dilation(gtv) & ~interior
    levels, codes = np.unique(np.round(entropy.astype(np.float64), ENTROPY_DECIMALS),
                                return_inverse=True)
    codes = codes.ravel()
    counts = [np.bincount(codes[mask.ravel()], minlength=len(levels)) for mask in (interior, border)]
    everywhere = np.bincount(codes, minlength=len(levels))
    return [{"entropy": float(level), "inside": int(counts[0][i]), "border": int(counts[1][i]),
             "box": int(everywhere[i])} for i, level in enumerate(levels)]


def start_slices(gtv: np.ndarray, uncertain: np.ndarray) -> list[int]:
    """Per display axis, the slice with the most uncertain GTV voxels (else the most GTV voxels, else the middle)."""
    start = []
    for axis, n in enumerate(gtv.shape):
        others = tuple(a for a in range(3) if a != axis)
        for mask in (gtv & uncertain, gtv):
            per_slice = mask.sum(axis=others)
            if per_slice.any():
                start.append(int(np.argmax(per_slice)))
                break
        else:
            start.append(n // 2)
    return start


def case_view(ct: np.ndarray | None, labels: np.ndarray, entropy: np.ndarray, spacing_zyx: tuple[float, ...],
              direction: tuple[float, ...]) -> dict:
    """The viewer's data for one case from (z, y, x) arrays of the file (``labels``: the fused labels, or a mask)
    and its direction."""
    frame = DisplayFrame.from_direction(direction)
    spacing = list(frame.spacing(spacing_zyx))
    label_display = frame.volume(np.asarray(labels).astype(np.uint8))
    gtv_display, entropy_display = label_display > 0, frame.volume(entropy)
    cropped_to = "fused GTV" if gtv_display.any() else "entropy > 0" if (entropy_display > 0).any() else "none"
    crop = crop_box(gtv_display if gtv_display.any() else entropy_display > 0, spacing, REVIEW_MARGIN_MM)
    box_gtv = np.ascontiguousarray(gtv_display[crop])
    box_labels = np.ascontiguousarray(label_display[crop])
    box_entropy = np.ascontiguousarray(entropy_display[crop], dtype=np.float32)
    levels, start = level_counts(box_entropy, box_gtv), start_slices(box_gtv, box_entropy > 0)
    # a box wider than MAX_PLANE_VOXELS (a GTV spread over the image) is shown at every step-th voxel in-plane
    step = max(1, math.ceil(max(box_gtv.shape[1:]) / MAX_PLANE_VOXELS))
    thin = (slice(None), slice(None, None, step), slice(None, None, step))
    box_gtv, box_labels, box_entropy = box_gtv[thin], box_labels[thin], box_entropy[thin]
    start = [start[0], start[1] // step, start[2] // step]
    spacing[1:] = [s * step for s in spacing[1:]]
    scale = float(box_entropy.max())
    codes = np.zeros(box_entropy.shape, np.uint8)
    if scale > 0:
        codes = np.clip(np.rint(box_entropy * (255.0 / scale)), 1, 255).astype(np.uint8) * (box_entropy > 0)
    grey = None if ct is None else window_to_uint8(frame.volume(ct)[crop][thin], SOFT_TISSUE_WINDOW)
    slices, rows, cols = box_gtv.shape
    columns = max(1, round(math.sqrt(slices * rows / cols)))
    present = [int(v) for v in np.unique(box_labels) if v > 0]
    thumb = compose_rgb(np.zeros((rows, cols), np.uint8) if grey is None else grey[start[0]], codes[start[0]],
                        colour_table(ENTROPY_CMAP), ENTROPY_ALPHA, box_labels[start[0]],
                        {value: label_colour(value) for value in present})
    thumb_size = (THUMBNAIL_WIDTH_PX, max(1, round(THUMBNAIL_WIDTH_PX * rows * spacing[1] / (cols * spacing[2]))))
    return {
        "shape": [slices, rows, cols], "spacing": spacing, "columns": columns, "step": step,
        "ct": None if grey is None else _png_uri(mosaic(grey, columns)),
        "entropy": _png_uri(mosaic(codes, columns)), "gtv": _png_uri(mosaic(box_labels, columns)),
        "labels_present": present,
        "entropy_scale": scale, "entropy_max": float(np.max(entropy)), "start": start, "levels": levels,
        "cropped_to": cropped_to,
        "thumbnail": _png_uri(np.asarray(Image.fromarray(thumb).resize(thumb_size, Image.LANCZOS))),
        # file index of display slice t along display axis d: offset + t * step, reversed when sign < 0
        "file_axes": [{"letter": IJK[a], "offset": crop[d].start, "step": 1 if d == 0 else step,
                       "sign": frame.signs[d], "n": labels.shape[a]} for d, a in enumerate(frame.order)],
    }


def _load_case(fused_dir: Path, case: str, ct_path: Path | None) -> dict:
    """Read and check one case's files (any supported ending); raises EvaluationInputError naming the file."""
    seg_path = find_image(fused_dir, case, DEFAULT_ENDING)
    if seg_path is None:
        raise EvaluationInputError(f"{fused_dir / (case + DEFAULT_ENDING)}: fused segmentation not found "
                                   f"(nor with another ending: {', '.join(SUPPORTED_ENDINGS)})")
    ending = next(e for e in SUPPORTED_ENDINGS if seg_path.name.endswith(e))
    entropy_path = fused_dir / f"{case}_entropy{ending}"
    if not entropy_path.is_file():
        raise EvaluationInputError(f"{entropy_path}: entropy map not found")
    fused = read_volume(seg_path)
    entropy = read_volume(entropy_path)
    check_same_grid(entropy, fused)
    ct = None
    if ct_path is not None:
        ct = read_volume(ct_path)
        check_same_grid(ct, fused)
    return case_view(None if ct is None else ct.array, fused.array, entropy.array, fused.spacing_zyx,
                     fused.direction)


def ct_files(images_dir: Path, cases: list[str]) -> dict[str, Path]:
    """``<case>_0000<ending>`` (nnU-Net naming), else ``<case><ending>``, any supported ending, for each case
    found in ``images_dir``."""
    if not images_dir.is_dir():
        raise ReviewInputError(f"{images_dir}: CT images folder does not exist")
    found = {}
    for case in cases:
        path = find_image(images_dir, f"{case}_0000", DEFAULT_ENDING) or find_image(images_dir, case, DEFAULT_ENDING)
        if path is not None:
            found[case] = path
    return found


def read_cases(fused_dir: Path) -> tuple[list[dict], dict]:
    """(summary rows, summary.json header) of a fused folder; ReviewInputError when unusable."""
    summary_path = fused_dir / "summary.json"
    if not fused_dir.is_dir():
        raise ReviewInputError(f"{fused_dir}: fused output folder does not exist")
    if not summary_path.is_file():
        raise ReviewInputError(f"{summary_path}: not found; gtv-review reads the summary that gtv-uncertainty or "
                               "gtv-predict writes into their output folder")
    try:
        summary = read_summary_json(fused_dir)
    except EvaluationInputError as error:
        raise ReviewInputError(str(error)) from None
    rows = summary.get("cases") if isinstance(summary, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "case" in r for r in rows):
        raise ReviewInputError(f"{summary_path}: has no list of 'cases' with a 'case' name each")
    if not rows:
        raise ReviewInputError(f"{summary_path}: lists no cases")
    return rows, {k: v for k, v in summary.items() if k != "cases"}


def review_cases(fused_dir: Path, images: Mapping[str, Path] | Path | None = None) -> tuple[list[CaseReview], dict]:
    """Every case of ``fused_dir/summary.json`` in review priority, each with its viewer data or its error."""
    fused_dir = Path(fused_dir)
    rows, header = read_cases(fused_dir)
    if isinstance(images, Path):
        images = ct_files(images, [str(row["case"]) for row in rows])
    reviews = []
    for row in rows:
        review = CaseReview(str(row["case"]), row)
        ct_path = None if images is None else images.get(review.case)
        if images is not None and ct_path is None:
            review.notes.append("no CT image for this case; shown without CT")
        try:
            review.view = _load_case(fused_dir, review.case, ct_path)
        except (EvaluationInputError, OSError) as error:
            review.error = str(error)
        reviews.append(review)
    return sorted(reviews, key=lambda r: r.priority), header


def page_labels(reviews: list[CaseReview], header: dict) -> list[dict]:
    """Value, name and colour of each foreground label: named by summary.json's ``label_names`` (gtv-predict,
    gtv-uncertainty), else ``label_<value>`` for each value the cases hold (``GTV`` when it is 1 alone)."""
    names = header.get("label_names")
    if not (isinstance(names, list) and len(names) >= 2):
        found = sorted({v for r in reviews if r.view for v in r.view["labels_present"]}) or [1]
        names = ["background"] + (["GTV"] if found == [1] else [f"label_{v}" for v in range(1, max(found) + 1)])
    return [{"value": value, "name": str(name), "colour": label_colour_hex(value)}
            for value, name in enumerate(names) if value > 0]


def page_html(reviews: list[CaseReview], header: dict, title: str) -> str:
    """The whole page: template, style sheet, script and the cases as JSON."""
    data = {
        "title": title,
        "command": header.get("command"),
        "vvc_threshold": (header.get("settings") or {}).get("vvc_threshold"),
        "review": header.get("review"),
        "window_hu": SOFT_TISSUE_WINDOW,
        "margin_mm": REVIEW_MARGIN_MM,
        "entropy_alpha": ENTROPY_ALPHA,
        "entropy_colours": colour_table(ENTROPY_CMAP).tolist(),
        "labels": page_labels(reviews, header),
        "cases": [{"case": r.case, "row": r.row, "error": r.error, "notes": r.notes, "view": r.view}
                  for r in reviews],
    }
    assets = resources.files("nnunetv2_gtv.figures")
    payload = json.dumps(data, allow_nan=False).replace("</", "<\\/")
    return (assets.joinpath("review_page.html").read_text()
            .replace("/*STYLE*/", assets.joinpath("review_page.css").read_text())
            .replace("/*SCRIPT*/", assets.joinpath("review_page.js").read_text())
            .replace("{{TITLE}}", html.escape(title))
            .replace("{{DATA}}", payload))


def write_review(fused_dir: Path, output_dir: Path, images: Mapping[str, Path] | Path | None = None
                 ) -> tuple[Path, list[CaseReview]]:
    """Write ``output_dir/review.html`` (atomically) and return it with the reviewed cases."""
    fused_dir, output_dir = Path(fused_dir), Path(output_dir)
    reviews, header = review_cases(fused_dir, images)
    check_writable(output_dir)
    page = page_html(reviews, header, f"GTV review: {fused_dir.resolve().name}")
    return write_text(page, output_dir / PAGE_NAME), reviews
