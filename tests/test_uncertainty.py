"""gtv-uncertainty: fusion math, uncertainty, geometry, summaries, bad inputs and CLI behaviour.

Model folders are written with nnU-Net's layout (``<case>.npz`` with ``probabilities`` via
``np.savez_compressed``, ``<case>.pkl`` properties, ``plans.json``, ``dataset.json``). One test produces
genuine files with nnU-Net's own planner, preprocessor and ``export_prediction_from_logits``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import kill_while_writing
from nnunetv2_gtv.cli.uncertainty import main
from nnunetv2_gtv.ensemble import DatasetInfo, FusionInputError, FusionSettings, fuse_case, open_prediction_folder
from nnunetv2_gtv.ensemble.agreement import SCORE_NAMES
from nnunetv2_gtv.ensemble.review_ranking import RISK_DIRECTION, ReviewSelection, rank_rows
from nnunetv2_gtv.io.images import write_image

SHAPE = (9, 20, 24)  # z, y, x
SPACING = (0.7, 0.9, 3.1)  # x, y, z
ORIGIN = (-12.5, 40.25, 101.0)
ANGLE = 0.5
DIRECTION = (math.cos(ANGLE), -math.sin(ANGLE), 0.0, math.sin(ANGLE), math.cos(ANGLE), 0.0, 0.0, 0.0, -1.0)
PLANS = {"dataset_name": "Dataset991_Test", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
         "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {}}
DATASET = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "GTV": 1}, "numTraining": 2,
           "file_ending": ".nii.gz"}
COLUMNS_6 = (["case", "n_models"] + [f"volume_ml_model_{i}" for i in range(1, 7)]
             + ["volume_ml_fused", "vvc", "components_removed", "review", "review_rank", "missing_models",
                "pairwise_dice_mean", "pairwise_dice_min", "agreement", "entropy_in_fused", "soft_dice"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A CT with anisotropic spacing, an off-centre origin and an oblique, flipped direction."""
    path = tmp_path_factory.mktemp("ct") / "ref_0000.nii.gz"
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, SHAPE).astype(np.int16))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path))
    return path


def nnunet_properties(ct: Path) -> dict:
    """Properties as nnU-Net's DefaultPreprocessor.run_case stores them for an image that needs no cropping."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    data, properties = SimpleITKIO().read_images([str(ct)])
    shape = data.shape[1:]
    properties.update(shape_before_cropping=shape, bbox_used_for_cropping=[[0, s] for s in shape],
                      shape_after_cropping_and_before_resampling=shape)
    return properties


@pytest.fixture(scope="module")
def properties(reference) -> dict:
    return nnunet_properties(reference)


@pytest.fixture(scope="module")
def voxel_ml(reference) -> float:
    return float(np.prod(sitk.ReadImage(str(reference)).GetSpacing())) / 1000


def binary(foreground: np.ndarray) -> np.ndarray:
    foreground = np.asarray(foreground, dtype=np.float32)
    return np.stack([1 - foreground, foreground])


def write_model(folder: Path, cases: dict[str, np.ndarray], properties: dict, plans: dict = PLANS,
                dataset: dict = DATASET) -> Path:
    """One model's folder exactly as nnUNetv2_predict --save_probabilities lays it out."""
    folder.mkdir(parents=True, exist_ok=True)
    for case, probabilities in cases.items():
        np.savez_compressed(folder / f"{case}.npz", probabilities=probabilities.astype(np.float32))
        with open(folder / f"{case}.pkl", "wb") as f:
            pickle.dump(properties, f)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


def write_models(root: Path, per_model: list[dict[str, np.ndarray]], properties: dict, **kwargs) -> list[str]:
    return [str(write_model(root / f"model_{i}", cases, properties, **kwargs)) for i, cases in enumerate(per_model, 1)]


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def vote_models(votes: np.ndarray, n: int = 6) -> list[dict[str, np.ndarray]]:
    """Model m says foreground (p = 0.75) where m < votes, background (p = 0.25) elsewhere."""
    return [{"case_a": binary(np.where(votes > m, 0.75, 0.25))} for m in range(n)]


def stripes() -> np.ndarray:
    """Vote count k = x // 3 (0..6) in x < 21, 0 beyond."""
    votes = np.zeros(SHAPE, dtype=int)
    votes[..., :21] = np.arange(21) // 3
    return votes


