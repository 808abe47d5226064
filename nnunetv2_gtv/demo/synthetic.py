"""Synthetic head-and-neck CT volumes with a nasopharyngeal GTV, written as an nnU-Net v2 raw dataset.

The anatomy is defined in physical (LPS) coordinates, normalised to the scan's field of view, and then
sampled on each case's voxel grid. A case written with a flipped axis therefore shows the same anatomy
in the world, only stored in another voxel order, which is what orientation handling has to cope with.

Along the superior axis (LPS +z) the scan holds, from bottom to top: shoulders, neck, head. The head has
a skull shell, the neck a spine and an airway that widens into the nasopharynx; the GTV (label 1) is a
low-contrast tumour of realistic size (5-60 ml) and irregular outline on the posterior-lateral nasopharynx wall,
invading the airway and the neighbouring soft tissue; unlabeled GTV-like nodes sit lower in the neck. With
``nodes=True`` the primary becomes GTVp (label 1) and 1-4 metastatic lymph nodes (GTVnd, label 2; 10-24 mm across)
sit in the upper and middle neck, lateral to the airway, as SegRap2023 labels them. With ``contrast=True`` every
case has two co-registered CTs, as SegRap2023 provides them: a plain CT (channel 0, ``CT``) on which tumour and nodes
are iso-dense with the soft tissue around them (invisible but for their shape in the airway), and a
contrast-enhanced CT (channel 1, ``CT_contrast``) on which they enhance, as do the carotid arteries. The anatomy
scales with the field of view, the tumour does not (it is sized in mm): use a realistic field of view (about
200-250 mm, e.g. ``--size 128 --in-plane-mm 1.6 1.9``) for realistic proportions.

Run ``gtv-synthetic --help`` (or ``python -m nnunetv2_gtv.demo.synthetic --help``).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_gtv.dataset_conversion.staging import existing_datasets
from nnunetv2_gtv.io.atomic import staged_folder

# HU values of the tissues
AIR_HU = -1000.0
FAT_HU = -90.0
SOFT_TISSUE_HU = 40.0
GTV_HU = 65.0
ENHANCING_GTV_HU = 110.0  # tumour and nodes on the contrast-enhanced CT
ARTERY_HU = 300.0  # carotid arteries on the contrast-enhanced CT
BONE_HU = 1100.0
SPINE_HU = 700.0
NOISE_SD_HU = 12.0

# Range (ml) of the GTV volumes drawn by tumour_volume_ml
TUMOUR_VOLUME_ML = (5.0, 60.0)
NODE_DIAMETER_MM = (10.0, 24.0)
NODE_COUNT = (1, 4)
BINARY_LABELS = {"background": 0, "GTV": 1}
CONTRAST_CHANNELS = {0: "CT", 1: "CT_contrast"}
NODE_LABELS = {"background": 0, "GTVp": 1, "GTVnd": 2}

# Fractions of the superior-inferior extent (0 = bottom slice, 1 = top slice) where regions begin.
NECK_START = 0.28
HEAD_START = 0.58

ORIENTATIONS = {
    "identity": (1, 1, 1),
    "flip_superior": (1, 1, -1),
    "flip_inplane": (-1, -1, 1),
}


@dataclass(frozen=True)
class CaseGeometry:
    """Grid of one case: array shape (z, y, x), spacing (x, y, z) in mm, axis signs of a diagonal direction."""

    shape_zyx: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    axis_signs_xyz: tuple[int, int, int] = (1, 1, 1)

    @property
    def direction(self) -> tuple[float, ...]:
        sx, sy, sz = self.axis_signs_xyz
        return (float(sx), 0.0, 0.0, 0.0, float(sy), 0.0, 0.0, 0.0, float(sz))

    @property
    def origin(self) -> tuple[float, float, float]:
        """Origin that puts the centre of the volume at the world origin."""
        size_xyz = self.shape_zyx[::-1]
        return tuple(-s * (n - 1) * sp / 2 for s, n, sp in zip(self.axis_signs_xyz, size_xyz, self.spacing_xyz))

    def world_axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World coordinate (mm) of every index along x, y and z (the direction is diagonal)."""
        size_xyz = self.shape_zyx[::-1]
        return tuple(
            o + s * np.arange(n) * sp
            for o, s, n, sp in zip(self.origin, self.axis_signs_xyz, size_xyz, self.spacing_xyz)
        )


