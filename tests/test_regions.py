"""Anatomy-based sampling regions: orientation, detection on synthetic and real CT, cache, coverage, gtv-regions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunetv2_gtv.cli import regions_png
from nnunetv2_gtv.demo.synthetic import HEAD_START, NECK_START, ORIENTATIONS, CaseGeometry, render_case
from nnunetv2_gtv.training import regions as reg
from nnunetv2_gtv.training.regions import (
    Box, CaseRegions, RegionSettings, array_axis_orientation, body_threshold_from_plans, compute_regions,
    detect_levels, label_coverage_by_label, label_coverage_report, load_or_compute_regions,
    superior_axis_from_direction,
)

SLICE_MM = 3.0
SHAPE = (40, 96, 96)
PLANS = {
    "transpose_forward": [0, 1, 2],
    "foreground_intensity_properties_per_channel": {
        "0": {"mean": 50.0, "std": 250.0, "percentile_00_5": -200.0, "percentile_99_5": 700.0}},
    "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "spacing": [SLICE_MM, 1.0, 1.0],
                                      "normalization_schemes": ["CTNormalization"]}},
}


def synthetic(orientation: str = "identity", seed: int = 0, shape=SHAPE):
    """(image in HU, label, geometry, superior fraction s of every array slice along axis 0)."""
    geometry = CaseGeometry(shape, (1.0, 1.0, SLICE_MM), ORIENTATIONS[orientation])
    image, label = render_case(geometry, np.random.default_rng(seed))
    wz = geometry.world_axes()[2]
    return image, label, geometry, (wz - wz.min()) / (wz.max() - wz.min())


def regions_of(image, geometry, **settings) -> CaseRegions:
    return compute_regions(image, (SLICE_MM, 1.0, 1.0), *superior_axis_from_direction(geometry.direction), -150.0,
                           RegionSettings(**settings))


def assert_nested(regions: CaseRegions, shape) -> None:
    boxes = regions.boxes
    assert boxes["global"] == Box.full(shape)
    assert boxes["global"].contains(boxes["middle"]) and boxes["middle"].contains(boxes["local"])


# ---------------------------------------------------------------- orientation


def test_superior_axis_follows_the_direction():
    assert superior_axis_from_direction((1, 0, 0, 0, 1, 0, 0, 0, 1)) == (0, True)
    assert superior_axis_from_direction((1, 0, 0, 0, 1, 0, 0, 0, -1)) == (0, False)
    # image index i runs superior (sagittal stack): the last array axis, or the first after transposing (2, 1, 0)
    sagittal = (0, 1, 0, 0, 0, 1, 1, 0, 0)
    assert superior_axis_from_direction(sagittal) == (2, True)
    assert superior_axis_from_direction(sagittal, (2, 1, 0)) == (0, True)
    # oblique: tilted 30 degrees about left-right, superior still mostly along k but pointing down
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    assert superior_axis_from_direction((1, 0, 0, 0, c, s, 0, s, -c)) == (0, False)
    with pytest.raises(ValueError, match="9 entries"):
        superior_axis_from_direction((1, 0, 0, 1))


def test_array_axis_orientation_maps_every_world_axis_once():
    assert array_axis_orientation(CaseGeometry(SHAPE, (1, 1, 3), ORIENTATIONS["flip_inplane"]).direction) == [
        (2, 1), (1, -1), (0, -1)]
    sagittal = (0, 1, 0, 0, 0, 1, 1, 0, 0)  # i -> S, j -> L, k -> P
    assert array_axis_orientation(sagittal) == [(1, 1), (0, 1), (2, 1)]


# ---------------------------------------------------------------- synthetic anatomy


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_synthetic_regions_follow_the_anatomy_in_every_orientation(orientation):
    image, label, geometry, s = synthetic(orientation, seed=list(ORIENTATIONS).index(orientation))
    regions = regions_of(image, geometry)
    assert_nested(regions, image.shape)
    assert regions.warnings == ()
    local, middle = regions.boxes["local"], regions.boxes["middle"]
    # local holds the whole GTV on the nasopharynx wall, and every head slice (the nasopharynx is the lowest ones)
    assert label[local.slices].sum() == label.sum() > 0
    in_local = np.zeros(len(s), bool)
    in_local[slice(*local.ranges[0])] = True
    assert in_local[s >= HEAD_START].all()
    head_voxels = np.argwhere((image > -150) & (s >= HEAD_START)[:, None, None])
    assert all(lo <= head_voxels[:, a].min() and head_voxels[:, a].max() < hi
               for a, (lo, hi) in enumerate(local.ranges) if a > 0)
    # ... but not the lower neck: it ends within the margin (plus a slice) below the head
    extent_mm = (len(s) - 1) * SLICE_MM
    assert s[in_local].min() >= HEAD_START - (RegionSettings().z_margin_mm + SLICE_MM) / extent_mm
    # middle holds head and neck, no shoulder slice
    in_middle = np.zeros(len(s), bool)
    in_middle[slice(*middle.ranges[0])] = True
    assert in_middle[s >= NECK_START].all()
    assert not in_middle[s < NECK_START].any()
    assert s[regions.levels["shoulders"]] < NECK_START <= s[regions.levels["neck"]] < HEAD_START


def test_regions_move_with_the_superior_axis():
    image, _, geometry, _ = synthetic()
    upright = regions_of(image, geometry)
    lying = compute_regions(np.moveaxis(image, 0, 2), (1.0, 1.0, SLICE_MM), 2, True, -150.0)
    for name in reg.REGION_NAMES:
        z, y, x = upright.boxes[name].ranges
        assert lying.boxes[name].ranges == (y, x, z)
    assert lying.levels == upright.levels


def test_raised_arms_are_ignored():
    image, label, geometry, s = synthetic(seed=4)
    plain = regions_of(image, geometry)
    n_x = image.shape[2]
    u = np.linspace(-1, 1, n_x)
    arms = (np.abs(np.abs(u) - 0.86) < 0.08)[None, None, :] & (np.abs(np.linspace(-1, 1, image.shape[1])) < 0.1)[
        None, :, None] & (s > 0.15)[:, None, None]
    image = np.where(arms, 40, image).astype(image.dtype)
    regions = regions_of(image, geometry)
    assert_nested(regions, image.shape)
    assert regions.boxes["local"] == plain.boxes["local"] and regions.boxes["middle"] == plain.boxes["middle"]
    arm_columns = np.nonzero(arms[slice(*regions.boxes["local"].ranges[0])].any(axis=(0, 1)))[0]
    lo, hi = regions.boxes["local"].ranges[2]
    assert arm_columns.min() < lo and arm_columns.max() >= hi  # had the arms counted, the box would be wider


def test_thin_couch_touching_the_head_is_ignored():
    image, _, geometry, _ = synthetic(seed=6)
    plain = regions_of(image, geometry)
    back = int(np.nonzero((image > -150).any(axis=(0, 2)))[0].max())  # most posterior body row (head)
    with_couch = image.copy()
    with_couch[:, back + 1:back + 3, :] = 200  # a 2 mm shell over the whole width and length, touching the head
    regions = regions_of(with_couch, geometry)
    for name, box in regions.boxes.items():
        (z, y, x), (pz, py, px) = box.ranges, plain.boxes[name].ranges
        assert z == pz and x == px and abs(y[0] - py[0]) + abs(y[1] - py[1]) <= 3  # at most the contact point
    assert regions_of(with_couch, geometry, opening_mm=0).boxes["local"].ranges[2] == (0, image.shape[2])


@pytest.mark.parametrize("keep_from, warning", [(HEAD_START + 0.02, "no neck"), (NECK_START + 0.1, "no shoulders")])
def test_cropped_scans_fall_back_with_a_warning(keep_from, warning):
    image, label, geometry, s = synthetic(seed=2)
    keep = s >= keep_from
    cropped = image[keep]
    regions = regions_of(cropped, geometry)
    assert any(warning in w for w in regions.warnings), regions.warnings
    assert_nested(regions, cropped.shape)
    assert regions.boxes["middle"].ranges[0] == (0, cropped.shape[0])  # middle falls back to the whole body
    assert label[keep][regions.boxes["local"].slices].sum() == label[keep].sum()
    if warning == "no neck":
        assert regions.boxes["local"] == regions.boxes["middle"]
    else:  # local still stops in the neck
        assert s[keep][slice(*regions.boxes["local"].ranges[0])].min() > keep_from + 0.05


def test_wrong_direction_is_flagged():
    image, _, geometry, _ = synthetic()
    regions = compute_regions(image, (SLICE_MM, 1.0, 1.0), 0, False, -150.0)  # truth: superior at high index
    assert any("upside down" in w for w in regions.warnings)
    assert_nested(regions, image.shape)


@pytest.mark.parametrize("profile", [np.zeros(30), np.linspace(1, 100, 30), np.full(30, 50.0), np.array([5.0])])
def test_profiles_without_a_narrowing_have_no_neck(profile):
    levels = detect_levels(profile, 3.0)
    assert levels.neck is None and levels.head_end is None and levels.shoulders is None and levels.warnings


def test_noisy_profiles_never_crash():
    for seed in range(20):
        profile = np.random.default_rng(seed).uniform(0, 100, 40)
        levels = detect_levels(profile, 3.0)
        if levels.neck is None:  # no neck found: always said, never a silent whole-image region
            assert levels.warnings
        else:
            assert levels.head_end <= levels.neck and (levels.shoulders is None or levels.shoulders > levels.neck)


def test_empty_image_gives_whole_image_regions_with_a_warning():
    regions = compute_regions(np.full((10, 20, 20), -1000.0), (3.0, 1.0, 1.0), 0, True, -150.0)
    assert all(box == Box.full((10, 20, 20)) for box in regions.boxes.values())
    assert any("no body" in w for w in regions.warnings)


# ---------------------------------------------------------------- cache and coverage


def test_body_threshold_from_plans():
    assert body_threshold_from_plans(PLANS) == pytest.approx((-150 - 50) / 250)
    narrow = json.loads(json.dumps(PLANS))
    narrow["foreground_intensity_properties_per_channel"]["0"]["percentile_00_5"] = 31.0
    assert body_threshold_from_plans(narrow) == pytest.approx((31 - 50) / 250)  # the clip value itself
    narrow["configurations"]["3d_fullres"]["normalization_schemes"] = ["ZScoreNormalization"]
    with pytest.raises(ValueError, match="not CTNormalization"):
        body_threshold_from_plans(narrow)


@pytest.fixture
def preprocessed(tmp_path):
    """A flipped-superior synthetic case saved the way nnU-Net's preprocessor saves it, plus its plans."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    image, label, geometry, s = synthetic("flip_superior", seed=5)
    props = PLANS["foreground_intensity_properties_per_channel"]["0"]
    data = ((np.clip(image, -200, 700) - props["mean"]) / props["std"]).astype(np.float32)[None]
    folder = tmp_path / "Dataset990_Synthetic" / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True)
    (folder.parent / "nnUNetPlans.json").write_text(json.dumps(PLANS))
    properties = {"sitk_stuff": {"spacing": geometry.spacing_xyz, "origin": geometry.origin,
                                 "direction": geometry.direction},
                  "spacing": [SLICE_MM, 1.0, 1.0], "shape_after_cropping_and_before_resampling": image.shape}
    blocks, chunks = comp_blosc2_params(data.shape, (16, 64, 64))
    nnUNetDatasetBlosc2.save_case(data, label[None].astype(np.int8), properties, str(folder / "case_000"),
                                  chunks=chunks, blocks=blocks)
    return folder, label, s


