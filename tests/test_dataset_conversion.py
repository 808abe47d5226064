"""gtv-dataset: patient folders -> nnU-Net raw dataset with a fixed held-out split, and its refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_gtv.cli.dataset import main

ANATOMY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "OpenKBP_anatomy"
# the 16 held-out test CTs of docs/results/real_ct.md (seed 2026)
DOCUMENTED_TEST_CTS = ["kbp_007", "kbp_021", "kbp_031", "kbp_034", "kbp_038", "kbp_042", "kbp_043", "kbp_061",
                       "kbp_068", "kbp_124", "kbp_132", "kbp_136", "kbp_139", "kbp_140", "kbp_141", "kbp_190"]


def _image(array: np.ndarray, spacing=(2.0, 2.0, 3.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def _patients(source: Path, count: int = 6) -> Path:
    """``count`` patient folders of 8x8x8 CTs with a 2x2x2 target (2 x 2 x 3 mm voxels: 0.096 ml)."""
    for index in range(count):
        folder = source / f"patient_{index}"
        folder.mkdir(parents=True)
        sitk.WriteImage(_image(np.full((8, 8, 8), -1000 + index, np.int16)), str(folder / "ct.nii.gz"))
        mask = np.zeros((8, 8, 8), np.uint8)
        mask[2:4, 2:4, 2:4] = 1
        sitk.WriteImage(_image(mask), str(folder / "PTV70.nii.gz"))
    return source


def _run(args: list, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_patient_folders_become_a_dataset_with_a_reproducible_split(tmp_path, capsys):
    source, raw = _patients(tmp_path / "source"), tmp_path / "raw"
    assert _run(["-i", source, "-o", raw, "-d", 901, "--num-test", 2, "--seed", 7], capsys)[0] == 0
    dataset = raw / "Dataset901_HeadNeckPTV70"
    split = json.loads((dataset / "split.json").read_text())
    assert len(split["train"]) == 4 and len(split["test"]) == 2 and not set(split["train"]) & set(split["test"])
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == [f"{n}_0000.nii.gz" for n in split["test"]]
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == [f"{n}.nii.gz" for n in split["train"]]
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and meta["labels"] == {"background": 0, "PTV70": 1}
    assert split["target_ml"]["patient_0"] == pytest.approx(0.1)  # 8 voxels of 12 mm^3, rounded to 0.1 ml
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset901_HeadNeckPTV70"]  # no staging folder left

    again = _run(["-i", source, "-o", tmp_path / "raw2", "-d", 901, "--num-test", 2, "--seed", 7], capsys)
    reused = _run(["-i", source, "-o", tmp_path / "raw3", "-d", 902, "--split", dataset / "split.json"], capsys)
    assert again[0] == reused[0] == 0
    for other in (tmp_path / "raw2" / "Dataset901_HeadNeckPTV70", tmp_path / "raw3" / "Dataset902_HeadNeckPTV70"):
        assert json.loads((other / "split.json").read_text())["test"] == split["test"]
    assert sorted(p.name for p in (source / "patient_0").iterdir()) == ["PTV70.nii.gz", "ct.nii.gz"]


@pytest.mark.parametrize("damage, message", [
    ("missing", "patient_3/PTV70.nii.gz: missing"),
    ("grid", "patient_3/PTV70.nii.gz: not on the CT's grid: spacing"),
    ("values", "patient_3/PTV70.nii.gz: a mask must hold only 0 and 1, found [0, 1, 2]"),
    ("empty", "patient_3/PTV70.nii.gz: the mask is empty"),
])
def test_a_bad_patient_is_named_and_nothing_is_written(tmp_path, capsys, damage, message):
    source, raw = _patients(tmp_path / "source"), tmp_path / "raw"
    mask_path = source / "patient_3" / "PTV70.nii.gz"
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path)))
    if damage == "missing":
        mask_path.unlink()
    elif damage == "grid":
        sitk.WriteImage(_image(mask, spacing=(2.0, 2.0, 2.5)), str(mask_path))
    elif damage == "values":
        mask[5, 5, 5] = 2
        sitk.WriteImage(_image(mask), str(mask_path))
    else:
        sitk.WriteImage(_image(np.zeros_like(mask)), str(mask_path))
    code, err = _run(["-i", source, "-o", raw, "-d", 901, "--num-test", 2], capsys)
    assert code == 2 and message in err and "1 of 6 patient folders cannot be used" in err, err
    assert not raw.exists() or not any(raw.iterdir())


def test_refusals(tmp_path, capsys):
    source, raw = _patients(tmp_path / "source"), tmp_path / "raw"
    code, err = _run(["-i", source, "-o", source / "raw", "-d", 901], capsys)
    assert code == 2 and "inside the source folder" in err and not (source / "raw").exists()
    code, err = _run(["-i", source, "-o", raw, "-d", 901, "--num-test", 6], capsys)
    assert code == 2 and "--num-test 6 must leave at least one" in err
    assert _run(["-i", source, "-o", raw, "-d", 901, "--num-test", 2], capsys)[0] == 0
    code, err = _run(["-i", source, "-o", raw, "-d", 901, "-n", "Other"], capsys)
    assert code == 2 and "Dataset901_HeadNeckPTV70 exists; pass --overwrite" in err
    assert _run(["-i", source, "-o", raw, "-d", 901, "-n", "Other", "--num-test", 2, "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset901_Other"]
    (tmp_path / "split.json").write_text(json.dumps({"train": ["patient_0", "nobody"], "test": ["patient_0"]}))
    code, err = _run(["-i", source, "-o", raw, "-d", 903, "--split", tmp_path / "split.json"], capsys)
    assert code == 2 and "patients not in the source: ['nobody']" in err and "both train and test: ['patient_0']" in err


@pytest.mark.skipif(not ANATOMY.is_dir(), reason=f"real CT patient folders not present at {ANATOMY}")
def test_openkbp_anatomy_gives_the_documented_split(tmp_path, capsys):
    code, _ = _run(["-i", ANATOMY, "-o", tmp_path, "-d", 920], capsys)
    assert code == 0
    dataset = tmp_path / "Dataset920_HeadNeckPTV70"
    split = json.loads((dataset / "split.json").read_text())
    assert split["test"] == DOCUMENTED_TEST_CTS and len(split["train"]) == 60
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 60
    assert len(list((dataset / "imagesTr").iterdir())) == 60 and len(list((dataset / "labelsTs").iterdir())) == 16


def _two_targets(source: Path, count: int = 5) -> Path:
    """Patient folders with a GTVp (2x2x2 voxels) and a GTVnd (one row of 3 voxels) mask each."""
    _patients(source, count)
    for index in range(count):
        folder = source / f"patient_{index}"
        (folder / "PTV70.nii.gz").rename(folder / "GTVp.nii.gz")
        node = np.zeros((8, 8, 8), np.uint8)
        node[6, 6, 1:4] = 1
        sitk.WriteImage(_image(node), str(folder / "GTVnd.nii.gz"))
    return source


def test_several_targets_become_labels_in_their_order(tmp_path, capsys):
    source = _two_targets(tmp_path / "source")
    code, _ = _run(["-i", source, "-o", tmp_path / "raw", "-d", 904, "-n", "NPC", "--target", "GTVp", "GTVnd",
                    "--num-test", 1], capsys)
    assert code == 0
    dataset = tmp_path / "raw" / "Dataset904_NPC"
    assert json.loads((dataset / "dataset.json").read_text())["labels"] == {"background": 0, "GTVp": 1, "GTVnd": 2}
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(next((dataset / "labelsTr").iterdir()))))
    assert np.count_nonzero(labels == 1) == 8 and np.count_nonzero(labels == 2) == 3
    assert labels[6, 6, 1] == 2 and labels[2, 2, 2] == 1
    split = json.loads((dataset / "split.json").read_text())
    assert split["target"] == ["GTVp", "GTVnd"] and split["target_ml"]["patient_0"] == {"GTVp": 0.1, "GTVnd": 0.0}


def test_overlapping_masks_are_refused_by_name_or_resolved_by_the_chosen_rule(tmp_path, capsys):
    source = _two_targets(tmp_path / "source")
    node = np.zeros((8, 8, 8), np.uint8)
    node[3, 3, 1:4] = 1  # (3, 3, 2) and (3, 3, 3) are GTVp voxels too
    sitk.WriteImage(_image(node), str(source / "patient_2" / "GTVnd.nii.gz"))
    args = ["-i", source, "-d", 905, "--target", "GTVp", "GTVnd", "--num-test", 1]
    code, err = _run(args + ["-o", tmp_path / "refused"], capsys)
    assert code == 2 and "patient_2: GTVp and GTVnd overlap in 2 voxels; choose --overlap later or earlier" in err
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    for rule, winner in (("later", 2), ("earlier", 1)):
        assert _run(args + ["-o", tmp_path / rule, "--overlap", rule, "--split", _split(tmp_path, "patient_2")],
                    capsys)[0] == 0
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / rule / "Dataset905_HeadNeckPTV70" / "labelsTs"
                                                           / "patient_2.nii.gz")))
        assert labels[3, 3, 2] == winner and labels[3, 3, 1] == 2
        assert np.count_nonzero(labels == 1) == (6 if winner == 2 else 8)


def _split(tmp_path: Path, test: str) -> Path:
    path = tmp_path / "split_given.json"
    path.write_text(json.dumps({"train": [f"patient_{i}" for i in range(5) if f"patient_{i}" != test],
                                "test": [test]}))
    return path


def test_patients_without_a_mask_are_refused_skipped_or_given_an_empty_label(tmp_path, capsys):
    source = _two_targets(tmp_path / "source")
    (source / "patient_1" / "GTVnd.nii.gz").unlink()  # node-negative
    args = ["-i", source, "-d", 906, "--target", "GTVp", "GTVnd", "--split", _split(tmp_path, "patient_1")]
    code, err = _run(args + ["-o", tmp_path / "refused"], capsys)
    assert code == 2 and "patient_1/GTVnd.nii.gz: missing" in err
    assert _run(args + ["-o", tmp_path / "skip", "--missing-mask", "skip"], capsys)[0] == 0
    split = json.loads((tmp_path / "skip" / "Dataset906_HeadNeckPTV70" / "split.json").read_text())
    assert split["skipped"] == {"patient_1": ["GTVnd"]} and split["test"] == [] and "patient_1" not in split["train"]
    assert _run(args + ["-o", tmp_path / "empty", "--missing-mask", "empty"], capsys)[0] == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "empty" / "Dataset906_HeadNeckPTV70" / "labelsTs"
                                                       / "patient_1.nii.gz")))
    assert set(np.unique(labels)) == {0, 1}
    (source / "patient_1" / "GTVp.nii.gz").unlink()  # no target at all: never a patient of the dataset
    code, err = _run(args + ["-o", tmp_path / "none", "--missing-mask", "empty"], capsys)
    assert code == 2 and "patient_1/GTVp.nii.gz: missing (and GTVnd)" in err
