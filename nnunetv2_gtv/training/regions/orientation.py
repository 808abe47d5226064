"""Which array axis is superior (and anterior), from the image direction: never from the slice order."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _direction_matrix(direction: Sequence[float]) -> np.ndarray:
    matrix = np.asarray(direction, dtype=float)
    if matrix.size != 9:
        raise ValueError(f"expected a 3D direction with 9 entries, got {matrix.size}")
    return matrix.reshape(3, 3)


def superior_axis_from_direction(direction: Sequence[float], transpose_forward: Sequence[int] = (0, 1, 2)
                                 ) -> tuple[int, bool]:
    """(array axis closest to superior, whether superior is at the high index end of that axis).

    ``direction`` is SimpleITK's row-major 3x3 matrix in LPS; its column j is the world direction of image
    index j (i, j, k). A SimpleITK array is indexed (k, j, i) and nnU-Net then applies ``transpose_forward``,
    so array axis a is image index 2 - transpose_forward[a]. The superior axis is the one with the largest
    superior component.
    """
    superior_components = _direction_matrix(direction)[2]
    image_axis = int(np.argmax(np.abs(superior_components)))
    axis = list(transpose_forward).index(2 - image_axis)
    return axis, bool(superior_components[image_axis] > 0)


def array_axis_orientation(direction: Sequence[float], transpose_forward: Sequence[int] = (0, 1, 2)
                           ) -> list[tuple[int, int]]:
    """For each array axis, (world axis, sign) with LPS world axes 0 = left, 1 = posterior, 2 = superior.

    The superior axis is chosen as in :func:`superior_axis_from_direction`; the other two array axes get left
    and posterior, whichever assignment is better aligned, so every world axis is used once.
    """
    matrix = _direction_matrix(direction)
    columns = [matrix[:, 2 - int(a)] for a in transpose_forward]
    superior_axis, _ = superior_axis_from_direction(direction, transpose_forward)
    first, second = [a for a in range(3) if a != superior_axis]
    straight = abs(columns[first][0]) + abs(columns[second][1])
    crossed = abs(columns[first][1]) + abs(columns[second][0])
    world = {superior_axis: 2, first: 0 if straight >= crossed else 1, second: 1 if straight >= crossed else 0}
    return [(world[a], 1 if columns[a][world[a]] > 0 else -1) for a in range(3)]


def anterior_axis_from_direction(direction: Sequence[float], transpose_forward: Sequence[int] = (0, 1, 2)
                                 ) -> tuple[int, bool]:
    """(array axis closest to anterior-posterior, whether anterior is at the high index end of that axis)."""
    for axis, (world, sign) in enumerate(array_axis_orientation(direction, transpose_forward)):
        if world == 1:  # LPS: +1 = posterior
            return axis, sign < 0
    raise AssertionError("array_axis_orientation assigns every world axis")