def test_regions_are_cached_and_recomputed_when_stale(preprocessed, monkeypatch):
    folder, label, s = preprocessed
    threshold = body_threshold_from_plans(PLANS)
    lines = []
    regions = load_or_compute_regions(folder, "case_000", threshold, log=lines.append)
    cache = folder / "gtv_regions" / "case_000.json"
    assert cache.is_file() and [p.name for p in cache.parent.iterdir()] == ["case_000.json"]
    assert CaseRegions.from_json(json.loads(cache.read_text())) == regions
    assert lines and "local [" in lines[0] and "mm)" in lines[0]
    assert regions.superior_axis == 0 and not regions.superior_is_high
    assert label[regions.boxes["local"].slices].sum() == label.sum()
    assert s[slice(*regions.boxes["middle"].ranges[0])].min() >= NECK_START

    calls = []
    real_compute = reg.compute_regions
    monkeypatch.setattr(reg.cache, "compute_regions", lambda *a, **k: calls.append(1) or real_compute(*a, **k))
    assert load_or_compute_regions(folder, "case_000", threshold, [SLICE_MM, 1.0, 1.0]) == regions
    assert calls == []  # served from the cache (spacing given or derived alike)
    load_or_compute_regions(folder, "case_000", threshold, settings=RegionSettings(z_margin_mm=20.0))
    cache.write_text("{ truncated")
    load_or_compute_regions(folder, "case_000", threshold)
    assert len(calls) == 2 and CaseRegions.from_json(json.loads(cache.read_text())) == regions