def test_vote_entropy_matches_closed_form_and_mean_decides(tmp_path, properties):
    votes = stripes()
    folders = write_models(tmp_path, vote_models(votes), properties)
    assert main(["-i", *folders, "-o", str(tmp_path / "out"), "--save-probability", "-np", "1"]) == 0

    entropy = read(tmp_path / "out" / "case_a_entropy.nii.gz")
    assert entropy.dtype == np.float32
    for k in range(7):
        p = k / 6
        expected = -sum(f * math.log(f) for f in (p, 1 - p) if f > 0)
        np.testing.assert_allclose(entropy[votes == k], expected, rtol=1e-6, atol=1e-7)
    assert sorted({round(float(v), 2) for v in np.unique(entropy)}) == [0.0, 0.45, 0.64, 0.69]
    # mean foreground probability (0.75 k + 0.25 (6 - k)) / 6; k = 3 ties at 0.5 and, as argmax, picks background
    probability = read(tmp_path / "out" / "case_a_probability.nii.gz")
    np.testing.assert_allclose(probability, (0.25 * 6 + 0.5 * votes) / 6, rtol=1e-6)
    np.testing.assert_array_equal(read(tmp_path / "out" / "case_a.nii.gz"), (votes >= 4).astype(np.uint8))


def test_weighted_mean_argmax_and_mean_entropy_are_exact(tmp_path, properties):
    rng = np.random.default_rng(1)
    maps = [rng.dirichlet([1, 1, 1], size=SHAPE).transpose(3, 0, 1, 2).astype(np.float32) for _ in range(3)]
    weights = [1.0, 2.0, 3.0]
    dataset = {**DATASET, "labels": {"background": 0, "GTV": 1, "node": 2}}
    folders = write_models(tmp_path, [{"c": m} for m in maps], properties, dataset=dataset)
    out = tmp_path / "out"
    assert main(["-i", *folders, "-o", str(out), "--weights", *map(str, weights), "--keep-all-components",
                 "--save-probability", "--entropy", "mean-probability", "-np", "1"]) == 0

    mean = sum(w * m.astype(np.float64) for w, m in zip(weights, maps)) / sum(weights)
    np.testing.assert_array_equal(read(out / "c.nii.gz"), mean.argmax(axis=0))
    np.testing.assert_allclose(read(out / "c_probability.nii.gz"), mean[1] + mean[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(read(out / "c_entropy.nii.gz"), -(mean * np.log(mean)).sum(axis=0), rtol=1e-5, atol=1e-6)


def test_outputs_reproduce_the_reference_geometry(tmp_path, reference, properties):
    folders = write_models(tmp_path, vote_models(stripes(), 2), properties)
    assert main(["-i", *folders, "-o", str(tmp_path / "out"), "--save-probability", "-np", "1"]) == 0
    ct = sitk.ReadImage(str(reference))
    expected_types = {"case_a.nii.gz": "8-bit unsigned integer", "case_a_entropy.nii.gz": "32-bit float",
                      "case_a_probability.nii.gz": "32-bit float"}
    for name, pixel_type in expected_types.items():
        image = sitk.ReadImage(str(tmp_path / "out" / name))
        assert image.GetPixelIDTypeAsString() == pixel_type
        assert image.GetSize() == ct.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), ct.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), ct.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(image.GetDirection(), ct.GetDirection(), atol=1e-6)


def blocks() -> np.ndarray:
    """A 48-voxel block, an 8-voxel block apart from it, and one voxel touching the big block at a corner only."""
    mask = np.zeros(SHAPE, dtype=np.float32)
    mask[1:4, 2:6, 2:6] = 1
    mask[5:7, 12:14, 12:14] = 1
    mask[4, 6, 6] = 1
    return mask


@pytest.mark.parametrize("options, kept_voxels, removed", [
    ([], 48, 2),
    (["--connectivity", "26"], 49, 1),
    (["--min-component-ml", "0.01"], 56, 1),
    (["--keep-all-components"], 57, 0),
])
def test_connected_component_rule(tmp_path, properties, voxel_ml, options, kept_voxels, removed):
    mask = blocks()
    folders = write_models(tmp_path, [{"c": binary(mask)}] * 2, properties)
    assert main(["-i", *folders, "-o", str(tmp_path / "out"), "-np", "1", *options]) == 0
    fused = read(tmp_path / "out" / "c.nii.gz")
    assert fused.sum() == kept_voxels
    assert fused[1:4, 2:6, 2:6].all()
    assert 8 * voxel_ml > 0.01 > voxel_ml  # the 8-voxel block is above the threshold, the single voxel below
    row = read_csv(tmp_path / "out" / "summary.csv")[0]
    assert int(row["components_removed"]) == removed
    assert float(row["volume_ml_fused"]) == pytest.approx(kept_voxels * voxel_ml, abs=1e-6)
    assert float(row["volume_ml_model_1"]) == pytest.approx(57 * voxel_ml, abs=1e-6)