def _ellipse(x: np.ndarray, y: np.ndarray, cx, cy, rx, ry) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def tumour_volume_ml(rng: np.random.Generator) -> float:
    """Target GTV volume: log-uniform between 5 and 60 ml, the range of most primary NPC GTVs."""
    return float(np.exp(rng.uniform(np.log(TUMOUR_VOLUME_ML[0]), np.log(TUMOUR_VOLUME_ML[1]))))


def render_tumour(wx: np.ndarray, wy: np.ndarray, wz: np.ndarray, centre_mm: tuple[float, float, float],
                  side: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean (z, y, x) mask of an irregular tumour in physical size around ``centre_mm`` (world x, y, z).

    A main ellipsoid of random anisotropy whose surface is modulated by low-frequency random waves (an
    irregular outline), plus two or three lobes reaching into the neighbours of the nasopharynx: forward
    into the airway, up towards the skull base, sideways into the parapharyngeal space (towards ``side``) or
    back towards the prevertebral muscles. The volume is set by :func:`tumour_volume_ml` before the lobes and
    the clipping to soft tissue, so the rendered volume scatters around it (documented in docs/synthetic.md).
    """
    dx = (wx - centre_mm[0])[None, None, :]
    dy = (wy - centre_mm[1])[None, :, None]
    dz = (wz - centre_mm[2])[:, None, None]
    radius = (3 * tumour_volume_ml(rng) * 1000 / (4 * np.pi)) ** (1 / 3)  # mm, sphere of the target volume
    stretch = np.exp(rng.normal(0, 0.15, size=3))
    stretch[2] *= 0.85  # a little flatter along z than in-plane, as NPC GTVs on 3 mm CT
    ax, ay, az = radius * stretch / np.prod(stretch) ** (1 / 3)
    distance = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2 + (dz / az) ** 2)
    waves = np.zeros(np.broadcast_shapes(dx.shape, dy.shape, dz.shape), dtype=np.float32)
    for _ in range(4):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        wavelength = radius * rng.uniform(1.2, 2.5)
        phase = rng.uniform(0, 2 * np.pi)
        waves += np.cos(2 * np.pi * (direction[0] * dx + direction[1] * dy + direction[2] * dz) / wavelength + phase)
    mask = distance <= 1.0 + 0.08 * waves
    lobe_directions = {"airway": (0.0, -1.0, 0.2), "skull base": (0.0, 0.1, 1.0),
                       "parapharyngeal": (side, 0.2, 0.0), "prevertebral": (0.0, 1.0, -0.3)}
    for name in rng.choice(list(lobe_directions), size=int(rng.integers(2, 4)), replace=False):
        direction = np.asarray(lobe_directions[name]) / np.linalg.norm(lobe_directions[name])
        offset = direction * radius * rng.uniform(0.7, 1.0)
        lobe_radius = radius * rng.uniform(0.35, 0.55)
        mask |= ((dx - offset[0]) ** 2 + (dy - offset[1]) ** 2 + (dz - offset[2]) ** 2) <= lobe_radius ** 2
    return mask


def render_nodes(u: np.ndarray, v: np.ndarray, s: np.ndarray, wx: np.ndarray, wy: np.ndarray, wz: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """Boolean (z, y, x) mask of 1-4 round lymph nodes (10-24 mm across) in the upper and middle neck, left or
    right of the airway and anterior-lateral to the spine (levels II-III)."""
    mask = np.zeros(u.shape, dtype=bool)
    half_x, half_y = (wx.max() - wx.min()) / 2 + 1e-6, (wy.max() - wy.min()) / 2 + 1e-6
    z_lo, z_hi = wz.min(), wz.max()
    for _ in range(int(rng.integers(NODE_COUNT[0], NODE_COUNT[1] + 1))):
        centre = (rng.choice([-1.0, 1.0]) * rng.uniform(0.14, 0.24) * half_x, rng.uniform(0.0, 0.18) * half_y,
                  z_lo + rng.uniform(NECK_START + 0.08, HEAD_START - 0.03) * (z_hi - z_lo))
        radius = rng.uniform(*NODE_DIAMETER_MM) / 2 * np.exp(rng.normal(0, 0.1, size=3))
        mask |= (((wx[None, None, :] - centre[0]) / radius[0]) ** 2 + ((wy[None, :, None] - centre[1]) / radius[1]) ** 2
                 + ((wz[:, None, None] - centre[2]) / radius[2]) ** 2) <= 1
    return mask


@dataclass
class _Anatomy:
    """A case before noise: HU image, label, and the voxels that enhance with contrast."""

    image: np.ndarray  # float32 HU, noise-free; tumour and nodes at GTV_HU
    label: np.ndarray
    gtv_like: np.ndarray  # tumour, labelled and unlabelled nodes
    arteries: np.ndarray


def render_case(geometry: CaseGeometry, rng: np.random.Generator, nodes: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """Return (image in HU as int16, label as uint8), both as (z, y, x) arrays on ``geometry``'s grid; with
    ``nodes`` the label holds GTVp (1) and GTVnd (2)."""
    anatomy = _render_anatomy(geometry, rng, nodes)
    return _with_noise(anatomy.image, rng), anatomy.label


def render_contrast_case(geometry: CaseGeometry, rng: np.random.Generator, nodes: bool = False
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (plain CT, contrast-enhanced CT, label) on ``geometry``'s grid: on the plain CT tumour and nodes have
    the soft tissue's HU, on the contrast CT they and the carotid arteries enhance; each CT has its own noise."""
    anatomy = _render_anatomy(geometry, rng, nodes)
    plain = anatomy.image.copy()
    plain[anatomy.gtv_like] = SOFT_TISSUE_HU
    enhanced = anatomy.image.copy()
    enhanced[anatomy.gtv_like] = ENHANCING_GTV_HU
    enhanced[anatomy.arteries] = ARTERY_HU
    return _with_noise(plain, rng), _with_noise(enhanced, rng), anatomy.label


def _with_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = image + rng.normal(0, NOISE_SD_HU, size=image.shape).astype(np.float32)
    return np.clip(np.round(noisy), -1024, 3071).astype(np.int16)


def _render_anatomy(geometry: CaseGeometry, rng: np.random.Generator, nodes: bool) -> _Anatomy:
    wx, wy, wz = geometry.world_axes()
    half_x = (wx.max() - wx.min()) / 2 + 1e-6
    half_y = (wy.max() - wy.min()) / 2 + 1e-6
    z_lo, z_hi = wz.min(), wz.max()
    # normalised coordinates: u (left-right) and v (posterior +) in [-1, 1], s (superior) in [0, 1]
    u = (wx / half_x)[None, None, :]
    v = (wy / half_y)[None, :, None]
    s = ((wz - z_lo) / max(z_hi - z_lo, 1e-6))[:, None, None]
    shape = geometry.shape_zyx
    u, v, s = np.broadcast_arrays(u, v, s)

    # a little per-case anatomical variation
    jitter = lambda scale: 1.0 + scale * rng.uniform(-1, 1)  # noqa: E731
    head_rx, head_ry = 0.62 * jitter(0.06), 0.78 * jitter(0.06)
    neck_r = 0.36 * jitter(0.08)
    shoulder_rx, shoulder_ry = 0.95, 0.62 * jitter(0.05)

    in_shoulders = s < NECK_START
    in_neck = (s >= NECK_START) & (s < HEAD_START)
    in_head = s >= HEAD_START
    # the head rounds off towards the vertex
    vertex = np.clip((s - 0.88) / 0.12, 0, 1)
    head_scale = np.sqrt(np.clip(1 - vertex**2, 0.05, 1))

    body = np.zeros(shape, dtype=bool)
    body |= in_shoulders & _ellipse(u, v, 0, 0.05, shoulder_rx, shoulder_ry)
    body |= in_neck & _ellipse(u, v, 0, 0.1, neck_r, neck_r * 1.1)
    body |= in_head & _ellipse(u, v, 0, 0, head_rx * head_scale, head_ry * head_scale)

    image = np.full(shape, AIR_HU, dtype=np.float32)
    image[body] = SOFT_TISSUE_HU
    # subcutaneous fat: the outer rim of the body
    inner = np.zeros(shape, dtype=bool)
    inner |= in_shoulders & _ellipse(u, v, 0, 0.05, shoulder_rx - 0.06, shoulder_ry - 0.06)
    inner |= in_neck & _ellipse(u, v, 0, 0.1, neck_r - 0.05, neck_r * 1.1 - 0.05)
    inner |= in_head & _ellipse(u, v, 0, 0, head_rx * head_scale - 0.05, head_ry * head_scale - 0.05)
    image[body & ~inner] = FAT_HU

    # skull: a bone shell inside the head
    skull_outer = in_head & _ellipse(u, v, 0, 0, head_rx * head_scale - 0.06, head_ry * head_scale - 0.06)
    skull_inner = _ellipse(u, v, 0, 0, head_rx * head_scale - 0.14, head_ry * head_scale - 0.14)
    image[skull_outer & ~skull_inner & (s > HEAD_START + 0.08)] = BONE_HU
    # spine: posterior column through shoulders and neck up to the skull base
    spine = (s < HEAD_START + 0.06) & _ellipse(u, v, 0, 0.42, 0.11, 0.11)
    image[spine & body] = SPINE_HU
    # airway: anterior to the spine in the neck, widening into the nasopharynx in the lower head
    airway = (s >= NECK_START - 0.05) & (s < HEAD_START) & _ellipse(u, v, 0, 0.05, 0.08, 0.07)
    nasopharynx_band = (s >= HEAD_START) & (s < HEAD_START + 0.14)
    nasopharynx = nasopharynx_band & _ellipse(u, v, 0, -0.02, 0.17, 0.11)
    nasal_cavity = (s >= HEAD_START + 0.04) & (s < HEAD_START + 0.2) & _ellipse(u, v, 0, -0.3, 0.1, 0.18)
    image[airway | nasopharynx | nasal_cavity] = AIR_HU

    # GTV: an irregular tumour of realistic volume on the posterior-lateral nasopharynx wall (see render_tumour)
    side = rng.choice([-1.0, 1.0])
    centre = (side * rng.uniform(0.04, 0.1) * half_x, (0.1 + rng.uniform(-0.01, 0.02)) * half_y,
              z_lo + (HEAD_START + 0.09) * (z_hi - z_lo))
    gtv = render_tumour(wx, wy, wz, centre, side, rng)
    gtv &= body & (image < SPINE_HU)  # grows into the airway and soft tissue, not into bone
    image[gtv] = GTV_HU

    # GTV-like lymph nodes in the neck, not labelled
    gtv_like = gtv.copy()
    for _ in range(2):
        centre = (rng.uniform(-0.25, 0.25), rng.uniform(-0.05, 0.2), rng.uniform(NECK_START + 0.04, HEAD_START - 0.06))
        node = (((u - centre[0]) / 0.07) ** 2 + ((v - centre[1]) / 0.07) ** 2 + ((s - centre[2]) / 0.05) ** 2) <= 1
        node &= body & (image == SOFT_TISSUE_HU)
        image[node] = GTV_HU
        gtv_like |= node

    label = gtv.astype(np.uint8)
    if nodes:
        node = render_nodes(u, v, s, wx, wy, wz, rng) & body & (image < SPINE_HU) & (image > AIR_HU) & ~gtv
        image[node] = GTV_HU
        label[node] = 2
        gtv_like |= node
    # carotid arteries: left and right of the airway from the shoulders to the skull base (no random draw)
    arteries = (s < HEAD_START + 0.04) & body & (image == SOFT_TISSUE_HU) & (
        _ellipse(u, v, -0.2, 0.08, 0.035, 0.035) | _ellipse(u, v, 0.2, 0.08, 0.035, 0.035))
    return _Anatomy(image, label, gtv_like, arteries)


def random_geometry(rng: np.random.Generator, in_plane_size: int, num_slices: int, orientation: str,
                    in_plane_mm: tuple[float, float] = (0.8, 1.2),
                    slice_mm: tuple[float, float] = (2.5, 3.5)) -> CaseGeometry:
    """Per-case anisotropic spacing drawn uniformly from the given ranges (default: in-plane 0.8-1.2 mm, slices
    2.5-3.5 mm)."""
    in_plane = float(np.round(rng.uniform(*in_plane_mm), 3))
    slice_thickness = float(np.round(rng.uniform(*slice_mm), 2))
    n_slices = max(8, int(round(num_slices * rng.uniform(0.9, 1.1))))
    return CaseGeometry((n_slices, in_plane_size, in_plane_size), (in_plane, in_plane, slice_thickness),
                        ORIENTATIONS[orientation])


def to_sitk_image(array: np.ndarray, geometry: CaseGeometry) -> sitk.Image:
    """``array`` (z, y, x) as a SimpleITK image with the case's spacing, origin and direction."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(geometry.spacing_xyz)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    return img


def reversed_slice_order(image: sitk.Image) -> sitk.Image:
    """The same physical image stored with the slice order reversed: array reversed along z, the z direction
    negated, the origin moved to the former last slice (how orientation handling is checked)."""
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[::-1])
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetOrigin(image.TransformIndexToPhysicalPoint((0, 0, image.GetSize()[2] - 1)))
    flipped.SetDirection(tuple((direction * [1, 1, -1]).reshape(-1)))
    return flipped


def _orientation_plan(n_cases: int, mode: str) -> list[str]:
    if mode == "identity":
        return ["identity"] * n_cases
    cycle = list(ORIENTATIONS)
    return [cycle[i % len(cycle)] for i in range(n_cases)]


def write_dataset(
    raw_dir: str | os.PathLike,
    dataset_id: int,
    name: str = "SyntheticGTV",
    num_train: int = 8,
    num_test: int = 2,
    in_plane_size: int = 96,
    num_slices: int = 40,
    seed: int = 0,
    orientations: str = "identity",
    overwrite: bool = False,
    in_plane_mm: tuple[float, float] = (0.8, 1.2),
    slice_mm: tuple[float, float] = (2.5, 3.5),
    nodes: bool = False,
    contrast: bool = False,
) -> Path:
    """Write ``<raw_dir>/DatasetXXX_<name>`` and return its path.

    The dataset is assembled in a temporary folder next to the target and renamed into place, so a
    crash never leaves a half-written dataset. ``orientations="mixed"`` cycles identity, flipped superior
    axis and flipped in-plane axes over the cases. ``nodes``: labels GTVp and GTVnd; ``contrast``: a plain and a
    contrast-enhanced CT per case, ``<case>_0000`` and ``<case>_0001`` (see the module docstring).
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be between 1 and 999, got {dataset_id}")
    if num_train < 1:
        raise ValueError("num_train must be at least 1")
    raw_dir = Path(raw_dir)
    target = raw_dir / f"Dataset{dataset_id:03d}_{name}"
    existing = existing_datasets(raw_dir, dataset_id)
    if any(p.is_dir() and any(p.iterdir()) for p in existing) and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists and is not empty; pass --overwrite to replace it (dataset id {dataset_id})"
        )
    rng = np.random.default_rng(seed)
    with staged_folder(target, existing) as staging:
        splits = [("Tr", f"case_{i:03d}") for i in range(num_train)]
        splits += [("Ts", f"case_{num_train + i:03d}") for i in range(num_test)]
        for (split, case), orientation in zip(splits, _orientation_plan(len(splits), orientations)):
            geometry = random_geometry(rng, in_plane_size, num_slices, orientation, in_plane_mm, slice_mm)
            *channels, label = (render_contrast_case(geometry, rng, nodes) if contrast
                                else render_case(geometry, rng, nodes))
            (staging / f"images{split}").mkdir(exist_ok=True)
            (staging / f"labels{split}").mkdir(exist_ok=True)
            for channel, image in enumerate(channels):
                sitk.WriteImage(to_sitk_image(image, geometry),
                                str(staging / f"images{split}" / f"{case}_{channel:04d}.nii.gz"))
            sitk.WriteImage(to_sitk_image(label, geometry), str(staging / f"labels{split}" / f"{case}.nii.gz"))
        generate_dataset_json(
            str(staging), channel_names=CONTRAST_CHANNELS if contrast else {0: "CT"},
            labels=NODE_LABELS if nodes else BINARY_LABELS,
            num_training_cases=num_train, file_ending=".nii.gz", dataset_name=target.name,
            description="Synthetic head-and-neck CT with a nasopharyngeal GTV" + (" and nodal GTVs" if nodes else "")
                        + (", plain and contrast-enhanced CT" if contrast else "") + " (nnunetv2_gtv.demo.synthetic)",
            seed=seed, orientations=orientations,
        )
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gtv-synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", default=os.environ.get("nnUNet_raw"),
                        help="nnU-Net raw folder to write into (default: $nnUNet_raw)")
    parser.add_argument("-d", "--dataset-id", type=int, default=990)
    parser.add_argument("-n", "--name", default="SyntheticGTV")
    parser.add_argument("--num-train", type=int, default=8)
    parser.add_argument("--num-test", type=int, default=2, help="cases written to imagesTs/labelsTs")
    parser.add_argument("--size", type=int, default=96, help="in-plane size in voxels (up to 512)")
    parser.add_argument("--slices", type=int, default=40, help="approximate number of slices (varies by 10 %%)")
    parser.add_argument("--in-plane-mm", type=float, nargs=2, default=(0.8, 1.2), metavar=("MIN", "MAX"),
                        help="range of the in-plane spacing (mm), drawn per case; size x spacing is the field of view")
    parser.add_argument("--slice-mm", type=float, nargs=2, default=(2.5, 3.5), metavar=("MIN", "MAX"),
                        help="range of the slice spacing (mm), drawn per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--orientations", choices=["identity", "mixed"], default="identity",
                        help="mixed: cycle identity, flipped superior axis and flipped in-plane axes")
    parser.add_argument("--nodes", action="store_true",
                        help="also draw 1-4 metastatic lymph nodes in the upper and middle neck: labels GTVp (1) and "
                             "GTVnd (2), as SegRap2023")
    parser.add_argument("--contrast", action="store_true",
                        help="two CTs per case, as SegRap2023: a plain CT (channel 0) on which the tumour is iso-dense "
                             "and a contrast-enhanced CT (channel 1) on which it enhances")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    args = parser.parse_args(argv)
    if not args.output:
        parser.error("no output folder: pass -o or set nnUNet_raw")
    try:
        path = write_dataset(args.output, args.dataset_id, args.name, args.num_train, args.num_test, args.size,
                             args.slices, args.seed, args.orientations, args.overwrite, tuple(args.in_plane_mm),
                             tuple(args.slice_mm), args.nodes, args.contrast)
    except (FileExistsError, ValueError) as err:
        print(f"gtv-synthetic: error: {err}", file=sys.stderr)
        return 2
    print(f"gtv-synthetic: wrote {args.num_train} training and {args.num_test} test cases to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