def test_label_coverage_report_counts_cases_and_warns_about_misses():
    seg = np.zeros((10, 8, 8), np.int8)
    seg[6:9, 2:4, 2:4] = 1
    seg[0] = -1  # nnU-Net's "outside the crop" marker is no label
    inner = {"local": Box(((5, 10), (0, 8), (0, 8))), "middle": Box(((2, 10), (0, 8), (0, 8))),
             "global": Box.full(seg.shape)}
    short = dict(inner, local=Box(((8, 10), (0, 8), (0, 8))))
    counts, warnings = label_coverage_report({"a": inner, "b": short, "empty": short},
                                             {"a": seg, "b": seg[None], "empty": np.zeros_like(seg)})
    assert counts == {"local": 2, "middle": 3, "global": 3, "cases": 3}
    assert any(w.startswith("b: only 33.3% of the label lies inside the local region") for w in warnings)
    assert any("local 2/3" in w for w in warnings) and not any("middle" in w for w in warnings)


def test_label_coverage_by_label_pools_each_labels_voxels_and_warns_for_the_trainers_region():
    seg = np.zeros((10, 8, 8), np.int8)
    seg[6:9, 2:4, 2:4] = 1  # GTVp: in the head
    seg[1:3, 5:7, 5:7] = 2  # GTVnd: in the neck, below the local region
    boxes = {"local": Box(((5, 10), (0, 8), (0, 8))), "middle": Box(((2, 10), (0, 8), (0, 8))),
             "global": Box.full(seg.shape)}
    fractions, warnings = label_coverage_by_label({"a": boxes, "b": boxes}, {"a": seg, "b": seg[None]},
                                                  {1: "GTVp", 2: "GTVnd", 3: "Parotid"}, "local")
    assert fractions["GTVp"] == {"local": 1.0, "middle": 1.0, "global": 1.0}
    assert fractions["GTVnd"] == {"local": 0.0, "middle": 0.5, "global": 1.0}
    assert fractions["Parotid"] == {"local": None, "middle": None, "global": None}
    assert len(warnings) == 1 and warnings[0].startswith("the local region holds only 0% of GTVnd's voxels")
    assert label_coverage_by_label({"a": boxes}, {"a": seg}, {2: "GTVnd"}, "global")[1] == []