def test_volumes_vvc_review_and_summary_contract(tmp_path, properties, voxel_ml):
    sizes = [8, 12, 16, 20, 24, 28]  # model m segments the first sizes[m] voxels in C order (one component)
    per_model = []
    for n in sizes:
        foreground = np.zeros(int(np.prod(SHAPE)), dtype=np.float32)
        foreground[:n] = 1
        per_model.append({"c": binary(foreground.reshape(SHAPE))})
    folders = write_models(tmp_path, per_model, properties)
    out = tmp_path / "out"
    assert main(["-i", *folders, "-o", str(out), "--vvc-threshold", "0.3", "-np", "1"]) == 0

    volumes = [n * voxel_ml for n in sizes]
    vvc = statistics.pstdev(volumes) / statistics.mean(volumes)  # 0.38
    with open(out / "summary.csv") as f:
        assert next(csv.reader(f)) == COLUMNS_6
    row = read_csv(out / "summary.csv")[0]
    assert row["case"] == "c" and row["n_models"] == "6" and row["missing_models"] == ""
    for i, v in enumerate(volumes, start=1):
        assert float(row[f"volume_ml_model_{i}"]) == pytest.approx(v, abs=1e-6)
    assert float(row["volume_ml_fused"]) == pytest.approx(16 * voxel_ml, abs=1e-6)  # voxels with >= 4 of 6 votes
    assert float(row["vvc"]) == pytest.approx(vvc, abs=1e-6)
    assert row["review"] == "true"

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"command", "versions", "label_names", "inputs", "weights", "settings", "review",
                            "cases"}
    assert summary["label_names"] == ["background", "GTV"]
    assert summary["command"].startswith("gtv-uncertainty -i ")
    assert set(summary["versions"]) == {"nnunetv2_gtv", "nnunetv2", "torch", "numpy", "SimpleITK"}
    assert summary["inputs"] == [str(Path(f).resolve()) for f in folders]
    assert summary["weights"] == [1.0] * 6
    assert summary["settings"]["connectivity"] == 6 and summary["settings"]["vvc_threshold"] == 0.3
    assert list(summary["cases"][0]) == COLUMNS_6
    assert summary["cases"][0]["missing_models"] == []

    assert main(["-i", *folders, "-o", str(tmp_path / "calm"), "--vvc-threshold", "0.5", "-np", "1"]) == 0
    assert read_csv(tmp_path / "calm" / "summary.csv")[0]["review"] == "false"


def test_one_model_fuses_with_warning_and_empty_vvc(tmp_path, properties, capsys):
    folders = write_models(tmp_path, vote_models(stripes(), 1), properties)
    assert main(["-i", *folders, "-o", str(tmp_path / "out"), "-np", "1"]) == 0
    assert "uncertainty needs N >= 2" in capsys.readouterr().err
    assert not read(tmp_path / "out" / "case_a_entropy.nii.gz").any()
    row = read_csv(tmp_path / "out" / "summary.csv")[0]
    assert row["vvc"] == "" and row["n_models"] == "1" and row["review"] == "false"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["cases"][0]["vvc"] is None


def test_all_models_empty_leaves_vvc_undefined_and_asks_for_review(tmp_path, properties):
    folders = write_models(tmp_path, [{"c": binary(np.zeros(SHAPE))}] * 3, properties)
    assert main(["-i", *folders, "-o", str(tmp_path / "out"), "-np", "1"]) == 0
    row = read_csv(tmp_path / "out" / "summary.csv")[0]
    assert row["vvc"] == "" and row["review"] == "true" and float(row["volume_ml_fused"]) == 0


def test_different_case_sets_are_listed_or_fused_with_allow_missing(tmp_path, properties, capsys):
    a, b = binary(blocks()), binary(np.zeros(SHAPE))
    folders = write_models(tmp_path, [{"c1": a, "c2": a}, {"c1": a}, {"c1": a, "c2": b}], properties)
    assert main(["-i", *folders, "-o", str(tmp_path / "out"), "-np", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{folders[1]} lacks 1 case(s): c2" in err and "--allow-missing" in err
    assert not (tmp_path / "out").exists()

    assert main(["-i", *folders, "-o", str(tmp_path / "out"), "--allow-missing", "-np", "1"]) == 0
    rows = {r["case"]: r for r in read_csv(tmp_path / "out" / "summary.csv")}
    assert rows["c1"]["missing_models"] == "" and rows["c1"]["n_models"] == "3"
    assert rows["c2"]["missing_models"] == "2" and rows["c2"]["n_models"] == "2"
    assert rows["c2"]["volume_ml_model_2"] == "" and float(rows["c2"]["volume_ml_model_3"]) == 0
    cases = json.loads((tmp_path / "out" / "summary.json").read_text())["cases"]
    assert [c["missing_models"] for c in cases] == [[], [2]]


def _no_output_for(out: Path, case: str) -> bool:
    names = [p.name for p in out.iterdir()] if out.is_dir() else []
    return not any(n.startswith(case) or n.startswith("." + case) or ".tmp" in n for n in names)


def _corrupt(npz: Path) -> None:
    npz.write_bytes(b"PK\x03\x04 this is not a zip archive")


def _truncate(npz: Path) -> None:
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])


def _other_key(npz: Path) -> None:
    np.savez_compressed(npz, softmax=binary(blocks()))


def _set_voxel(value: float):
    def damage(npz: Path) -> None:
        p = np.load(npz)["probabilities"]
        p[:, 3, 4, 5] = value
        np.savez_compressed(npz, probabilities=p)
    return damage


