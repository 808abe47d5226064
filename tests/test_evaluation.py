"""Tests of gtv-evaluate: metrics on analytic shapes, error-rate table, correlations, folder handling, CLI,
per-case overlay figures."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage
from scipy.spatial.distance import cdist

from nnunetv2_gtv.cli.evaluate import main
from nnunetv2_gtv.evaluation import uncertainty_analysis
from nnunetv2_gtv.evaluation.folders import EvaluationInputError, Volume, check_same_grid, detect_file_ending
from nnunetv2_gtv.evaluation.metrics import compute_metrics, directed_surface_distances, summarise, surface
from nnunetv2_gtv.evaluation.pipeline import EvaluationResult, EvaluationSettings
from nnunetv2_gtv.figures.overlay import overlay_views
from nnunetv2_gtv.evaluation.report import build_summary, markdown
from nnunetv2_gtv.evaluation.uncertainty_analysis import (
    LevelCount,
    correlation,
    error_rate_table,
    error_region,
    level_counts,
)


# ---------------------------------------------------------------- helpers and independent references

SHAPE = (8, 20, 24)
SPACING_XYZ = (0.8, 0.9, 2.5)
SPACING_ZYX = SPACING_XYZ[::-1]
ORIGIN = (-10.0, 5.0, 30.0)
DIRECTION = (1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)


def write_image(path, array, spacing=SPACING_XYZ, origin=ORIGIN, direction=DIRECTION):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))



def brute_surface_points(mask: np.ndarray, spacing) -> np.ndarray:
    """Surface voxel centres in mm: foreground voxels with a 6-neighbour that is background or outside the image."""
    padded = np.pad(mask, 1)
    outside_neighbour = np.zeros(mask.shape, dtype=bool)
    for axis in range(3):
        for shift in (-1, 1):
            outside_neighbour |= ~np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & outside_neighbour) * np.asarray(spacing, dtype=float)


def brute_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[float, float]:
    """(ASSD, HD95) from all pairwise surface-point distances."""
    pairwise = cdist(brute_surface_points(pred, spacing), brute_surface_points(ref, spacing))
    pred_to_ref, ref_to_pred = pairwise.min(axis=1), pairwise.min(axis=0)
    assd = (pred_to_ref.sum() + ref_to_pred.sum()) / (pred_to_ref.size + ref_to_pred.size)
    return assd, max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))


def vote_entropy(k: np.ndarray, n: int = 6) -> np.ndarray:
    """Entropy of k foreground votes out of n (paper eq. 6), as float32 like the fused output."""
    p = np.asarray(k, dtype=float) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(p), 0) + np.where(p < 1, (1 - p) * np.log(1 - p), 0))
    return h.astype(np.float32)


def spheres(spacing, r_inner, r_outer):
    extent = r_outer + 2 * max(spacing)
    axes = [np.arange(-extent, extent + s / 2, s) + 0.123 * s for s in spacing]  # centre off the grid
    z, y, x = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt(z**2 + y**2 + x**2)
    return radius <= r_inner, radius <= r_outer


# ---------------------------------------------------------------- metrics

@pytest.mark.parametrize("offset, spacing, expected_mm", [
    ((2, 0, 0), (3.0, 1.0, 1.0), 6.0),
    ((0, 0, 4), (3.0, 1.0, 0.5), 2.0),
    ((0, 3, 4), (3.0, 1.0, 0.75), math.hypot(3.0, 3.0)),
])
def test_single_voxels_distance_follows_each_axis_spacing(offset, spacing, expected_mm):
    a, b = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    a[2, 2, 2] = True
    b[2 + offset[0], 2 + offset[1], 2 + offset[2]] = True
    metrics = compute_metrics(a, b, spacing)
    assert metrics.dice == 0.0
    assert metrics.assd_mm == pytest.approx(expected_mm)
    assert metrics.hd95_mm == pytest.approx(expected_mm)


def test_concentric_spheres_anisotropic_match_analytic_distance():
    """Surface distance between spheres of radius 6 and 10 mm is 4 mm.

    Tolerance: a surface voxel centre c of a digitised sphere of radius r satisfies r - s_max < |c| <= r (it is
    inside and a neighbour at most s_max further out is outside), so both surfaces lie in shells one largest
    spacing thick and every surface-to-surface distance is within s_max of 4 mm. The error must also shrink
    when the grid is refined.
    """
    errors = []
    for scale in (1.0, 0.5):
        spacing = tuple(scale * s for s in (2.0, 0.8, 0.6))
        inner, outer = spheres(spacing, 6.0, 10.0)
        s_max = max(spacing)
        metrics = compute_metrics(inner, outer, spacing)
        for distances in directed_surface_distances(inner, outer, spacing):
            assert distances.min() >= 4.0 - s_max - 1e-9 and distances.max() <= 4.0 + s_max + 1e-9
        assert abs(metrics.hd95_mm - 4.0) <= s_max
        errors.append(abs(metrics.assd_mm - 4.0))
        assert errors[-1] < s_max / 2
        assert metrics.dice == pytest.approx(2 * inner.sum() / (inner.sum() + outer.sum()))
        assert metrics.rve_percent == pytest.approx(100 * abs(inner.sum() - outer.sum()) / outer.sum())
    assert errors[1] < errors[0]


def test_surface_counts_the_image_border_as_outside():
    full = np.ones((3, 4, 5), bool)
    expected = np.ones_like(full)
    expected[1, 1:3, 1:4] = False
    np.testing.assert_array_equal(surface(full), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distances_match_brute_force_pairwise(seed):
    rng = np.random.default_rng(seed)
    spacing = (2.5, 0.9, 0.7)
    field = ndimage.gaussian_filter(rng.normal(size=(2, 10, 14, 16)), sigma=(0, 1.5, 2, 2))
    pred, ref = field[0] > 0.05, field[1] > 0.05
    pred[:, 0, :4] = True  # touches the image border: border voxels are surface
    metrics = compute_metrics(pred, ref, spacing)
    assd, hd95 = brute_distances(pred, ref, spacing)
    assert metrics.assd_mm == pytest.approx(assd, rel=1e-12)
    assert metrics.hd95_mm == pytest.approx(hd95, rel=1e-12)
    assert metrics.dice == pytest.approx(2 * (pred & ref).sum() / (pred.sum() + ref.sum()))
    assert metrics.volume_pred_ml == pytest.approx(pred.sum() * 2.5 * 0.9 * 0.7 / 1000)


def test_empty_masks_get_documented_values():
    shape, spacing = (4, 5, 6), (3.0, 1.0, 0.5)
    diagonal = math.sqrt(12.0**2 + 5.0**2 + 3.0**2)
    empty, full = np.zeros(shape, bool), np.zeros(shape, bool)
    full[1:3, 1:4, 1:5] = True

    both = compute_metrics(empty, empty, spacing)
    assert (both.dice, both.assd_mm, both.hd95_mm, both.rve_percent, both.empty) == (1.0, 0.0, 0.0, 0.0, "both")
    no_pred = compute_metrics(empty, full, spacing)
    assert (no_pred.dice, no_pred.rve_percent, no_pred.empty) == (0.0, 100.0, "prediction")
    assert no_pred.assd_mm == pytest.approx(diagonal) and no_pred.hd95_mm == pytest.approx(diagonal)
    no_ref = compute_metrics(full, empty, spacing)
    assert (no_ref.dice, no_ref.empty) == (0.0, "reference") and math.isnan(no_ref.rve_percent)
    assert no_ref.hd95_mm == pytest.approx(diagonal)


def test_summarise_counts_undefined_values_and_uses_sample_std():
    stats = summarise([10.0, 20.0, float("nan"), 30.0])
    assert stats == {"mean": 20.0, "std": 10.0, "n": 3, "n_undefined": 1}
    single = summarise([5.0])
    assert single["mean"] == 5.0 and math.isnan(single["std"])


# ---------------------------------------------------------------- uncertainty analysis

@pytest.mark.parametrize("dense", [True, False], ids=["bincount", "sorted"])
def test_error_rate_per_level_on_known_votes(dense, monkeypatch):
    if not dense:
        monkeypatch.setattr(uncertainty_analysis, "MAX_DENSE_LEVEL_CODES", 0)
    # per voxel: number of the 6 models voting foreground, fused prediction, reference (errors marked *)
    votes = [0, 0, 0, 6, 1, 1, 5, 2, 4, 3, 3, 3]
    pred = [0, 0, 0, 1, 0, 0, 1, 0, 1, 1, 0, 1]
    ref = [0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0]
    #      .  .  *  .  .  *  .  *  .  *  .  *
    entropy = vote_entropy(np.array(votes)).reshape(1, 1, -1)
    prediction, reference = np.array(pred).reshape(1, 1, -1), np.array(ref).reshape(1, 1, -1)
    counts = level_counts(entropy, prediction, reference, np.ones(entropy.shape, bool))
    assert [(c.level, c.voxels, c.errors) for c in counts] == [
        (0.0, 4, 1), (0.4506, 3, 1), (0.6365, 2, 1), (0.6931, 3, 2)]
    assert [c.rate for c in counts] == pytest.approx([1 / 4, 1 / 3, 1 / 2, 2 / 3])
    entropy[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        level_counts(entropy, prediction, reference, np.ones(entropy.shape, bool))


def test_error_rate_table_mean_over_cases_and_pooled():
    table = error_rate_table({
        "a": [LevelCount(0.0, 4, 1), LevelCount(0.4506, 3, 1), LevelCount(0.6931, 3, 2)],
        "b": [LevelCount(0.0, 10, 0), LevelCount(0.6931, 2, 2)],
    })
    assert table["levels"] == [0.0, 0.4506, 0.6931]
    assert table["per_case"]["b"][0] == 0.0 and math.isnan(table["per_case"]["b"][1])
    assert table["mean_over_cases"] == pytest.approx([0.125, 1 / 3, (2 / 3 + 1) / 2])
    assert table["n_cases"] == [2, 1, 2]
    assert table["pooled"] == pytest.approx([1 / 14, 1 / 3, 4 / 5])


def test_bbox_region_is_grown_by_margin_and_includes_uncertain_voxels():
    shape, spacing = (10, 30, 30), (3.0, 1.0, 1.0)
    reference, prediction, entropy = np.zeros(shape, int), np.zeros(shape, int), np.zeros(shape, np.float32)
    reference[5, 15, 15] = 1
    region = error_region("bbox", prediction, reference, entropy, spacing, margin_mm=4.0)
    assert region.sum() == 5 * 9 * 9  # z: ceil(4 / 3) = 2 slices each side; y, x: 4 voxels each side
    entropy[5, 15, 27] = 0.45
    region = error_region("bbox", prediction, reference, entropy, spacing, margin_mm=4.0)
    assert region.sum() == 5 * 9 * (30 - 11)  # x from 15 - 4 up to the image edge
    assert error_region("image", prediction, reference, entropy, spacing).all()


def test_body_region_fills_holes_and_keeps_foreground_outside_the_body():
    ct = np.full((3, 12, 12), -1000.0)
    ct[:, 2:10, 2:10] = 40.0
    ct[:, 5:7, 5:7] = -1000.0  # airway inside the body
    reference = np.zeros(ct.shape, int)
    reference[1, 0, 0] = 1  # outside the body, still counted
    region = error_region("body", np.zeros_like(reference), reference, np.zeros(ct.shape), (3.0, 1.0, 1.0),
                          ct=ct, body_threshold_hu=-300.0)
    assert region.sum() == 3 * 64 + 1
    with pytest.raises(ValueError, match="CT"):
        error_region("body", reference, reference, np.zeros(ct.shape), (3.0, 1.0, 1.0))


def test_correlations_on_constructed_data():
    x = np.linspace(0.1, 0.6, 8)
    monotone = correlation(list(x), list(x**3))
    assert monotone["spearman_rho"] == pytest.approx(1.0)
    assert 0.9 < monotone["pearson_r"] < 1.0
    assert monotone["pearson_r"] == pytest.approx(np.corrcoef(x, x**3)[0, 1])
    assert correlation(list(x), list(2 - 3 * x))["pearson_r"] == pytest.approx(-1.0)
    with_nan = correlation([0.1, 0.2, 0.3, 0.4], [1.0, float("nan"), 3.0, 4.0])
    assert (with_nan["n"], with_nan["n_excluded"]) == (3, 1) and with_nan["spearman_rho"] == pytest.approx(1.0)
    too_few = correlation([0.1, 0.2], [1.0, 2.0])
    assert math.isnan(too_few["pearson_r"]) and "at least 3" in too_few["note"]
    assert "constant" in correlation([0.1, 0.2, 0.3], [1.0, 1.0, 1.0])["note"]


# ---------------------------------------------------------------- folders

def _volume(shape=(4, 5, 6), spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
            name="a.nii.gz"):
    return Volume(Path(name), np.zeros(shape), spacing, origin, tuple(float(d) for d in direction))


@pytest.mark.parametrize("change, word", [
    ({"shape": (4, 5, 7)}, "shape"),
    ({"spacing": (1.0, 1.0, 2.5)}, "spacing"),
    ({"origin": (0.0, 0.5, 0.0)}, "origin"),
    ({"direction": (-1, 0, 0, 0, 1, 0, 0, 0, 1)}, "direction"),
])
def test_grid_mismatch_names_both_files_and_the_problem(change, word):
    with pytest.raises(EvaluationInputError, match=rf"pred\.nii\.gz: geometry differs from ref\.nii\.gz: {word}"):
        check_same_grid(_volume(name="pred.nii.gz", **change), _volume(name="ref.nii.gz"))
    check_same_grid(_volume(origin=(0.0, 0.0, 1e-5)), _volume())  # float32 round-off is accepted


def test_file_ending_detection(tmp_path):
    write_image(tmp_path / "c1.nrrd", np.zeros((2, 3, 4), np.uint8))
    assert detect_file_ending(tmp_path) == ".nrrd"
    write_image(tmp_path / "c2.nii.gz", np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(EvaluationInputError, match="several endings"):
        detect_file_ending(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    assert detect_file_ending(tmp_path) == ".nii.gz"


# ---------------------------------------------------------------- CLI end to end

def box(z, y, x):
    mask = np.zeros(SHAPE, np.uint8)
    mask[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = 1
    return mask


REF = box((2, 6), (5, 13), (6, 16))
FUSED = {
    "case_a": box((2, 6), (5, 13), (7, 17)),  # shifted one voxel in x: Dice 0.9, RVE 0
    "case_b": box((2, 6), (5, 13), (6, 14)),  # 8 of 10 columns: Dice 16/18, RVE 20 %
    "case_c": np.zeros(SHAPE, np.uint8),      # empty prediction: Dice 0, distances = image diagonal
}
EXPECTED_DICE = {"case_a": 0.9, "case_b": 16 / 18, "case_c": 0.0}
EXPECTED_RVE = {"case_a": 0.0, "case_b": 20.0, "case_c": 100.0}
VVC = {"case_a": 0.05, "case_b": 0.06, "case_c": 0.5}  # increases with 1 - Dice


def uncertainty(fused):
    """Three votes (ln 2) where fused and reference disagree, one vote on slice 0, unanimous elsewhere."""
    votes = np.where(fused == 1, 6, 0)
    votes[0] = 1
    votes[fused != REF] = 3
    return votes


@pytest.fixture
def fused_folder(tmp_path):
    fused_dir, labels, model = tmp_path / "fused", tmp_path / "labels", tmp_path / "model_a"
    for folder in (fused_dir, labels, model):
        folder.mkdir()
    rows = []
    for case, fused in FUSED.items():
        write_image(labels / f"{case}.nii.gz", REF)
        write_image(fused_dir / f"{case}.nii.gz", fused)
        write_image(fused_dir / f"{case}_entropy.nii.gz", vote_entropy(uncertainty(fused)))
        write_image(model / f"{case}.nii.gz", REF)
        rows.append({"case": case, "n_models": 2, "volume_ml_model_1": 1.0, "volume_ml_model_2": 1.1,
                     "volume_ml_fused": 1.0, "vvc": VVC[case], "components_removed": 0, "review": "",
                     "missing_models": ""})
    with open(fused_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (fused_dir / "summary.json").write_text(json.dumps({
        "command": "gtv-uncertainty", "versions": {}, "inputs": [str(model), str(tmp_path / "not_there")],
        "weights": None, "settings": {}, "cases": rows}))
    (fused_dir / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    return fused_dir, labels


def test_cli_end_to_end_values_match_independent_computation(fused_folder, capsys):
    fused_dir, labels = fused_folder
    assert main(["-p", str(fused_dir), "-r", str(labels), "--error-region", "image"]) == 0
    out = fused_dir / "evaluation"
    assert str(out) in capsys.readouterr().out
    for png in ("error_rate_per_level.png", "vvc_vs_1_minus_dice.png", "dice_per_case.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(out / "metrics.csv", newline="") as handle:
        rows = {(r["case"], r["source"]): r for r in csv.DictReader(handle)}
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING_ZYX)))
    for case, fused in FUSED.items():
        row = rows[(case, "fused")]
        assert float(row["dice"]) == pytest.approx(EXPECTED_DICE[case], abs=1e-5)
        assert float(row["rve_percent"]) == pytest.approx(EXPECTED_RVE[case], abs=1e-4)
        expected = (brute_distances(fused.astype(bool), REF.astype(bool), SPACING_ZYX) if fused.any()
                    else (diagonal, diagonal))
        assert float(row["assd_mm"]) == pytest.approx(expected[0], rel=1e-5)
        assert float(row["hd95_mm"]) == pytest.approx(expected[1], rel=1e-5)
        assert float(row["vvc"]) == pytest.approx(VVC[case])
        assert float(rows[(case, "model_1")]["dice"]) == 1.0
    assert not any(source == "model_2" for _, source in rows)

    doc = json.loads((out / "evaluation.json").read_text())
    dice = doc["summary"]["fused"]["dice"]
    assert dice["n"] == 3 and dice["mean"] == pytest.approx(np.mean(list(EXPECTED_DICE.values())), abs=1e-6)
    assert dice["std"] == pytest.approx(np.std(list(EXPECTED_DICE.values()), ddof=1), abs=1e-6)
    assert doc["summary"]["model_1"]["dice"]["mean"] == 1.0
    assert {"case": "case_c", "source": "fused", "label": "label_1", "empty": "prediction"} in doc["empty_masks"]
    assert any("not_there" in note for note in doc["notes"])

    rate = doc["error_rate"]
    assert rate["levels"] == [0.0, 0.4506, 0.6931]
    for case, fused in FUSED.items():
        votes = uncertainty(fused)
        wrong = fused != REF
        expected = [100 * wrong[np.isin(votes, k)].mean() for k in ([0, 6], [1, 5], [3])]
        assert rate["per_case_percent"][case] == pytest.approx(expected)
    vvc = doc["vvc_vs_1_minus_dice"]
    one_minus_dice = [1 - d for d in EXPECTED_DICE.values()]
    assert vvc["spearman_rho"] == pytest.approx(1.0)
    assert vvc["pearson_r"] == pytest.approx(np.corrcoef(one_minus_dice, list(VVC.values()))[0, 1], abs=1e-5)

    review = doc["review_scores"]  # VVC ranks case_c (Dice 0) first: the worst ceil(3/4) = 1 case, caught
    assert set(review["scores"]) == {"vvc", "volume_ml_fused"} and review["best"] == "vvc"
    assert review["scores"]["vvc"]["spearman_rho"] == pytest.approx(1.0)
    assert (review["scores"]["vvc"]["auroc"], review["scores"]["vvc"]["caught"]) == (1.0, 1)
    assert review["scores"]["volume_ml_fused"]["spearman_rho"] is None  # the same fused volume everywhere

    report = (out / "report.md").read_text()
    assert "| fused | 3 |" in report and "| case_b | 0.8889 |" in report
    assert "| vvc | 3 | 1.00 [" in report and "Chosen (AUROC above chance and the size baseline): vvc." in report
    for png in ("error_rate_per_level.png", "vvc_vs_1_minus_dice.png", "dice_per_case.png"):
        assert f"]({png})" in report
    with open(out / "error_rates.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 9


def test_cli_prediction_on_another_grid_fails_naming_the_file(fused_folder, capsys):
    fused_dir, labels = fused_folder
    write_image(fused_dir / "case_b.nii.gz", FUSED["case_b"], spacing=(0.8, 0.9, 3.0))
    assert main(["-p", str(fused_dir), "-r", str(labels), "-o", str(fused_dir / "report")]) == 2
    error = capsys.readouterr().err
    assert str(fused_dir / "case_b.nii.gz") in error and "spacing" in error
    assert not (fused_dir / "report" / "report.md").exists()


def test_cli_missing_reference_fails_or_is_skipped(fused_folder, capsys):
    fused_dir, labels = fused_folder
    (labels / "case_a.nii.gz").unlink()
    (labels / "case_c.nii.gz").unlink()
    assert main(["-p", str(fused_dir), "-r", str(labels)]) == 2
    error = capsys.readouterr().err
    assert "2 of 3 cases: case_a, case_c" in error and "--skip-missing" in error

    assert main(["-p", str(fused_dir), "-r", str(labels), "--skip-missing", "--error-region", "bbox"]) == 0
    doc = json.loads((fused_dir / "evaluation" / "evaluation.json").read_text())
    assert doc["cases"] == ["case_b"]
    assert [s["case"] for s in doc["skipped_cases"]] == ["case_a", "case_c"]
    assert "case_a: skipped" in (fused_dir / "evaluation" / "report.md").read_text()


def test_labels_outside_the_label_set_are_refused_or_mapped_to_background(fused_folder, capsys):
    fused_dir, labels = fused_folder
    assert main(["-p", str(fused_dir), "-r", str(labels), "-o", str(fused_dir / "clean")]) == 0
    reference = REF.copy()
    reference[0, :2, :3] = 2  # background and GTV only: 2 is no label of this dataset
    write_image(labels / "case_a.nii.gz", reference)
    model_prediction = fused_dir.parent / "model_a" / "case_b.nii.gz"
    prediction = REF.copy()
    prediction[7, -1, -1] = 5
    write_image(model_prediction, prediction)
    capsys.readouterr()

    assert main(["-p", str(fused_dir), "-r", str(labels), "-o", str(fused_dir / "refused")]) == 2
    error = capsys.readouterr().err
    assert f"{labels / 'case_a.nii.gz'}: label 2 (6 voxels) is not in the label set {{0, 1}}" in error
    assert "--unknown-labels background" in error and not (fused_dir / "refused").exists()

    assert main(["-p", str(fused_dir), "-r", str(labels), "-o", str(fused_dir / "mapped"),
                 "--unknown-labels", "background"]) == 0
    warnings = capsys.readouterr().err
    assert str(labels / "case_a.nii.gz") in warnings and str(model_prediction) in warnings
    clean, mapped = (json.loads((fused_dir / name / "evaluation.json").read_text()) for name in ("clean", "mapped"))
    assert mapped["metrics"] == clean["metrics"] and mapped["error_rate"] == clean["error_rate"]
    assert mapped["labels"]["values"] == [0, 1] and mapped["labels"]["unknown_labels"] == "background"
    assert [m["file"] for m in mapped["labels"]["mapped"]] == [str(labels / "case_a.nii.gz"), str(model_prediction)]
    report = (fused_dir / "mapped" / "report.md").read_text()
    assert "mapped to background" in report and f"{model_prediction}: label 5 (1 voxel)" in report

    dataset = {"file_ending": ".nii.gz", "labels": {"background": 0, "GTV": 1, "node": 2, "other": 3, "more": 4,
                                                    "last": 5}}
    (fused_dir / "dataset.json").write_text(json.dumps(dataset))  # now 2 and 5 are labels: nothing to refuse
    assert main(["-p", str(fused_dir), "-r", str(labels), "-o", str(fused_dir / "six")]) == 0


def test_cli_body_region_needs_images(fused_folder, capsys):
    fused_dir, labels = fused_folder
    assert main(["-p", str(fused_dir), "-r", str(labels), "--error-region", "body"]) == 2
    assert "--images" in capsys.readouterr().err


def test_continuous_entropy_is_flagged_and_its_table_left_to_the_csv(tmp_path):
    result = EvaluationResult(tmp_path, tmp_path, ".nii.gz", EvaluationSettings(), models=[], cases=["a"])
    result.metrics.append({"case": "a", "source": "fused", **compute_metrics(REF, REF, SPACING_ZYX).as_dict()})
    result.level_counts["a"] = [LevelCount(i / 100, 10, 1) for i in range(25)]
    doc = build_summary(result, "gtv-evaluate")
    assert any("25 entropy levels" in note for note in doc["notes"])
    report = markdown(doc)
    assert "see error_rates.csv" in report and "level 25" not in report


# ---------------------------------------------------------------- overlay figures

IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
UPRIGHT_SPACING_ZYX = (3.0, 0.9, 0.8)
UPRIGHT_CENTRE = (6, 60, 50)  # (z, y, x) centre of the fused box
# (stored array from the upright one, direction, spacing (z, y, x) of the stored array)
ORIENTED = {
    "identity": (lambda a: a, IDENTITY, UPRIGHT_SPACING_ZYX),
    "flipped superior": (lambda a: a[::-1], (1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0), UPRIGHT_SPACING_ZYX),
    "flipped in-plane": (lambda a: a[:, ::-1, ::-1], (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0), UPRIGHT_SPACING_ZYX),
    "slices along x": (lambda a: a.transpose(2, 1, 0), (0, 0, 1.0, 0, 1.0, 0, 1.0, 0, 0),
                       UPRIGHT_SPACING_ZYX[::-1]),
}


def upright_case():
    """(ct, fused, reference, entropy) with array indices increasing to superior (z), posterior (y), left (x)."""
    shape = (14, 121, 101)
    ct = np.full(shape, -1000, np.int16)
    ct[12, 60, 50] = 500  # superior, in the coronal plane
    ct[6, 20, 50] = 600   # anterior, in the axial plane
    ct[6, 60, 95] = 700   # patient left, in both planes
    fused, reference = np.zeros(shape, bool), np.zeros(shape, bool)
    fused[5:8, 55:66, 45:56] = True
    reference[5:8, 57:68, 45:56] = True
    entropy = np.where(fused ^ reference, 0.6931, 0).astype(np.float32)
    return ct, fused, reference, entropy


@pytest.mark.parametrize("orientation", list(ORIENTED))
def test_overlay_views_show_superior_and_anterior_up_and_patient_right_on_the_image_left(orientation):
    store, direction, spacing = ORIENTED[orientation]
    upright = upright_case()
    overlay = overlay_views(*(store(a) for a in upright), spacing, direction)
    ct, fused, reference, entropy = upright
    # y crop: boxes span rows 55-67, grown by ceil(40 mm / 0.9 mm) = 45 rows; z and x reach the image edges
    axial_cut, coronal_cut = (6, slice(10, 113), slice(None)), (slice(None, None, -1), 60, slice(None))
    axial, coronal = overlay.views
    for volume, field_name in zip(upright, ("ct", "fused", "reference", "entropy")):
        np.testing.assert_array_equal(getattr(axial, field_name), volume[axial_cut])
        np.testing.assert_array_equal(getattr(coronal, field_name), volume[coronal_cut])
    assert axial.ct[10, 50] == 600 and axial.ct[50, 95] == 700  # anterior marker near the top, left on the right
    assert coronal.ct[1, 50] == 500 and coronal.ct[7, 95] == 700  # superior marker near the top
    assert (axial.aspect, coronal.aspect) == pytest.approx((0.9 / 0.8, 3.0 / 0.8))
    assert (axial.edges, coronal.edges) == (("A", "P", "R", "L"), ("S", "I", "R", "L"))
    marker = np.zeros(ct.shape, bool)
    marker[UPRIGHT_CENTRE] = True
    assert overlay.centre_ijk == tuple(np.argwhere(store(marker))[0][::-1])
    assert overlay.centred_on == "centre of the fused GTV" and overlay.entropy_max == pytest.approx(0.6931)


def test_overlay_centre_falls_back_to_the_reference_then_the_volume_centre():
    ct, _, reference, _ = upright_case()
    empty = np.zeros_like(reference)
    on_reference = overlay_views(ct, empty, reference, None, UPRIGHT_SPACING_ZYX, IDENTITY)
    assert on_reference.centred_on == "centre of the reference" and on_reference.centre_ijk == (50, 62, 6)
    assert on_reference.entropy_max is None and on_reference.views[0].entropy is None
    neither = overlay_views(ct, empty, empty, np.zeros(ct.shape, np.float32), UPRIGHT_SPACING_ZYX, IDENTITY)
    assert "volume centre" in neither.centred_on and neither.centre_ijk == (50, 60, 7)
    assert neither.views[0].ct.shape == ct.shape[1:]  # nothing to crop to


@pytest.fixture
def overlay_folder(tmp_path):
    """Cases 'upright' (identity direction), 'flipped' (superior axis flipped) and 'no_ct' (no CT image)."""
    folders = {name: tmp_path / name for name in ("fused", "labels", "images")}
    for folder in folders.values():
        folder.mkdir()
    ct, fused, reference, entropy = upright_case()
    for case, orientation in (("upright", "identity"), ("flipped", "flipped superior"), ("no_ct", "identity")):
        store, direction, spacing = ORIENTED[orientation]
        write = {"spacing": spacing[::-1], "direction": direction}
        write_image(folders["labels"] / f"{case}.nii.gz", store(reference).astype(np.uint8), **write)
        write_image(folders["fused"] / f"{case}.nii.gz", store(fused).astype(np.uint8), **write)
        write_image(folders["fused"] / f"{case}_entropy.nii.gz", store(entropy), **write)
        if case != "no_ct":
            write_image(folders["images"] / f"{case}_0000.nii.gz", store(ct), **write)
    return folders


def test_cli_images_write_one_overlay_per_case_linked_from_the_report(overlay_folder):
    fused, labels, images = overlay_folder["fused"], overlay_folder["labels"], overlay_folder["images"]
    out = fused.parent / "report"
    assert main(["-p", str(fused), "-r", str(labels), "--images", str(images), "-o", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Cases" in report
    for case in ("upright", "flipped"):
        png = out / f"overlay_{case}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 0 < png.stat().st_size < 150_000
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.size[0] > 400 and image.size[1] > 200
        assert f"![{case}](overlay_{case}.png)" in report
    assert not (out / "overlay_no_ct.png").exists()
    assert "no_ct: no CT image no_ct_0000.nii.gz" in report
    doc = json.loads((out / "evaluation.json").read_text())
    assert doc["overlays"] == {"upright": "overlay_upright.png", "flipped": "overlay_flipped.png"}

    plain = fused.parent / "plain"
    assert main(["-p", str(fused), "-r", str(labels), "-o", str(plain)]) == 0
    assert not list(plain.glob("overlay_*")) and "## Cases" not in (plain / "report.md").read_text()


def test_cli_missing_images_folder_fails_naming_it(overlay_folder, capsys):
    fused, labels = overlay_folder["fused"], overlay_folder["labels"]
    missing = fused.parent / "no_such_images"
    assert main(["-p", str(fused), "-r", str(labels), "--images", str(missing)]) == 2
    assert f"{missing}: CT images folder does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- several labels


def brute_nsd(pred: np.ndarray, ref: np.ndarray, spacing, tolerance: float) -> float:
    pairwise = cdist(brute_surface_points(pred, spacing), brute_surface_points(ref, spacing))
    within = (pairwise.min(axis=1) <= tolerance).sum() + (pairwise.min(axis=0) <= tolerance).sum()
    return within / sum(pairwise.shape)


@pytest.fixture
def two_label_folder(tmp_path):
    """GTVp as the binary cases above, plus a GTVnd node that case_b misses and case_a shifts."""
    fused_dir, labels = tmp_path / "fused", tmp_path / "labels"
    fused_dir.mkdir()
    labels.mkdir()
    node = box((1, 3), (15, 18), (18, 21)) * 2
    shifted = box((1, 3), (16, 19), (18, 21)) * 2
    nodes = {"case_a": shifted, "case_b": np.zeros(SHAPE, np.uint8), "case_c": node}
    rows = []
    for case, fused in FUSED.items():
        write_image(labels / f"{case}.nii.gz", REF + node)
        write_image(fused_dir / f"{case}.nii.gz", fused + nodes[case])
        node_vvc = {"a": 0.2, "b": 0.9, "c": 0.1}[case[-1]]
        rows.append({"case": case, "vvc": 0.1, "vvc_GTVp": VVC[case], "vvc_GTVnd": node_vvc})
    with open(fused_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (fused_dir / "summary.json").write_text(json.dumps({"inputs": [], "label_names": ["background", "GTVp", "GTVnd"],
                                                        "cases": rows}))
    return fused_dir, labels, nodes, node


def test_every_label_is_scored_in_one_run_with_nsd_and_its_own_vvc(two_label_folder, capsys):
    fused_dir, labels, nodes, node = two_label_folder
    assert main(["-p", str(fused_dir), "-r", str(labels), "--nsd-tolerance-mm", "1.5"]) == 0
    out = fused_dir / "evaluation"
    with open(out / "metrics.csv", newline="") as handle:
        rows = {(r["case"], r["label_name"]): r for r in csv.DictReader(handle)}
    assert len(rows) == 6
    expected_dice = {}
    for case, fused in FUSED.items():
        for name, prediction, reference in (("GTVp", fused, REF), ("GTVnd", nodes[case], node)):
            row = rows[(case, name)]
            pred, ref = prediction.astype(bool), reference.astype(bool)
            dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
            expected_dice[(case, name)] = dice
            assert float(row["dice"]) == pytest.approx(dice, abs=1e-6)
            nsd = brute_nsd(pred, ref, SPACING_ZYX, 1.5) if pred.any() else 0.0
            assert float(row["nsd"]) == pytest.approx(nsd, abs=1e-6)  # metrics.csv keeps 6 digits
        assert float(rows[(case, "GTVnd")]["vvc"]) == {"a": 0.2, "b": 0.9, "c": 0.1}[case[-1]]
    doc = json.loads((out / "evaluation.json").read_text())
    assert doc["labels"]["evaluated"] == {"1": "GTVp", "2": "GTVnd"}
    node_dice = [expected_dice[(c, "GTVnd")] for c in FUSED]
    assert doc["summary_per_label"]["GTVnd"]["fused"]["dice"]["mean"] == pytest.approx(np.mean(node_dice))
    case_mean = [(expected_dice[(c, "GTVp")] + expected_dice[(c, "GTVnd")]) / 2 for c in FUSED]
    assert doc["summary"]["fused"]["dice"]["mean"] == pytest.approx(np.mean(case_mean))
    per_label = doc["vvc_vs_1_minus_dice_per_label"]
    assert per_label["GTVnd"]["vvc"] == [0.2, 0.9, 0.1]
    assert per_label["GTVnd"]["spearman_rho"] == pytest.approx(1.0)  # the missed node has the highest VVC
    assert per_label["GTVp"]["vvc"] == list(VVC.values())
    for name in ("GTVp", "GTVnd"):
        assert (out / f"vvc_vs_1_minus_dice_{name}.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "Per label:" in report and "| GTVnd | fused | 3 |" in report and "| case_b | GTVnd | 0.0000 |" in report

    assert main(["-p", str(fused_dir), "-r", str(labels), "--label", "2", "-o", str(fused_dir / "nodes")]) == 0
    only = json.loads((fused_dir / "nodes" / "evaluation.json").read_text())
    assert {row["label_name"] for row in only["metrics"]} == {"GTVnd"}
    assert only["summary"]["fused"]["dice"]["mean"] == pytest.approx(np.mean(node_dice))
    assert main(["-p", str(fused_dir), "-r", str(labels), "--label", "3", "-o", str(fused_dir / "none")]) == 2
    assert "--label 3 is not a foreground label" in capsys.readouterr().err
