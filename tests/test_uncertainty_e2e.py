"""gtv-uncertainty on the outputs of the real nnUNetv2_predict --save_probabilities of two trained models."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATASET_ID, run_cli


@pytest.mark.slow
def test_fuses_real_nnunet_predictions_in_the_input_geometry(gtv_dataset, trained_models, tmp_path):
    images = gtv_dataset["raw"] / "imagesTs"
    folders = []
    for scale in ("Local", "Global"):
        output = tmp_path / scale
        run_cli(["nnUNetv2_predict", "-i", str(images), "-o", str(output), "-d", str(DATASET_ID), "-c", "3d_fullres",
                 "-tr", f"nnUNetTrainerGTV25D{scale}_smoke", "-f", "0", "-device", "cpu", "--save_probabilities",
                 "-npp", "1", "-nps", "1"], gtv_dataset["env"])
        folders.append(output)
    fused = tmp_path / "fused"
    run_cli(["gtv-uncertainty", "-i", *map(str, folders), "-o", str(fused), "-np", "1"], gtv_dataset["env"])

    for image_file in sorted(images.glob("*_0000.nii.gz")):
        case = image_file.name[: -len("_0000.nii.gz")]
        ct = sitk.ReadImage(str(image_file))
        segmentation = sitk.ReadImage(str(fused / f"{case}.nii.gz"))
        entropy = sitk.ReadImage(str(fused / f"{case}_entropy.nii.gz"))
        for written in (segmentation, entropy):
            assert written.GetSize() == ct.GetSize()
            np.testing.assert_allclose(written.GetSpacing(), ct.GetSpacing(), rtol=1e-5)
            np.testing.assert_allclose(written.GetOrigin(), ct.GetOrigin(), atol=1e-3)
            np.testing.assert_allclose(written.GetDirection(), ct.GetDirection(), atol=1e-5)
        # two models: the vote entropy is 0 where they agree and ln 2 where they do not
        votes = [sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz"))) > 0 for folder in folders]
        expected = np.where(votes[0] == votes[1], 0.0, np.log(2))
        np.testing.assert_allclose(sitk.GetArrayFromImage(entropy), expected, atol=1e-5)
        # the fused GTV is one connected piece (6-connectivity) or empty
        from scipy import ndimage

        _, pieces = ndimage.label(sitk.GetArrayFromImage(segmentation) > 0)
        assert pieces <= 1
    with open(fused / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["n_models"] for row in rows] == ["2"] * len(rows) and len(rows) == len(list(images.glob("*.nii.gz")))