def _bad_sum(npz: Path) -> None:
    p = np.load(npz)["probabilities"]
    p[0, 2] = 0.7
    np.savez_compressed(npz, probabilities=p)


def _other_shape(npz: Path) -> None:
    np.savez_compressed(npz, probabilities=binary(np.zeros((9, 20, 23))))


def _other_shape_both(npz: Path) -> None:
    _other_shape(npz)
    properties = pickle.loads(npz.with_suffix(".pkl").read_bytes())
    properties["shape_before_cropping"] = (9, 20, 23)
    npz.with_suffix(".pkl").write_bytes(pickle.dumps(properties))


def _other_origin(npz: Path) -> None:
    properties = pickle.loads(npz.with_suffix(".pkl").read_bytes())
    properties["sitk_stuff"] = {**properties["sitk_stuff"], "origin": (0.0, 0.0, 0.0)}
    npz.with_suffix(".pkl").write_bytes(pickle.dumps(properties))


@pytest.mark.parametrize("damage, message", [
    (_corrupt, "not a readable npz file"),
    (_truncate, "not a readable npz file"),
    (_other_key, "no 'probabilities' array (holds softmax)"),
    (_set_voxel(np.nan), "contains NaN"),
    (_set_voxel(np.inf), "contains inf"),
    (_bad_sum, "do not sum to 1"),
    (_other_shape, "describes an image of shape (9, 20, 24)"),
    (_other_shape_both, "probability shape (2, 9, 20, 23)"),
    (_other_origin, "geometry 'sitk_stuff'"),
])
def test_bad_case_fails_alone_and_leaves_nothing(tmp_path, properties, capsys, damage, message):
    good = binary(blocks())
    folders = write_models(tmp_path, [{"bad": good, "good": good}] * 3, properties)
    out = tmp_path / "out"
    assert main(["-i", *folders, "-o", str(out), "-np", "1"]) == 0
    damage(Path(folders[1]) / "bad.npz")
    assert main(["-i", *folders, "-o", str(out), "-np", "1"]) == 1
    err = capsys.readouterr().err
    assert message in err and "case bad" in err and folders[1] in err
    assert _no_output_for(out, "bad") and not (out / "per_case" / "bad.json").exists()
    assert (out / "good.nii.gz").is_file()
    assert [r["case"] for r in read_csv(out / "summary.csv")] == ["good"]


def test_damaged_member_data_is_caught_by_its_crc(tmp_path, properties):
    """Bytes changed inside a stored member, still valid probabilities: only the zip CRC can tell."""
    folders = write_models(tmp_path, [{"c": binary(blocks())}] * 2, properties)
    npz = Path(folders[0]) / "c.npz"
    np.savez(npz, probabilities=binary(np.full(SHAPE, 0.5)))  # stored, not deflated
    data = bytearray(npz.read_bytes())
    first_value = data.index(np.full(4, 0.5, dtype=np.float32).tobytes())
    voxels = int(np.prod(SHAPE))
    data[first_value: first_value + 4] = np.float32(0.25).tobytes()  # background of voxel 0
    data[first_value + 4 * voxels: first_value + 4 * voxels + 4] = np.float32(0.75).tobytes()  # its foreground
    npz.write_bytes(bytes(data))
    with pytest.raises(FusionInputError, match=r"c\.npz: corrupt npz data \(Bad CRC-32"):
        fuse_case("c", [npz, Path(folders[1]) / "c.npz"], tmp_path / "out", DatasetInfo(".nii.gz", 2))
    assert _no_output_for(tmp_path / "out", "c")


def test_differing_labels_between_folders_are_rejected(tmp_path, properties, capsys):
    folders = write_models(tmp_path, [{"c": binary(blocks())}] * 2, properties)
    (Path(folders[1]) / "dataset.json").write_text(json.dumps({**DATASET, "labels": {"background": 0, "tumour": 1}}))
    assert main(["-i", *folders, "-o", str(tmp_path / "out"), "-np", "1"]) == 2
    err = capsys.readouterr().err
    assert "'labels' differs" in err and folders[0] in err and folders[1] in err


def test_missing_pkl_and_region_labels_are_rejected(tmp_path, properties, capsys):
    folders = write_models(tmp_path, [{"c": binary(blocks())}] * 2, properties)
    (Path(folders[0]) / "c.pkl").unlink()
    assert main(["-i", *folders, "-o", str(tmp_path / "out")]) == 2
    assert "case c has c.npz but no c.pkl" in capsys.readouterr().err

    regions = {**DATASET, "labels": {"background": 0, "GTV": [1]}, "regions_class_order": [1]}
    with pytest.raises(FusionInputError, match="region-based"):
        open_prediction_folder(write_model(tmp_path / "regions", {"c": binary(blocks())}, properties, dataset=regions))


