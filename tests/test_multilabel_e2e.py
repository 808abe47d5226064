"""GTVp + GTVnd end to end through the public commands: patient folders -> gtv-dataset -> nnU-Net's planning with our
planner -> two sampling trainers (nnUNetv2_train) -> gtv-predict on a DICOM series (post-processing file beside the
models) -> gtv-evaluate; the fused labels against an independent region-aware fusion of the models' own
predictions, the RTSTRUCT ROIs and SEG segments against the fused labels, label by label."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIOWithReorient

from conftest import clean_env, run_cli
from nnunetv2_gtv.demo.synthetic import write_dataset
from nnunetv2_gtv.dicom.synthetic import write_ct_series
from nnunetv2_gtv.ensemble.fusion import ComponentRule
from nnunetv2_gtv.ensemble.postprocessing import PostprocessingChoice, write_postprocessing
from independent import largest_component, region_aware_fusion
from test_dicom import ct_headers, decode_seg_by_position, rasterise_roi

DATASET_ID = 987
DATASET = f"Dataset{DATASET_ID:03d}_NPC"
TRAINERS = ("nnUNetTrainerGTV25DLocal_smoke", "nnUNetTrainerGTV25DGlobal_smoke")
FAST = ["-device", "cpu", "-precision", "float32", "--disable_tta", "--disable_progress_bar"]


def patient_folders(root: Path) -> Path:
    """Synthetic CTs with GTVp and nodes written as a clinic exports them: one folder per patient, one mask per
    structure."""
    raw = write_dataset(root / "generated", 999, num_train=6, num_test=0, in_plane_size=72, num_slices=32,
                        in_plane_mm=(1.6, 1.9), orientations="mixed", seed=21, nodes=True)
    source = root / "patients"
    for image in sorted((raw / "imagesTr").iterdir()):
        case = image.name.replace("_0000.nii.gz", "")
        folder = source / case
        folder.mkdir(parents=True)
        image.rename(folder / "ct.nii.gz")
        labels = sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz"))
        for value, name in ((1, "GTVp"), (2, "GTVnd")):
            sitk.WriteImage(sitk.Cast(labels == value, sitk.sitkUInt8), str(folder / f"{name}.nii.gz"))
    return source


@pytest.mark.slow
def test_gtvp_and_gtvnd_from_patient_folders_to_rtstruct_and_seg(tmp_path):
    dirs = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for path in dirs.values():
        path.mkdir()
    env = clean_env(**{k: str(v) for k, v in dirs.items()}, nnUNet_n_proc_DA="0")
    source = patient_folders(tmp_path)

    run_cli(["gtv-dataset", "-i", str(source), "-o", str(dirs["nnUNet_raw"]), "-d", str(DATASET_ID), "-n", "NPC",
             "--target", "GTVp", "GTVnd", "--num-test", "1"], env)
    raw = dirs["nnUNet_raw"] / DATASET
    assert json.loads((raw / "dataset.json").read_text())["labels"] == {"background": 0, "GTVp": 1, "GTVnd": 2}
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-pl", "nnUNetPlannerGTV25D", "-c", "3d_fullres",
             "-np", "2"], env)
    for trainer in TRAINERS:
        run_cli(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    log = next((dirs["nnUNet_results"] / DATASET / f"{TRAINERS[0]}__nnUNetPlans__3d_fullres" / "fold_0").glob(
        "training_log_*.txt")).read_text()
    assert "GTVnd: share of its voxels inside each region: local" in log

    # the test CT as a DICOM series; rules for the labels beside the models, which gtv-predict reads
    test_ct = next((raw / "imagesTs").iterdir())
    case = test_ct.name.replace("_0000.nii.gz", "")
    write_ct_series(sitk.Cast(sitk.ReadImage(str(test_ct)), sitk.sitkInt16), tmp_path / "dicom" / case, "NPC1",
                    series_number=3, reverse_files=True)
    write_postprocessing(PostprocessingChoice(6, {1: ComponentRule("largest"), 2: ComponentRule("all")}),
                         dirs["nnUNet_results"] / DATASET / "gtv_postprocessing.json")
    out = tmp_path / "out"
    predicted = run_cli(["gtv-predict", "-i", str(tmp_path / "dicom"), "-o", str(out), "-d", str(DATASET_ID),
                         "-m", *(f"{t}:0" for t in TRAINERS), *FAST, "--save-model-predictions", "-np", "0"], env)
    assert "post-processing per label from" in predicted.stdout and "GTVnd (all): 0 in 0 case(s)" in predicted.stdout
    fused_case = "NPC1_3"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_names"] == ["background", "GTVp", "GTVnd"]
    assert summary["settings"]["label_rules"] == {"1": "largest", "2": "all"}
    row = summary["cases"][0]
    assert {"vvc_GTVp", "vvc_GTVnd", "volume_ml_fused_GTVnd", "review_GTVnd"} <= set(row)

    fused = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{fused_case}.nii.gz")))
    folders = [out / "model_predictions" / f"{t}__fold_0" for t in TRAINERS]
    with np.load(folders[0] / f"{fused_case}.npz") as local:
        assert "region" in local  # the Local model ran in its region; the fusion left it out elsewhere
    expected = region_aware_fusion(folders, fused_case)
    # the saved probabilities are in the orientation the plans read CTs in (RAS): the fused file read the same way
    fused_as_read = SimpleITKIOWithReorient().read_seg(str(out / f"{fused_case}.nii.gz"))[0][0]
    np.testing.assert_array_equal(fused_as_read == 2, expected == 2)  # GTVnd ("all"): every component kept
    largest, count = largest_component(expected == 1)  # GTVp ("largest"): its largest component, 6-connected
    np.testing.assert_array_equal(fused_as_read == 1, largest)
    assert row["components_removed_GTVnd"] == 0 and row["components_removed_GTVp"] == max(count - 1, 0)

    ct = ct_headers(tmp_path / "dicom" / case)
    grid = sitk.ReadImage(str(out / f"{fused_case}.nii.gz"))
    rtstruct = pydicom.dcmread(out / f"{fused_case}_RTSTRUCT.dcm")
    assert [r.ROIName for r in rtstruct.StructureSetROISequence] == ["GTVp", "GTVnd", "uncertain"]
    for value, name in ((1, "GTVp"), (2, "GTVnd")):
        np.testing.assert_array_equal(rasterise_roi(rtstruct, name, ct, grid), fused == value)
        np.testing.assert_array_equal(decode_seg_by_position(out / f"{fused_case}_SEG.dcm", ct, grid, value),
                                      fused == value)

    # gtv-evaluate against the label map the test CT came with, every label in one run
    (tmp_path / "reference").mkdir()
    reference = sitk.ReadImage(str(raw / "labelsTs" / f"{case}.nii.gz"))
    on_grid = sitk.Resample(reference, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, reference.GetPixelID())
    sitk.WriteImage(on_grid, str(tmp_path / "reference" / f"{fused_case}.nii.gz"))
    run_cli(["gtv-evaluate", "-p", str(out), "-r", str(tmp_path / "reference"), "-o", str(tmp_path / "evaluation")],
            env)
    with open(tmp_path / "evaluation" / "metrics.csv", newline="") as handle:
        fused_rows = [r for r in csv.DictReader(handle) if r["source"] == "fused"]
    assert sorted(r["label_name"] for r in fused_rows) == ["GTVnd", "GTVp"]
    assert all(r["nsd"] != "" for r in fused_rows)