# ---------------------------------------------------------------- gtv-regions


def _assert_png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.size[0] > 400 and image.size[1] > 400
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_gtv_regions_draws_a_raw_image(tmp_path, capsys):
    image, label, geometry, _ = synthetic("flip_superior", seed=1)
    for name, array in (("ct.nii.gz", image), ("label.nii.gz", label)):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing(geometry.spacing_xyz)
        itk.SetDirection(geometry.direction)
        sitk.WriteImage(itk, str(tmp_path / name))
    out = tmp_path / "png" / "regions.png"
    assert regions_png.main([str(tmp_path / "ct.nii.gz"), "-l", str(tmp_path / "label.nii.gz"), "-o", str(out)]) == 0
    _assert_png(out)
    assert f"wrote {out}" in capsys.readouterr().out


def test_gtv_regions_draws_a_preprocessed_case(preprocessed, tmp_path, capsys):
    folder, _, _ = preprocessed
    out = tmp_path / "pre.png"
    result = subprocess.run([sys.executable, "-m", "nnunetv2_gtv.cli.regions_png", "-p", str(folder), "-c",
                             "case_000", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    _assert_png(out)
    assert "regions computed: local [" in result.stdout
    # once a trainer has cached its regions, the picture shows exactly those
    cached = load_or_compute_regions(folder, "case_000", body_threshold_from_plans(PLANS),
                                     settings=RegionSettings(z_margin_mm=30.0))
    assert regions_png.main(["-p", str(folder), "-c", "case_000", "-o", str(out)]) == 0
    cache = folder / "gtv_regions" / "case_000.json"
    assert f"regions cached in {cache}: {cached.describe()}" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing.nii.gz"], "image file not found: {tmp}/missing.nii.gz"),
    (["{tmp}/not_an_image.nii.gz"], "cannot read image file {tmp}/not_an_image.nii.gz"),
    (["-p", "{tmp}", "-c", "case_000"], "holds no nnU-Net preprocessed cases"),
])
def test_gtv_regions_rejects_bad_input(tmp_path, capsys, args, message):
    (tmp_path / "not_an_image.nii.gz").write_text("hello")
    out = tmp_path / "never.png"
    code = regions_png.main([a.format(tmp=tmp_path) for a in args] + ["-o", str(out)])
    assert code == 2 and not out.exists()
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_gtv_regions_names_unknown_cases(preprocessed, capsys):
    folder, _, _ = preprocessed
    assert regions_png.main(["-p", str(folder), "-c", "case_999"]) == 2
    err = capsys.readouterr().err
    assert f"case 'case_999' not in {folder}; cases there: case_000" in err


