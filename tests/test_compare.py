"""gtv-compare against hand-computed values, and its refusals of unusable inputs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_gtv.cli.compare import main
from nnunetv2_gtv.cli.evaluate import main as evaluate_main

SPACING_XYZ = (1.0, 1.0, 0.5)  # z spacing 0.5 mm: a shift of k slices is k * 0.5 mm


def _write(path: Path, voxels: list[tuple[int, int, int]], value: int = 1, spacing=SPACING_XYZ) -> None:
    array = np.zeros((10, 8, 8), dtype=np.uint8)
    for z, y, x in voxels:
        array[z, y, x] = value
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def folders(tmp_path) -> dict:
    """Reference: one voxel per case. exact: the reference. shifted: the voxel k slices away (case k = 1..6),
    so Dice 0, ASSD = HD95 = 0.5 k mm, RVE 0. grown: the voxel plus its neighbour one slice up: Dice 2/3,
    RVE 100 %, ASSD (0 + 0.5 + 0) / 3 mm, HD95 = p95 of [0, 0.5] = 0.475 mm."""
    paths = {name: tmp_path / name for name in ("reference", "exact", "shifted", "grown")}
    for k in range(1, 7):
        case = f"case_{k}.nii.gz"
        _write(paths["reference"] / case, [(2, 4, 4)])
        _write(paths["exact"] / case, [(2, 4, 4)])
        _write(paths["shifted"] / case, [(2 + k, 4, 4)])
        _write(paths["grown"] / case, [(2, 4, 4), (3, 4, 4)])
    with open(paths["exact"] / "timings.csv", "w") as handle:
        handle.write("case,seconds\n" + "".join(f"case_{k},{k}\n" for k in range(1, 7)))
    return paths


def _run(args: list, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_tables_match_hand_computed_values(folders, tmp_path, capsys):
    out = tmp_path / "out"
    code, _ = _run(["-i", f"exact={folders['exact']}", f"shifted={folders['shifted']}", f"grown={folders['grown']}",
                    "-r", folders["reference"], "-o", out], capsys)
    assert code == 0
    doc = json.loads((out / "comparison.json").read_text())
    rows = {row["name"]: row for row in doc["summary"]}
    shifts = 0.5 * np.arange(1, 7)
    assert rows["exact"]["dice"]["mean"] == 100 and rows["exact"]["assd_mm"]["mean"] == 0
    assert rows["shifted"]["dice"]["mean"] == 0 and rows["shifted"]["rve_percent"]["mean"] == 0
    assert rows["shifted"]["assd_mm"]["mean"] == pytest.approx(1.75)  # mean of 0.5 .. 3.0
    assert rows["shifted"]["assd_mm"]["std"] == pytest.approx(np.sqrt(np.sum((shifts - 1.75) ** 2) / 5))
    assert rows["shifted"]["hd95_mm"]["mean"] == pytest.approx(1.75)
    assert rows["shifted"]["nsd"]["mean"] == pytest.approx(100 * 2 / 6)  # shifts of 0.5 and 1.0 mm are within 1 mm
    assert rows["grown"]["dice"]["mean"] == pytest.approx(200 / 3) and rows["grown"]["dice"]["std"] == pytest.approx(0, abs=1e-9)
    assert rows["grown"]["rve_percent"]["mean"] == pytest.approx(100)
    assert rows["grown"]["assd_mm"]["mean"] == pytest.approx(0.5 / 3)
    assert rows["grown"]["hd95_mm"]["mean"] == pytest.approx(0.475)
    # six positive, distinct ASSD differences: the exact two-sided Wilcoxon p is 2 / 2^6
    assert rows["shifted"]["assd_mm_test"] == {"p": pytest.approx(2 / 64), "n": 6, "few_cases": False}
    assert rows["exact"]["assd_mm_test"] is None  # the baseline
    assert rows["exact"]["seconds"]["mean"] == pytest.approx(3.5) and rows["shifted"]["seconds"] is None
    with open(out / "comparison.csv", newline="") as handle:
        table = {row["method"]: row for row in csv.DictReader(handle)}
    assert float(table["grown"]["dice_mean"]) == pytest.approx(66.6667, abs=1e-3)
    assert float(table["shifted"]["assd_mm_p"]) == pytest.approx(0.03125)
    markdown = (out / "comparison.md").read_text()
    assert "| grown | 66.67 ± 0.00 | 100.00 ± 0.00 | 0.17 ± 0.00 | 0.48 ± 0.00 | 100.00 ± 0.00 | – |" in markdown
    assert ("| exact | 100.00 ± 0.00 | 100.00 ± 0.00 | 0.00 ± 0.00 | 0.00 ± 0.00 | 0.00 ± 0.00 | 3.50 ± 1.87 |"
            in markdown)
    for metric in ("dice", "nsd", "assd_mm", "hd95_mm", "rve_percent"):
        assert (out / f"box_{metric}.png").read_bytes()[:4] == b"\x89PNG"
    assert "Training (min)" not in markdown


def test_training_minutes_become_a_column(folders, tmp_path, capsys):
    out = tmp_path / "out"
    code, _ = _run(["-i", f"exact={folders['exact']}", f"grown={folders['grown']}", "-r", folders["reference"],
                    "-o", out, "--training-minutes", "grown=21.25"], capsys)
    assert code == 0
    markdown = (out / "comparison.md").read_text()
    assert "| Time per case (s) | Training (min) |" in markdown
    assert "| 3.50 ± 1.87 | – |" in markdown and "| – | 21.2 |" in markdown
    rows = {row["name"]: row for row in json.loads((out / "comparison.json").read_text())["summary"]}
    assert rows["grown"]["training_minutes"] == 21.25 and rows["exact"]["training_minutes"] is None


def test_few_cases_are_flagged_and_gtv_evaluate_outputs_are_read(folders, tmp_path, capsys):
    for name in ("reference", "exact", "shifted"):
        for k in (4, 5, 6):
            (folders[name] / f"case_{k}.nii.gz").unlink()
    assert evaluate_main(["-p", str(folders["shifted"]), "-r", str(folders["reference"]),
                          "-o", str(tmp_path / "evaluated")]) == 0
    out = tmp_path / "out"
    code, _ = _run(["-i", f"exact={folders['exact']}", f"evaluated={tmp_path / 'evaluated'}", "-r",
                    folders["reference"], "-o", out, "--baseline", "evaluated"], capsys)
    assert code == 0
    rows = {row["name"]: row for row in json.loads((out / "comparison.json").read_text())["summary"]}
    assert rows["evaluated"]["assd_mm"]["mean"] == pytest.approx(1.0)  # 0.5, 1.0, 1.5 from gtv-evaluate's CSV
    assert rows["exact"]["assd_mm_test"] == {"p": pytest.approx(2 / 8), "n": 3, "few_cases": True}
    assert "0.25 (n=3 < 6)" in (out / "comparison.md").read_text()


def test_unusable_inputs_are_refused_with_exit_2_and_nothing_written(folders, tmp_path, capsys):
    out = tmp_path / "out"
    reference, exact, shifted = folders["reference"], folders["exact"], folders["shifted"]

    def refused(args: list, *expected: str) -> None:
        code, err = _run(args + ["-o", out], capsys)
        assert code == 2 and all(text in err for text in expected), err
        assert not out.exists()

    refused(["-i", exact, "-r", reference], "at least two inputs")
    refused(["-i", exact, exact, "-r", reference], "input names must differ")
    refused(["-i", exact, shifted, "-r", reference, "--training-minutes", "grown=3"], "grown", "none of the inputs")
    refused(["-i", exact, shifted, "-r", reference, "--training-minutes", "exact=soon"], "exact=soon", "NAME=MINUTES")
    refused(["-i", exact, shifted, "-r", tmp_path / "nowhere"], "nowhere", "does not exist")
    (shifted / "case_6.nii.gz").rename(tmp_path / "case_6.nii.gz")
    refused(["-i", exact, shifted, "-r", reference], "different cases", "only in 'exact': case_6")
    (tmp_path / "case_6.nii.gz").rename(shifted / "case_6.nii.gz")
    (reference / "case_3.nii.gz").unlink()
    refused(["-i", exact, shifted, "-r", reference], "no reference label", "case_3.nii.gz")
    _write(reference / "case_3.nii.gz", [(2, 4, 4)])
    _write(shifted / "case_2.nii.gz", [(4, 4, 4)], spacing=(1.0, 1.0, 3.0))
    refused(["-i", exact, shifted, "-r", reference], str(shifted / "case_2.nii.gz"), "geometry differs", "spacing")
    _write(shifted / "case_2.nii.gz", [(4, 4, 4)], value=2)
    refused(["-i", exact, shifted, "-r", reference], "'shifted' holds labels [2]", "one label set")
    _write(shifted / "case_2.nii.gz", [(4, 4, 4)])
    (exact / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "GTV": 1}, "file_ending": ".nii.gz"}))
    (shifted / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "GTV": 1, "node": 2},
                                                      "file_ending": ".nii.gz"}))
    refused(["-i", exact, shifted, "-r", reference], "'exact' has labels [0, 1] but 'shifted' has [0, 1, 2]")
    code, err = _run(["-i", exact, shifted, "-r", reference, "-o", exact / "report"], capsys)
    assert code == 2 and "must not be (inside) the input" in err and not (exact / "report").exists()


def test_every_label_gets_its_row_and_the_table_their_mean(tmp_path, capsys):
    """GTVp exact in both inputs; GTVnd exact in 'good', missed in 'missed': per label 100/100 and 100/0 Dice, the
    case-level mean 100 and 50."""
    dataset = json.dumps({"labels": {"background": 0, "GTVp": 1, "GTVnd": 2}, "file_ending": ".nii.gz"})
    for k in range(1, 4):
        case = f"case_{k}.nii.gz"
        for name in ("reference", "good"):
            _write(tmp_path / name / case, [(2, 4, 4), (2, 4, 5)])
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / case)))
            array[6, 1, 1] = 2
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(SPACING_XYZ)
            sitk.WriteImage(image, str(tmp_path / name / case))
        _write(tmp_path / "missed" / case, [(2, 4, 4), (2, 4, 5)])
    for name in ("good", "missed"):
        (tmp_path / name / "dataset.json").write_text(dataset)
    out = tmp_path / "out"
    code, _ = _run(["-i", f"good={tmp_path / 'good'}", f"missed={tmp_path / 'missed'}", "-r", tmp_path / "reference",
                    "-o", out], capsys)
    assert code == 0
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["labels"] == {"1": "GTVp", "2": "GTVnd"}
    rows = {row["name"]: row for row in doc["summary"]}
    assert rows["good"]["dice"]["mean"] == 100 and rows["missed"]["dice"]["mean"] == 50
    assert rows["missed"]["per_label"]["GTVp"]["dice"]["mean"] == 100
    assert rows["missed"]["per_label"]["GTVnd"]["dice"]["mean"] == 0
    markdown = (out / "comparison.md").read_text()
    assert "labels GTVp, GTVnd" in markdown and "| GTVnd | missed | 0.00 ± 0.00 |" in markdown
    with open(out / "comparison_per_case.csv", newline="") as handle:
        assert {row["label"] for row in csv.DictReader(handle)} == {"GTVp", "GTVnd"}
    code, _ = _run(["-i", f"good={tmp_path / 'good'}", f"missed={tmp_path / 'missed'}", "-r", tmp_path / "reference",
                    "-o", tmp_path / "nodes", "--label", "2"], capsys)
    rows = {row["name"]: row for row in json.loads((tmp_path / "nodes" / "comparison.json").read_text())["summary"]}
    assert code == 0 and rows["missed"]["dice"]["mean"] == 0 and "per_label" not in rows["missed"]
