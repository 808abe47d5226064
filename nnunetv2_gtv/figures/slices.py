"""Orienting and rendering slices: the one place that knows how a file's array maps onto the patient.

Every picture of the package (the regions picture, the evaluation overlays, the review page) reorders a volume
into *display axes* (superior, posterior, left), each index increasing towards that side, whatever the file's
direction or nnU-Net's ``transpose_forward``; a :class:`View` then cuts planes in radiological convention:
patient right on the image left, anterior up in the axial view, superior up in the coronal and sagittal views
(anterior on the left of the sagittal view).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from nnunetv2_gtv.training.regions import array_axis_orientation

SUPERIOR, POSTERIOR, LEFT = 0, 1, 2  # display axes
WORLD_OF_DISPLAY = (2, 1, 0)  # LPS world axis (0 left, 1 posterior, 2 superior) of each display axis


@dataclass(frozen=True)
class DisplayFrame:
    """``order[d]``: the array axis shown along display axis d; ``signs[d]``: +1 if that array index already
    increases towards the display side, -1 if it must be reversed."""

    order: tuple[int, int, int]
    signs: tuple[int, int, int]

    @classmethod
    def from_direction(cls, direction: Sequence[float], transpose_forward: Sequence[int] = (0, 1, 2)
                       ) -> "DisplayFrame":
        """The frame of an array read by SimpleITK (direction = ``GetDirection()``), after ``transpose_forward``."""
        orientation = array_axis_orientation(direction, transpose_forward)
        order = tuple(next(a for a, (world, _) in enumerate(orientation) if world == w) for w in WORLD_OF_DISPLAY)
        return cls(order, tuple(orientation[a][1] for a in order))

    def volume(self, array: np.ndarray) -> np.ndarray:
        """``array`` as a (superior, posterior, left) view (no copy)."""
        return np.transpose(array, self.order)[tuple(slice(None, None, s) for s in self.signs)]

    def spacing(self, spacing_of_array_axes: Sequence[float]) -> tuple[float, float, float]:
        """Voxel size in mm along the display axes."""
        return tuple(float(spacing_of_array_axes[a]) for a in self.order)

    def array_index(self, display_index: Sequence[int], array_shape: Sequence[int]) -> tuple[int, int, int]:
        """The array index (in array axis order) of a voxel given by its display index."""
        index = [0, 0, 0]
        for d, (axis, sign) in enumerate(zip(self.order, self.signs)):
            index[axis] = int(display_index[d]) if sign > 0 else array_shape[axis] - 1 - int(display_index[d])
        return tuple(index)

    def display_index(self, array_index: Sequence[int], array_shape: Sequence[int]) -> tuple[int, int, int]:
        """The display index of a voxel given by its array index (the inverse of :meth:`array_index`)."""
        return tuple(int(array_index[a]) if s > 0 else array_shape[a] - 1 - int(array_index[a])
                     for a, s in zip(self.order, self.signs))

    def display_range(self, display_axis: int, array_range: tuple[int, int], array_shape: Sequence[int]
                      ) -> tuple[int, int]:
        """A half-open index range along array axis ``order[display_axis]`` in display indices."""
        lo, hi = array_range
        n = array_shape[self.order[display_axis]]
        return (lo, hi) if self.signs[display_axis] > 0 else (n - hi, n - lo)


@dataclass(frozen=True)
class View:
    """A plane orientation: display axis ``fixed`` is cut; rows run along ``row_axis`` (reversed when
    ``row_reversed``), columns along ``col_axis``; ``edges``: the patient side at the top, bottom, left, right."""

    name: str
    fixed: int
    row_axis: int
    row_reversed: bool
    col_axis: int
    edges: tuple[str, str, str, str]

    def plane(self, volume: np.ndarray, index: int) -> np.ndarray:
        """Slice ``index`` of a display volume, rows top to bottom and columns left to right."""
        plane = np.take(volume, index, axis=self.fixed)  # remaining axes keep their order: row_axis < col_axis
        return plane[::-1] if self.row_reversed else plane

    def aspect(self, display_spacing: Sequence[float]) -> float:
        """Height / width of one pixel of the plane in mm (matplotlib's ``aspect``)."""
        return display_spacing[self.row_axis] / display_spacing[self.col_axis]

    def rows(self, display_range: tuple[int, int], n: int) -> tuple[int, int]:
        """A display index range along ``row_axis`` as a half-open range of plane rows."""
        return (n - display_range[1], n - display_range[0]) if self.row_reversed else display_range


AXIAL = View("axial", SUPERIOR, POSTERIOR, False, LEFT, ("A", "P", "R", "L"))
CORONAL = View("coronal", POSTERIOR, SUPERIOR, True, LEFT, ("S", "I", "R", "L"))
SAGITTAL = View("sagittal", LEFT, SUPERIOR, True, POSTERIOR, ("S", "I", "A", "P"))
VIEWS = (AXIAL, CORONAL, SAGITTAL)


def crop_box(content: np.ndarray, spacing: Sequence[float], margin_mm: float) -> tuple[slice, ...]:
    """Bounding box of ``content`` grown by ``margin_mm`` on each side, clipped to the volume (all of it when
    ``content`` is empty)."""
    if not content.any():
        return tuple(slice(0, n) for n in content.shape)
    box = []
    for axis, (n, step) in enumerate(zip(content.shape, spacing)):
        hits = np.flatnonzero(content.any(axis=tuple(a for a in range(content.ndim) if a != axis)))
        margin = math.ceil(margin_mm / step)
        box.append(slice(max(0, int(hits[0]) - margin), min(n, int(hits[-1]) + 1 + margin)))
    return tuple(box)


def window_to_uint8(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Grey values 0..255 of ``values`` in the intensity ``window`` (clipped outside it)."""
    low, high = window
    scaled = (np.asarray(values, dtype=np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def colour_table(cmap: str) -> np.ndarray:
    """(256, 3) uint8 RGB of a matplotlib colour map, so that Python pictures and the page share colours."""
    from matplotlib import colormaps

    return np.rint(colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask that touch a pixel outside it (4-neighbourhood; the image border counts as outside)."""
    padded = np.pad(np.asarray(mask, bool), 1)
    inner = padded[1:-1, 1:-1]
    return inner & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])


def compose_rgb(grey: np.ndarray, heat_codes: np.ndarray | None, heat_table: np.ndarray, heat_alpha: float,
                labels: np.ndarray | None, colours: Mapping[int, tuple[int, int, int]]) -> np.ndarray:
    """An RGB picture of one plane: grey values, a heat map blended where its code is > 0, and the outline of each
    label of ``labels`` in its colour of ``colours``.

    ``grey`` and ``heat_codes`` are uint8 planes (codes index ``heat_table``)."""
    rgb = np.repeat(np.asarray(grey, np.float32)[..., None], 3, axis=2)
    if heat_codes is not None:
        hot = heat_codes > 0
        rgb[hot] = (1 - heat_alpha) * rgb[hot] + heat_alpha * heat_table[heat_codes[hot]]
    if labels is not None:
        for value, colour in colours.items():
            rgb[outline(labels == value)] = colour
    return np.rint(rgb).astype(np.uint8)