# ---------------------------------------------------------------- real CT


@pytest.mark.realdata
def test_real_ct_regions(real_data, capsys):
    rows = []
    coverage_regions, coverage_segs = {}, {}
    for image_file in sorted((real_data / "imagesTr").glob("*.nii.gz")):
        case = image_file.name[: -len("_0000.nii.gz")]
        itk = sitk.ReadImage(str(image_file))
        image = sitk.GetArrayFromImage(itk)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(real_data / "labelsTr" / f"{case}.nii.gz")))
        spacing = itk.GetSpacing()[::-1]
        direction = itk.GetDirection()
        regions = compute_regions(image, spacing, *superior_axis_from_direction(direction), -150.0,
                                  bone_threshold=reg.BONE_THRESHOLD_HU, anterior=reg.anterior_axis_from_direction(
                                      direction), air_threshold=-150.0)
        assert_nested(regions, image.shape)
        coverage_regions[case], coverage_segs[case] = regions, seg
        # shoulders, measured independently: slices whose main body piece is wider than 300 mm (no neck is)
        widths = []
        for plane in image > -150:
            pieces, n = ndimage.label(plane)
            main = pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1) if n else plane
            columns = np.nonzero(main.any(axis=0))[0]
            widths.append((columns[-1] - columns[0] + 1) * spacing[2] if columns.size else 0.0)
        wide = np.nonzero(np.array(widths) > 300)[0]
        middle = regions.boxes["middle"].ranges[0]
        if wide.size:  # superior is the high index here
            # middle ends 10 mm below the lung apex, below the larynx: a few cm below the top of the shoulders, not
            # deep in the chest
            into_shoulders_mm = (wide.max() + 1 - middle[0]) * spacing[0]
            assert 0 <= into_shoulders_mm <= 75, f"{case}: middle ends {into_shoulders_mm:.0f} mm into the shoulders"
            assert regions.boxes["local"].ranges[0][0] > middle[0]
        else:  # no shoulders in the field of view (a CT carrying values only near the organs): the safe fallback
            assert regions.fallbacks == ("middle",) and middle[0] == 0
        rows.append(f"{case}: {regions.describe()} levels {regions.levels} {'; '.join(regions.warnings)}")
    counts, warnings = label_coverage_report(coverage_regions, coverage_segs)
    assert counts["global"] == counts["cases"] == len(rows) > 0
    with capsys.disabled():
        print("\n" + "\n".join(rows + [f"labels fully inside: {counts}"] + warnings))