def test_unwritable_output_folder(tmp_path, properties, capsys):
    folders = write_models(tmp_path, [{"c": binary(blocks())}] * 2, properties)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["-i", *folders, "-o", str(blocker / "out")]) == 2
    assert f"output folder {blocker / 'out'} is not writable" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, properties):
    folders = write_models(tmp_path, [{"c": binary(blocks())}] * 2, properties)
    for options in (["--weights", "1"], ["--weights", "1", "-1"], ["-num_parts", "2", "-part_id", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["-i", *folders, "-o", str(tmp_path / "out"), *options])
        assert exit_info.value.code == 2
    assert main(["-i", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")]) == 2


def test_continue_skips_finished_cases_and_reruns_changed_settings(tmp_path, properties, capsys):
    folders = write_models(tmp_path, [{"c1": binary(blocks()), "c2": binary(blocks())}] * 2, properties)
    out = tmp_path / "out"
    assert main(["-i", *folders, "-o", str(out), "-np", "1"]) == 0
    stamp = (out / "c1.nii.gz").stat().st_mtime_ns
    (out / "c2_entropy.nii.gz").unlink()
    capsys.readouterr()
    assert main(["-i", *folders, "-o", str(out), "-np", "1", "--continue"]) == 0
    assert "1 already finished, 1 to fuse" in capsys.readouterr().out
    assert (out / "c1.nii.gz").stat().st_mtime_ns == stamp and (out / "c2_entropy.nii.gz").is_file()
    assert [r["case"] for r in read_csv(out / "summary.csv")] == ["c1", "c2"]

    assert main(["-i", *folders, "-o", str(out), "-np", "1", "--continue", "--connectivity", "26"]) == 0
    assert "0 already finished, 2 to fuse" in capsys.readouterr().out


def _tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_output_folder_that_is_inside_or_holds_an_input_is_refused(tmp_path, properties, capsys):
    folders = write_models(tmp_path / "models", [{"c": binary(blocks())}] * 3, properties)
    before = _tree(tmp_path)
    for out in (folders[0], Path(folders[1]) / "fused", tmp_path / "models"):
        assert main(["-i", *folders, "-o", str(out)]) == 2
        error = capsys.readouterr().err
        assert f"output folder {out}" in error and "input folder" in error
    assert _tree(tmp_path) == before and not (Path(folders[1]) / "fused").exists()


def test_a_resumed_run_removes_temporary_files_that_no_live_process_owns(tmp_path, properties, capsys):
    from nnunetv2_gtv.io.atomic import temporary_path

    folders = write_models(tmp_path, [{"c1": binary(blocks()), "c2": binary(blocks())}] * 2, properties)
    out = tmp_path / "out"
    assert main(["-i", *folders, "-o", str(out), "-np", "1"]) == 0
    (out / "c2.nii.gz").unlink()  # as if the run had been killed while writing c2
    kill_while_writing(out / "c2.nii.gz")
    kill_while_writing(out / "per_case" / "c2.json")
    stale = [p for p in out.rglob(".*") if p.is_file()]
    assert len(stale) == 2
    live = temporary_path(out / "c1_entropy.nii.gz", ".nii.gz")  # this process is alive: its file is kept
    live.write_bytes(b"being written")
    unrelated = out / ".c1.nii.gz.notes.tmp"  # not the writer's naming scheme
    unrelated.write_text("")
    capsys.readouterr()
    assert main(["-i", *folders, "-o", str(out), "-np", "1", "--continue"]) == 0
    assert "1 already finished, 1 to fuse" in capsys.readouterr().out
    assert not any(p.exists() for p in stale)
    assert live.is_file() and unrelated.is_file() and (out / "c2.nii.gz").is_file()


def test_parts_shard_like_nnunet_and_summary_joins_them(tmp_path, properties):
    cases = {f"c{i}": binary(blocks()) for i in range(3)}
    folders = write_models(tmp_path, [cases] * 2, properties)
    out = tmp_path / "out"
    assert main(["-i", *folders, "-o", str(out), "-np", "1", "-num_parts", "2", "-part_id", "1"]) == 0
    assert sorted(p.name for p in out.glob("c*.nii.gz") if "_" not in p.name) == ["c1.nii.gz"]
    assert main(["-i", *folders, "-o", str(out), "-np", "1", "-num_parts", "2", "-part_id", "0"]) == 0
    assert [r["case"] for r in read_csv(out / "summary.csv")] == ["c0", "c1", "c2"]


def test_validation_folder_layouts(tmp_path, properties):
    model = tmp_path / "Dataset991_Test" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    for fold, case in ((0, "a"), (1, "b")):
        validation = model / f"fold_{fold}" / "validation"
        validation.mkdir(parents=True)
        np.savez_compressed(validation / f"{case}.npz", probabilities=binary(blocks()))
        (validation / f"{case}.pkl").write_bytes(pickle.dumps(properties))
        (validation / "summary.json").write_text("{}")
    (model / "plans.json").write_text(json.dumps(PLANS))
    (model / "dataset.json").write_text(json.dumps(DATASET))

    assert set(open_prediction_folder(model).cases) == {"a", "b"}
    assert set(open_prediction_folder(model / "fold_1").cases) == {"b"}
    assert set(open_prediction_folder(model / "fold_0" / "validation").cases) == {"a"}
    assert main(["-i", str(model), str(model), "-o", str(tmp_path / "out"), "-np", "1"]) == 0
    assert (tmp_path / "out" / "b_entropy.nii.gz").is_file()


def test_python_api_with_a_missing_model(tmp_path, properties):
    folders = write_models(tmp_path, vote_models(stripes(), 3), properties)
    files = [Path(f) / "case_a.npz" for f in folders]
    result = fuse_case("case_a", [files[0], None, *files[1:]], tmp_path / "out", DatasetInfo(".nii.gz", 2),
                       FusionSettings(components="all"))
    assert result.n_models == 3 and result.missing_models == (2,)
    assert result.model_volumes_ml[1] is None
    assert [p.name for p in result.outputs] == ["case_a.nii.gz", "case_a_entropy.nii.gz"]


def test_float_maps_keep_geometry_through_nibabel_writer(tmp_path, reference):
    nibabel = pytest.importorskip("nibabel")
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO

    _, properties = NibabelIO().read_images([str(reference)])
    values = np.random.default_rng(3).uniform(size=SHAPE[::-1]).astype(np.float32)  # NibabelIO arrays are x, y, z
    target = write_image(values, tmp_path / "map.nii.gz", ".nii.gz", properties, "NibabelIO")
    written = nibabel.load(str(target))
    assert written.get_data_dtype() == np.float32
    np.testing.assert_allclose(written.affine, nibabel.load(str(reference)).affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), values)


def test_parallel_cli_process(tmp_path, properties):
    folders = write_models(tmp_path, [{"c1": binary(blocks()), "c2": binary(blocks())}] * 2, properties)
    done = subprocess.run([sys.executable, "-m", "nnunetv2_gtv.cli.uncertainty", "-i", *folders, "-o",
                           str(tmp_path / "out"), "-np", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(read_csv(tmp_path / "out" / "summary.csv")) == 2
    _corrupt(Path(folders[0]) / "c2.npz")
    done = subprocess.run([sys.executable, "-m", "nnunetv2_gtv.cli.uncertainty", "-i", *folders, "-o",
                           str(tmp_path / "out"), "-np", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "c2.npz: not a readable npz file" in done.stderr


_REAL_NNUNET_FILES = textwrap.dedent("""
    import os, sys
    import numpy as np, torch
    from nnunetv2_gtv.demo.synthetic import write_dataset

    def main(root, ct):
        write_dataset(os.environ['nnUNet_raw'], 991, num_train=2, num_test=0, in_plane_size=32, num_slices=10)
        from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
        from nnunetv2.inference.export_prediction import export_prediction_from_logits
        extract_fingerprints([991], num_processes=1, check_dataset_integrity=False)
        plan_experiments([991])
        preprocessed = os.path.join(os.environ['nnUNet_preprocessed'], 'Dataset991_SyntheticGTV')
        plans = load_json(os.path.join(preprocessed, 'nnUNetPlans.json'))
        dataset = load_json(os.path.join(preprocessed, 'dataset.json'))
        plans_manager = PlansManager(plans)
        configuration = plans_manager.get_configuration('3d_fullres')
        data, _, properties = DefaultPreprocessor(verbose=False).run_case([ct], None, plans_manager, configuration,
                                                                          dataset)
        logits = torch.from_numpy(np.random.default_rng(0).normal(0, 2, (2, *data.shape[1:])).astype(np.float32))
        os.makedirs(os.path.join(root, 'real'))
        export_prediction_from_logits(logits, properties, configuration, plans_manager, dataset,
                                      os.path.join(root, 'real', 'ref'), save_probabilities=True, num_threads_torch=1)

    if __name__ == '__main__':
        main(sys.argv[1], sys.argv[2])
""")


def test_files_written_by_nnunet_export(tmp_path, reference, properties):
    """Plans from nnU-Net's planner, properties from its preprocessor, npz/pkl/seg from its own export."""
    script = tmp_path / "make_real.py"
    script.write_text(_REAL_NNUNET_FILES)
    env = {**os.environ, **{k: str(tmp_path / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(reference)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    real = tmp_path / "real"
    real_properties = pickle.loads((real / "ref.pkl").read_bytes())
    assert set(real_properties) == set(properties)  # the hand-made properties of the other tests match nnU-Net's
    assert real_properties["sitk_stuff"] == properties["sitk_stuff"]

    preprocessed = tmp_path / "nnUNet_preprocessed" / "Dataset991_SyntheticGTV"
    folders = []
    for name in ("m1", "m2"):
        folder = tmp_path / name
        folder.mkdir()
        for f in ("ref.npz", "ref.pkl"):
            shutil.copy(real / f, folder / f)
        shutil.copy(preprocessed / "nnUNetPlans.json", folder / "plans.json")
        shutil.copy(preprocessed / "dataset.json", folder / "dataset.json")
        folders.append(str(folder))
    out = tmp_path / "out"
    assert main(["-i", *folders, "-o", str(out), "--keep-all-components", "-np", "1"]) == 0
    np.testing.assert_array_equal(read(out / "ref.nii.gz"), read(real / "ref.nii.gz"))
    ours, theirs = sitk.ReadImage(str(out / "ref.nii.gz")), sitk.ReadImage(str(real / "ref.nii.gz"))
    assert (ours.GetSize(), ours.GetSpacing(), ours.GetOrigin(), ours.GetDirection()) == \
           (theirs.GetSize(), theirs.GetSpacing(), theirs.GetOrigin(), theirs.GetDirection())


def test_python_api_fuses_as_the_command_and_returns_the_run(tmp_path, properties, capsys):
    """api.fuse: the command's outputs, its rows and failures as values, usage errors raised before any file."""
    from nnunetv2_gtv import api
    from nnunetv2_gtv.ensemble.errors import FusionInputError
    from nnunetv2_gtv.ensemble.fusion import FusionSettings

    good = binary(blocks())
    folders = write_models(tmp_path, [{"bad": good, "good": good}] * 3, properties)
    _corrupt(Path(folders[2]) / "bad.npz")
    run = api.fuse(folders, tmp_path / "api", FusionSettings(components="all"), num_processes=1)
    assert (run.exit_code, run.done, [r["case"] for r in run.rows]) == (1, ["good"], ["good"])
    assert len(run.failures) == 1 and "bad" in run.failures[0] and folders[2] in run.failures[0]
    assert main(["-i", *folders, "-o", str(tmp_path / "cli"), "--keep-all-components", "-np", "1"]) == 1
    np.testing.assert_array_equal(read(tmp_path / "api" / "good.nii.gz"), read(tmp_path / "cli" / "good.nii.gz"))
    assert json.loads((tmp_path / "api" / "summary.json").read_text())["settings"]["components"] == "all"
    with pytest.raises(FusionInputError, match="missing"):
        api.fuse([*folders, str(tmp_path / "missing")], tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_review_rank_orders_cases_by_the_chosen_score_and_a_budget_flags_exactly_its_share():
    rows = [{"case": "a", "vvc": 0.05, "agreement": 0.9}, {"case": "b", "vvc": 0.40, "agreement": 0.3},
            {"case": "c", "vvc": None, "agreement": None}, {"case": "d", "vvc": 0.20, "agreement": 0.6},
            {"case": "e", "vvc": 0.20, "agreement": 0.95}]
    by_vvc = {r["case"]: r["review_rank"] for r in rank_rows(rows, ReviewSelection("vvc"))}
    assert by_vvc == {"c": 1, "b": 2, "d": 3, "e": 4, "a": 5}  # undefined first, then higher VVC; ties by name
    budget = rank_rows(rows, ReviewSelection("agreement", budget=0.5))  # lower agreement is riskier
    assert {r["case"]: (r["review_rank"], r["review"]) for r in budget} == {
        "c": (1, True), "b": (2, True), "d": (3, True), "a": (4, False), "e": (5, False)}  # ceil(0.5 x 5) = 3
    two_labels = [{"case": "p", "vvc": 0.1, "vvc_GTVp": 0.1, "vvc_GTVnd": 0.9, "volume_ml_fused_GTVp": 1.0,
                   "volume_ml_fused_GTVnd": 1.0},
                  {"case": "q", "vvc": 0.3, "vvc_GTVp": 0.3, "vvc_GTVnd": 0.0, "volume_ml_fused_GTVp": 1.0,
                   "volume_ml_fused_GTVnd": 0.0}]
    assert [r["case"] for r in sorted(rank_rows(two_labels, ReviewSelection()), key=lambda r: r["review_rank"])] \
        == ["p", "q"]  # the node's VVC 0.9 makes p the riskier case
    assert set(RISK_DIRECTION) == {"vvc", *SCORE_NAMES}
    for bad in ({"score": "dice"}, {"budget": 0.0}, {"budget": 1.5}, {"threshold": math.inf},
                {"threshold": 0.5, "budget": 0.25}):
        with pytest.raises(ValueError):
            ReviewSelection(**bad)
    threshold = rank_rows(rows, ReviewSelection("agreement", threshold=0.6))  # agreement <= 0.6, or undefined
    assert {r["case"]: r["review"] for r in threshold} == {"a": False, "b": True, "c": True, "d": True, "e": False}
    assert {r["case"]: r["review"] for r in rank_rows(rows, ReviewSelection("vvc", threshold=0.2))} == {
        "a": False, "b": True, "c": True, "d": True, "e": True}  # vvc >= 0.2


def test_gtv_postprocessing_calibrates_a_review_flag_that_gtv_uncertainty_then_uses(tmp_path, properties, capsys):
    """Eight out-of-fold cases whose six models disagree more and more (k of them mark a shifted box): the fused
    Dice falls as they disagree; gtv-postprocessing stores the best-ranking score and the threshold that flags the
    riskiest quarter, and a run with the file flags the cases on the risky side of it (unless told otherwise)."""
    from nnunetv2_gtv.cli.postprocessing import main as postprocessing_main
    from nnunetv2_gtv.ensemble.postprocessing import read_postprocessing

    base, shifted = np.zeros(SHAPE), np.zeros(SHAPE)
    base[:, 4:16, 2:14], shifted[:, 4:16, 6:18] = 1, 1
    shifted_models = {f"case_{k}": k for k in range(7)} | {"case_7": 2}
    per_model = [{case: binary(0.2 + 0.6 * (shifted if m < k else base)) for case, k in shifted_models.items()}
                 for m in range(6)]
    folders = write_models(tmp_path / "models", per_model, properties)
    assert main(["-i", *folders, "-o", str(tmp_path / "cv"), "-np", "1", "--keep-all-components"]) == 0
    (tmp_path / "labels").mkdir()
    for case in shifted_models:
        reference = sitk.GetImageFromArray(base.astype(np.uint8))
        reference.CopyInformation(sitk.ReadImage(str(tmp_path / "cv" / f"{case}.nii.gz")))
        sitk.WriteImage(reference, str(tmp_path / "labels" / f"{case}.nii.gz"))
    rules = tmp_path / "pp.json"
    assert postprocessing_main(["-p", str(tmp_path / "cv"), "-r", str(tmp_path / "labels"), "-o", str(rules)]) == 0
    out = capsys.readouterr().out
    review = json.loads(rules.read_text())["review"]
    assert review["score"] in RISK_DIRECTION and review["cases"] == 8 and f"review flag: {review['score']}" in out
    cv_rows = read_csv(tmp_path / "cv" / "summary.csv")
    values = sorted((RISK_DIRECTION[review["score"]] * float(r[review["score"]]) for r in cv_rows), reverse=True)
    assert RISK_DIRECTION[review["score"]] * review["threshold"] == pytest.approx(values[1])  # ceil(8 / 4) = 2
    assert read_postprocessing(rules).review_selection(rules).threshold == review["threshold"]

    assert main(["-i", *folders, "-o", str(tmp_path / "run"), "-np", "1", "--postprocessing", str(rules)]) == 0
    assert "cases flagged, " + review["score"] in capsys.readouterr().out
    header = json.loads((tmp_path / "run" / "summary.json").read_text())["review"]
    assert header["score"] == review["score"] and header["threshold"] == review["threshold"]
    for row in read_csv(tmp_path / "run" / "summary.csv"):
        risky = RISK_DIRECTION[review["score"]] * (float(row[review["score"]]) - review["threshold"]) >= 0
        assert row["review"] == ("true" if risky else "false")
    assert main(["-i", *folders, "-o", str(tmp_path / "vvc"), "-np", "1", "--postprocessing", str(rules),
                 "--review-score", "vvc"]) == 0
    assert json.loads((tmp_path / "vvc" / "summary.json").read_text())["review"]["threshold"] is None


def test_review_budget_through_the_command(tmp_path, properties, capsys):
    """Three cases whose models disagree more and more: the budget flags the most disagreeing one, by the score
    asked for, whatever the VVC threshold says."""
    base, shifted = np.zeros(SHAPE), np.zeros(SHAPE)
    base[:, 4:16, 2:14], shifted[:, 4:16, 10:22] = 1, 1
    shifted_models = (0, 1, 3)  # case_k: that many of the six models mark the shifted box
    per_model = [{f"case_{k}": binary(0.25 + 0.5 * (shifted if m < shifted_models[k] else base)) for k in range(3)}
                 for m in range(6)]
    folders = write_models(tmp_path, per_model, properties)
    out = tmp_path / "out"
    assert main(["-i", *folders, "-o", str(out), "-np", "1", "--review-score", "pairwise_dice_mean",
                 "--review-budget", "0.34", "--vvc-threshold", "100"]) == 0
    assert "review: 2 of 3 cases flagged, the 0.34 of cases ranked riskiest by pairwise_dice_mean" in \
        capsys.readouterr().out
    rows = {r["case"]: r for r in read_csv(out / "summary.csv")}
    ranked = sorted(rows.values(), key=lambda r: float(r["pairwise_dice_mean"]))
    assert [r["case"] for r in ranked] == ["case_2", "case_1", "case_0"]
    assert [r["review_rank"] for r in ranked] == ["1", "2", "3"]
    assert [r["review"] for r in ranked] == ["true", "true", "false"]  # ceil(0.34 x 3) = 2
    header = json.loads((out / "summary.json").read_text())["review"]
    assert header["score"] == "pairwise_dice_mean" and header["budget"] == 0.34 and "lower is riskier" in \
        header["meaning"]
    with pytest.raises(SystemExit) as usage:
        main(["-i", *folders, "-o", str(tmp_path / "bad"), "--review-budget", "2"])
    assert usage.value.code == 2 and "review budget is a share of the cases in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