# ---------------------------------------------------------------- bone and air landmarks (issue 14's failure modes)

OPENKBP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "OpenKBP_anatomy"


def with_bone(image, geometry, spacing=(SLICE_MM, 1.0, 1.0), **settings) -> CaseRegions:
    """Regions as gtv-regions finds them on a raw CT: bone landmarks on."""
    return compute_regions(image, spacing, *superior_axis_from_direction(geometry.direction), -150.0,
                           RegionSettings(**settings), bone_threshold=reg.BONE_THRESHOLD_HU,
                           anterior=reg.anterior_axis_from_direction(geometry.direction), air_threshold=-150.0)


def slices_in(box: Box, s: np.ndarray) -> np.ndarray:
    inside = np.zeros(len(s), bool)
    inside[slice(*box.ranges[0])] = True
    return inside


def neck_slices_widened(image, s, area_ratio: float) -> np.ndarray:
    """The synthetic CT with soft tissue added around the neck until its area is ``area_ratio`` of the head's."""
    body = image > -150
    head_area = body[s >= HEAD_START].sum(axis=(1, 2)).max()
    y, x = np.ogrid[:image.shape[1], :image.shape[2]]
    cy, cx = np.argwhere(body[(s >= NECK_START) & (s < HEAD_START)].any(axis=0)).mean(axis=0)
    radius = np.sqrt(area_ratio * head_area / np.pi)
    disk = (y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2
    widened = image.copy()
    neck = (s >= NECK_START) & (s < HEAD_START)
    outside = ~body & disk[None]
    outside[~neck] = False
    widened[outside] = 40
    return widened


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_mandible_and_shoulders_set_the_borders_in_every_orientation(orientation):
    image, label, geometry, s = synthetic(orientation, seed=3 + list(ORIENTATIONS).index(orientation))
    regions = with_bone(image, geometry)
    assert_nested(regions, image.shape)
    assert regions.warnings == () and regions.fallbacks == ()
    assert regions.rules["local"].startswith("the mandible") and "shoulders" in regions.rules["middle"]
    local, middle = slices_in(regions.boxes["local"], s), slices_in(regions.boxes["middle"], s)
    assert label[regions.boxes["local"].slices].sum() == label.sum() > 0
    assert local[s >= HEAD_START].all() and not local[s < NECK_START + 0.1].any()
    assert middle[s >= NECK_START].all() and not middle[s < NECK_START].any()
    # the "mandible" of the synthetic CT is the skull's lowest bone, 0.08 of the extent above the head's start
    mandible = regions.levels["mandible"]
    assert abs(s[mandible] - (HEAD_START + 0.08)) * (len(s) - 1) * SLICE_MM <= SLICE_MM + 1e-6


def test_a_head_barely_wider_than_the_neck_keeps_its_region():
    """Neck area 0.8 of the head's: the area profile alone finds no neck and falls back; the bone does not care."""
    image, label, geometry, s = synthetic(seed=7)
    widened = neck_slices_widened(image, s, 0.8)
    y, x = np.ogrid[-1:1:image.shape[1] * 1j, -1:1:image.shape[2] * 1j]
    broad = ((x / 0.98) ** 2 + (y / 0.9) ** 2 <= 1)[None] & (s < NECK_START)[:, None, None] & (widened < -150)
    widened[broad] = 40  # broad shoulders, so that they still stand out against the broad neck
    profile_only = regions_of(widened, geometry)
    assert "local" in profile_only.fallbacks
    regions = with_bone(widened, geometry)
    assert regions.fallbacks == () and regions.warnings == ()
    local = slices_in(regions.boxes["local"], s)
    assert local[s >= HEAD_START].all() and not local[s < NECK_START + 0.1].any()
    assert label[regions.boxes["local"].slices].sum() == label.sum()


def test_middle_reaches_down_to_the_lung_apex():
    """Lungs below the shoulders' start: middle ends at their apex (the larynx lies above it), not where the body
    begins to widen."""
    image, label, geometry, s = synthetic(seed=8)
    apex = NECK_START - 0.1
    y, x = np.ogrid[:image.shape[1], :image.shape[2]]
    lungs = (((np.abs(x - 48) - 17) / 11.0) ** 2 + ((y - 50) / 14.0) ** 2 <= 1)[None] & (s < apex)[:, None, None]
    with_lungs = np.where(lungs, -800, image).astype(image.dtype)
    regions = with_bone(with_lungs, geometry, lung_mm2=400.0)  # the phantom is about a quarter of a real chest
    assert regions.rules["middle"] == "the lung apex + 10 mm" and regions.fallbacks == ()
    middle = slices_in(regions.boxes["middle"], s)
    below_apex_mm = (apex - s) * (len(s) - 1) * SLICE_MM
    assert middle[below_apex_mm <= 9].all() and not middle[below_apex_mm > 10 + SLICE_MM].any()
    assert regions.boxes["middle"].contains(regions.boxes["local"])


def test_borders_agree_between_grids():
    """The same anatomy sampled at 3 x 1 x 1 mm and at 1.5 x 2 x 2 mm: inferior borders within 10 mm."""
    borders = []
    for shape, spacing_xyz in (((40, 96, 96), (1.0, 1.0, 3.0)), ((79, 48, 48), (2.0, 2.0, 1.5))):
        geometry = CaseGeometry(shape, spacing_xyz, ORIENTATIONS["identity"])
        image, _ = render_case(geometry, np.random.default_rng(9))
        regions = with_bone(image, geometry, spacing=spacing_xyz[::-1])
        slice_mm = spacing_xyz[2]
        # superior is the high index: a border's height above the scan's lower edge, in mm
        borders.append([regions.boxes[name].ranges[0][0] * slice_mm for name in ("local", "middle")])
    assert np.abs(np.subtract(*borders)).max() <= 10.0, borders


def test_a_masked_top_falls_back_to_the_larger_region():
    """The upper head replaced by a uniform block (defacing, a burnt-in mask): no 18 mm head; local falls back to
    middle, named with its reason."""
    image, label, geometry, s = synthetic(seed=10)
    masked = image.copy()
    masked[s > HEAD_START + 0.2] = 0  # uniform block over the whole plane
    regions = with_bone(masked, geometry)
    assert "local" in regions.fallbacks  # the block hides the skull: too little bone for a head, a 39 mm "head"
    assert any("head region only" in w and "local covers the middle region" in w for w in regions.warnings)
    assert regions.boxes["local"] == regions.boxes["middle"]
    assert slices_in(regions.boxes["local"], s)[s >= NECK_START].all()
    assert label[regions.boxes["local"].slices].sum() == label.sum()


def test_landmark_thresholds_need_bone_and_air_inside_the_clip():
    assert reg.bone_threshold_from_plans(PLANS) == pytest.approx((300 - 50) / 250)
    assert reg.air_threshold_from_plans(PLANS) == pytest.approx((-150 - 50) / 250)
    clipped = json.loads(json.dumps(PLANS))
    clipped["foreground_intensity_properties_per_channel"]["0"].update(percentile_00_5=-100.0, percentile_99_5=180.0)
    assert reg.bone_threshold_from_plans(clipped) is None and reg.air_threshold_from_plans(clipped) is None
    clipped["configurations"]["3d_fullres"]["normalization_schemes"] = ["ZScoreNormalization"]
    assert reg.bone_threshold_from_plans(clipped) is None and reg.air_threshold_from_plans(clipped) is None


def test_training_coverage_streams_labels_and_counts_fallbacks(monkeypatch):
    """Coverage reads one label at a time (never all cases' labels at once) and the log counts fallbacks."""
    import weakref

    from nnunetv2_gtv.training import sampling_regions

    image, label, geometry, s = synthetic(seed=11)
    normal = with_bone(image, geometry)
    masked = image.copy()
    masked[s > HEAD_START + 0.2] = 0
    fallback = with_bone(masked, geometry)
    regions = {"a": normal, "b": fallback, "c": normal, "d": normal}
    alive, most = [], [0]

    class Dataset:
        identifiers = list(regions)

        def load_case(self, identifier):
            seg = label[None].astype(np.int8).copy()
            alive.append(weakref.ref(seg))
            most[0] = max(most[0], sum(ref() is not None for ref in alive))
            return None, seg, None, {}

    monkeypatch.setattr(sampling_regions, "regions_for_dataset", lambda *a, **k: regions)
    lines = []
    boxes = sampling_regions.training_region_boxes("unused", Dataset(), PLANS, [SLICE_MM, 1.0, 1.0], "local",
                                                   log=lines.append)
    assert boxes == {case: r.boxes["local"].ranges for case, r in regions.items()}
    assert len(alive) == 4 and most[0] <= 2  # the next label is read while the last one is being released
    assert any("region fallbacks" in line and "local in 1/4 cases (b)" in line for line in lines), lines
    assert any("'local': 4" in line for line in lines)


@pytest.fixture
def openkbp():
    if not (OPENKBP / "index.json").is_file():
        pytest.skip(f"OpenKBP_anatomy not present at {OPENKBP}")
    import importlib.util

    spec = importlib.util.spec_from_file_location("regions_real", Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / "regions_real.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("regions_real", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# real cases where the area profile alone failed: a flat profile (head end above the brainstem, parotids out),
# "no neck" on a normal neck, middle ending above the larynx, a border that moved with the grid
@pytest.mark.realdata
@pytest.mark.parametrize("case", ["kbp_155", "kbp_100", "kbp_087", "kbp_136", "kbp_031", "kbp_082", "kbp_106"])
def test_real_anatomy_criteria(openkbp, case):
    result = openkbp.evaluate_case(OPENKBP / case)
    for grid in openkbp.GRIDS:
        if result.below_brainstem_mm[grid] is not None:
            assert result.brainstem_inside[grid] and result.below_brainstem_mm[grid] >= 20, (grid, result)
        if result.parotid_fraction[grid] is not None:
            assert result.parotid_fraction[grid] >= 0.9, (grid, result)
        if result.larynx_fraction[grid] is not None:
            assert result.larynx_fraction[grid] == 1.0, (grid, result)
        assert result.nested[grid] and result.fallbacks[grid] == (), (grid, result)
    for region in ("local", "middle"):
        assert abs(result.border_z_mm["native"][region] - result.border_z_mm["3x1x1"][region]) <= 10, result
