"""DICOM in and out: CT series found, checked and read in HU on their own grid; RTSTRUCT and SEG valid (dciodvfy),
rasterised back by an independent path (matplotlib polygons on each CT file's own geometry), decoded by frame
position, every UID reference resolving to the CT; each bad series refused by gtv-predict before any work; one
end-to-end gtv-predict run on DICOM (the session's ``_smoke`` models)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from matplotlib.path import Path as Polygon
from pydicom.dataset import Dataset

from nnunetv2_gtv.evaluation.metrics import dice_score
from nnunetv2_gtv.dicom.outputs import write_dicom_outputs
from nnunetv2_gtv.dicom.rtstruct import slice_contours
from nnunetv2_gtv.dicom.series import DicomInputError, find_dicom_series, read_series
from nnunetv2_gtv.dicom.synthetic import synthetic_ct, write_ct_series
from test_predict import FAST, SMOKE, results, run  # noqa: F401 - results is a fixture

CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)  # slices stacked along -y: a non-axial series
GEOMETRIES = {
    "reversed_file_order": {"spacing": (1.0, 1.0, 3.0), "rotation": 0.0, "reverse": True},
    "rotated_non_square_pixels": {"spacing": (0.8, 1.0, 2.5), "rotation": 30.0, "reverse": False},
    "coronal": {"spacing": (0.9, 1.1, 2.0), "direction": CORONAL, "reverse": True},
}


# ---------------------------------------------------------------- helpers: an independent reading of the objects


@pytest.fixture(scope="session")
def dciodvfy() -> str:
    """dciodvfy from Debian's dicom3tools, installed with apt when running as root (as CI does)."""
    found = shutil.which("dciodvfy")
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "dicom3tools"], capture_output=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("dciodvfy")
    if found is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed and cannot be installed here (needs root "
                    "and apt-get)")
    return found


def dciodvfy_problems(tool: str, path: Path) -> list[str]:
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(("Error", "Warning"))]


def ct_headers(folder: Path) -> dict[str, Dataset]:
    """Every CT file's header by SOPInstanceUID."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.rglob("*.dcm"))]
    return {str(ds.SOPInstanceUID): ds for ds in headers if ds.Modality == "CT"}


def slice_index(image: sitk.Image, position) -> int:
    """Index of the slice of ``image`` at a CT file's ImagePositionPatient (which must be a corner voxel)."""
    i, j, k = image.TransformPhysicalPointToIndex([float(v) for v in position])
    assert (i, j) == (0, 0)
    return k


def rasterise_roi(rtstruct: Dataset, name: str, ct: dict[str, Dataset], grid: sitk.Image) -> np.ndarray:
    """The ROI's contours filled (even-odd) at the pixel centres of each referenced CT file, placed on ``grid``."""
    number = next(r.ROINumber for r in rtstruct.StructureSetROISequence if r.ROIName == name)
    contours = next(c for c in rtstruct.ROIContourSequence if c.ReferencedROINumber == number)
    mask = np.zeros(sitk.GetArrayViewFromImage(grid).shape, dtype=bool)
    for item in contours.get("ContourSequence", []):
        ds = ct[item.ContourImageSequence[0].ReferencedSOPInstanceUID]
        points = np.asarray(item.ContourData, dtype=float).reshape(-1, 3)
        assert item.ContourGeometricType == "CLOSED_PLANAR" and len(points) == item.NumberOfContourPoints >= 3
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        offset = points - np.asarray(ds.ImagePositionPatient, dtype=float)
        assert np.abs(offset @ np.cross(orientation[:3], orientation[3:])).max() < 1e-3  # on the slice's plane
        columns = offset @ orientation[:3] / float(ds.PixelSpacing[1])
        rows = offset @ orientation[3:] / float(ds.PixelSpacing[0])
        rr, cc = np.mgrid[0:ds.Rows, 0:ds.Columns]
        inside = Polygon(np.c_[columns, rows]).contains_points(np.c_[cc.ravel(), rr.ravel()])
        mask[slice_index(grid, ds.ImagePositionPatient)] ^= inside.reshape(ds.Rows, ds.Columns)
    return mask


def decode_seg_by_position(path: Path, ct: dict[str, Dataset], grid: sitk.Image, segment: int = 1) -> np.ndarray:
    """The frames of one segment of the SEG placed on ``grid`` by their ImagePositionPatient; each frame must
    reference the CT file at that position."""
    seg = pydicom.dcmread(path)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    by_position = {slice_index(grid, ds.ImagePositionPatient): uid for uid, ds in ct.items()}
    mask = np.zeros(sitk.GetArrayViewFromImage(grid).shape, dtype=bool)
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        identification = item if "SegmentIdentificationSequence" in item else shared  # one segment: shared
        if identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber != segment:
            continue
        k = slice_index(grid, item.PlanePositionSequence[0].ImagePositionPatient)
        assert item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == by_position[k]
        mask[k] = frame.astype(bool)
    return mask


def assert_references_resolve(rtstruct_path: Path, seg_path: Path, ct: dict[str, Dataset]) -> None:
    """Every UID the two objects refer to is the CT's: instances, series, study, frame of reference."""
    first = next(iter(ct.values()))
    rtstruct, seg = pydicom.dcmread(rtstruct_path), pydicom.dcmread(seg_path)
    for ds in (rtstruct, seg):
        assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.PatientID) == \
            (first.StudyInstanceUID, first.FrameOfReferenceUID, first.PatientID)
        assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    frame = rtstruct.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == first.StudyInstanceUID
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == set(ct)
    assert all(r.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID for r in rtstruct.StructureSetROISequence)
    for roi in rtstruct.ROIContourSequence:
        for item in roi.get("ContourSequence", []):
            reference = item.ContourImageSequence[0]
            assert reference.ReferencedSOPInstanceUID in ct
            assert reference.ReferencedSOPClassUID == ct[reference.ReferencedSOPInstanceUID].SOPClassUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} <= set(ct)
    for item in seg.PerFrameFunctionalGroupsSequence:
        assert item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID in ct


# ---------------------------------------------------------------- writing from a mask (no model)


def mask_with_holes(label: sitk.Image) -> sitk.Image:
    """The synthetic GTV plus a ring with a hole, an island inside the hole and a one-pixel speck."""
    array = sitk.GetArrayFromImage(label).astype(bool)
    z, y, x = np.ogrid[:array.shape[0], :array.shape[1], :array.shape[2]]
    radius = np.hypot(y - array.shape[1] * 0.3, x - array.shape[2] * 0.35)
    slab = (z >= 3) & (z < 7)
    array |= slab & (radius <= 9) & (radius > 4)
    array |= slab & (radius <= 1.5)
    array[8, 5, 5] = True
    mask = sitk.GetImageFromArray(array.astype(np.uint8))
    mask.CopyInformation(label)
    return mask


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def written(request, tmp_path_factory) -> dict:
    """A synthetic CT series in one geometry, and the RTSTRUCT / SEG written for a mask and an entropy map."""
    settings = GEOMETRIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    image, label = synthetic_ct(seed=3, in_plane_size=48, num_slices=16, spacing_xyz=settings["spacing"],
                                rotation_degrees=settings.get("rotation", 0.0))
    for item in (image, label):
        item.SetDirection(settings.get("direction", image.GetDirection()))
    mask = mask_with_holes(label)
    entropy = sitk.Cast(sitk.BinaryDilate(mask, [2, 2, 1]) - mask, sitk.sitkFloat32) * 0.6365
    write_ct_series(image, folder / "ct", reverse_files=settings["reverse"])
    series = find_dicom_series(folder / "ct").series[0]
    (folder / "out").mkdir()
    rtstruct, seg = write_dicom_outputs(series, mask, entropy, folder / "out", "case")
    return {"image": image, "mask": mask, "entropy": entropy, "series": series, "ct": ct_headers(folder / "ct"),
            "rtstruct": rtstruct, "seg": seg}


def test_series_is_read_in_hu_on_its_own_grid(written):
    """Positions, not file order, set the slice order; HU after the rescale; any orientation."""
    image, read = written["image"], read_series(written["series"])
    assert sorted(read.GetSpacing()) == pytest.approx(sorted(image.GetSpacing()), abs=1e-6)
    on_grid = sitk.Resample(image, read, sitk.Transform(), sitk.sitkNearestNeighbor, -5000.0, sitk.sitkFloat32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid), sitk.GetArrayFromImage(read))
    assert np.linalg.det(np.asarray(read.GetDirection()).reshape(3, 3)) == pytest.approx(1.0)


def test_rtstruct_and_seg_pass_dciodvfy(written, dciodvfy):
    for path in (written["rtstruct"], written["seg"]):
        assert dciodvfy_problems(dciodvfy, path) == [], path.name


def test_rtstruct_rasterises_back_to_the_mask(written):
    rtstruct = pydicom.dcmread(written["rtstruct"])
    assert [r.ROIName for r in rtstruct.StructureSetROISequence] == ["GTV", "GTV_uncertain"]
    assert [o.RTROIInterpretedType for o in rtstruct.RTROIObservationsSequence] == ["GTV", ""]
    expected = sitk.GetArrayFromImage(written["mask"]).astype(bool)
    gtv = rasterise_roi(rtstruct, "GTV", written["ct"], written["mask"])
    assert dice_score(gtv, expected) >= 0.98
    assert np.array_equal(gtv, expected)  # marching squares at 0.5 separates the pixel centres exactly
    uncertain = rasterise_roi(rtstruct, "GTV_uncertain", written["ct"], written["mask"])
    assert dice_score(uncertain, sitk.GetArrayFromImage(written["entropy"]) > 0) >= 0.98
    for roi in pydicom.dcmread(written["rtstruct"]).ROIContourSequence:  # DS values as stored: <= 16 characters
        for item in roi.ContourSequence:
            assert max(len(v) for v in item.get_item("ContourData").value.split(b"\\")) <= 16


def test_seg_decodes_to_the_identical_mask(written):
    decoded = decode_seg_by_position(written["seg"], written["ct"], written["mask"])
    np.testing.assert_array_equal(decoded, sitk.GetArrayFromImage(written["mask"]).astype(bool))


def test_every_reference_resolves_to_the_ct(written):
    assert_references_resolve(written["rtstruct"], written["seg"], written["ct"])


def test_several_labels_give_one_roi_and_one_segment_each(tmp_path, dciodvfy):
    """GTVp, GTVnd (one node below the primary, absent on most slices) and a parotid: each label its own named,
    coded and coloured ROI and segment, read back to exactly that label's voxels."""
    image, label = synthetic_ct(seed=6, in_plane_size=40, num_slices=12, spacing_xyz=(0.8, 1.0, 2.5))
    labels = sitk.GetArrayFromImage(label).astype(np.uint8)
    labels[1:3, 30:34, 5:9] = 2
    labels[6:9, 3:8, 30:36] = 3
    grid = sitk.GetImageFromArray(labels)
    grid.CopyInformation(label)
    write_ct_series(image, tmp_path / "ct", reverse_files=True)
    series = find_dicom_series(tmp_path / "ct").series[0]
    entropy = sitk.Cast(sitk.BinaryDilate(grid > 0, [1, 1, 0]) - (grid > 0), sitk.sitkFloat32) * 0.6365
    rtstruct_path, seg_path = write_dicom_outputs(series, grid, entropy, tmp_path, "case",
                                                  ["background", "GTVp", "GTVnd", "Parotid_L"])
    ct = ct_headers(tmp_path / "ct")
    rtstruct = pydicom.dcmread(rtstruct_path)
    assert [r.ROIName for r in rtstruct.StructureSetROISequence] == ["GTVp", "GTVnd", "Parotid_L", "uncertain"]
    assert [o.RTROIInterpretedType for o in rtstruct.RTROIObservationsSequence] == ["GTV", "GTV", "ORGAN", ""]
    colours = [tuple(int(v) for v in c.ROIDisplayColor) for c in rtstruct.ROIContourSequence]
    assert len(set(colours)) == 4
    seg = pydicom.dcmread(seg_path)
    segments = seg.SegmentSequence
    assert [s.SegmentLabel for s in segments] == ["GTVp", "GTVnd", "Parotid_L"]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in segments] == ["108369006", "108369006",
                                                                                     "45289007"]
    for value, name in ((1, "GTVp"), (2, "GTVnd"), (3, "Parotid_L")):
        expected = labels == value
        assert np.array_equal(rasterise_roi(rtstruct, name, ct, grid), expected), name
        np.testing.assert_array_equal(decode_seg_by_position(seg_path, ct, grid, value), expected)
    assert_references_resolve(rtstruct_path, seg_path, ct)
    for path in (rtstruct_path, seg_path):
        assert dciodvfy_problems(dciodvfy, path) == [], path.name
    labels[0, 0, 0] = 7
    wrong = sitk.GetImageFromArray(labels)
    wrong.CopyInformation(label)
    with pytest.raises(DicomInputError, match=r"labels \[7\] are not in the dataset's labels"):
        write_dicom_outputs(series, wrong, None, tmp_path, "wrong", ["background", "GTVp", "GTVnd", "Parotid_L"])


def test_contours_keep_holes_and_drop_nothing_they_need():
    ring = np.zeros((12, 12), dtype=bool)
    ring[2:10, 2:10] = True
    ring[4:8, 4:8] = False
    assert len(slice_contours(ring)) == 2  # outer boundary and hole
    square = slice_contours(np.pad(np.ones((3, 3), dtype=bool), 1))
    assert len(square) == 1 and len(square[0]) == 8  # the collinear points along the sides are gone
    assert [len(c) for c in slice_contours(np.eye(3, dtype=bool)[:1])] == [4]
    assert slice_contours(np.zeros((4, 4), dtype=bool)) == []


def test_folder_of_several_series_is_listed(tmp_path):
    image, label = synthetic_ct(seed=1, in_plane_size=16, num_slices=5)
    write_ct_series(image, tmp_path / "in" / "a", series_number=3)
    write_ct_series(image, tmp_path / "in" / "b", series_number=4)
    series = find_dicom_series(tmp_path / "in" / "a").series[0]
    write_dicom_outputs(series, label, None, tmp_path / "in" / "a", "x")  # an RTSTRUCT and a SEG beside the CT
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    found = find_dicom_series(tmp_path / "in")
    assert [s.case for s in found.series] == ["SYNTH001_3", "SYNTH001_4"]
    assert [s.folder.name for s in found.series] == ["a", "b"]
    assert len(found.ignored) == 3 and "RTSTRUCT" in " ".join(found.ignored) and "SEG" in " ".join(found.ignored)


# ---------------------------------------------------------------- bad series: gtv-predict refuses before any work


def _edit(files: list[Path], change) -> None:
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        if change(k, ds) is not False:
            ds.save_as(path, enforce_file_format=True)


def _compressed(k: int, ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
    ds["PixelData"].VR = "OB"


def _spoil(kind: str, files: list[Path]) -> None:
    middle = files[len(files) // 2]
    if kind == "mixed modalities":
        _edit([middle], lambda k, ds: setattr(ds, "Modality", "MR"))
    elif kind == "not CT":
        _edit(files, lambda k, ds: setattr(ds, "Modality", "MR"))
    elif kind == "missing slice":
        middle.unlink()
    elif kind == "duplicated slice":
        ds = pydicom.dcmread(middle)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(middle.with_name("copy.dcm"), enforce_file_format=True)
    elif kind == "varying spacing":
        _edit([middle], lambda k, ds: setattr(ds, "ImagePositionPatient",
                                              [*ds.ImagePositionPatient[:2], ds.ImagePositionPatient[2] + 0.6]))
    elif kind == "gantry tilt":
        _edit(files, lambda k, ds: setattr(ds, "GantryDetectorTilt", 15))
    elif kind == "sheared positions":
        _edit(files, lambda k, ds: setattr(ds, "ImagePositionPatient",
                                           [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1] + 0.5 * k,
                                            ds.ImagePositionPatient[2]]))
    elif kind == "compressed":
        _edit(files, _compressed)


@pytest.mark.parametrize("kind, message", [
    ("mixed modalities", "mixed modalities in one series (CT, MR)"),
    ("not CT", "modality MR, not CT"),
    ("missing slice", "missing slices: a gap of 6.000 mm"),
    ("duplicated slice", "duplicated slices"),
    ("varying spacing", "slice spacing varies"),
    ("gantry tilt", "gantry tilt of 15 degrees"),
    ("sheared positions", "do not lie along the slice normal"),
    ("compressed", "transfer syntax JPEG 2000 Image Compression (Lossless Only)"),
])
def test_bad_series_are_refused_before_any_work(tmp_path, monkeypatch, kind, message):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "no_models"))
    image, _ = synthetic_ct(seed=2, in_plane_size=16, num_slices=7)
    folder = tmp_path / "in" / "patient" / "ct"
    files = write_ct_series(image, folder)
    write_ct_series(image, tmp_path / "in" / "good", series_number=2)
    _spoil(kind, files)
    code, _, stderr = run(["-i", tmp_path / "in", "-o", tmp_path / "out", *SMOKE, *FAST])
    assert code == 2, stderr
    assert f"{folder}: series " in stderr and message in stderr
    assert str(tmp_path / "in" / "good") not in stderr
    assert not (tmp_path / "out").exists()


def test_dicom_reference_must_share_the_grid_and_output_must_stay_outside(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "no_models"))
    image, _ = synthetic_ct(seed=2, in_plane_size=16, num_slices=7)
    write_ct_series(image, tmp_path / "in" / "ct")
    shifted = sitk.Image(image)
    shifted.SetOrigin([o + 0.5 for o in image.GetOrigin()])
    sitk.WriteImage(shifted, str(tmp_path / "ct.nii.gz"))
    code, _, stderr = run(["-i", tmp_path / "ct.nii.gz", "-o", tmp_path / "out", "--dicom-reference",
                           tmp_path / "in" / "ct", *SMOKE, *FAST])
    assert code == 2 and "not on the grid of the DICOM reference series" in stderr and str(tmp_path / "in") in stderr
    code, _, stderr = run(["-i", tmp_path / "in", "-o", tmp_path / "in" / "out", *SMOKE, *FAST])
    assert code == 2 and "lies inside the input folder" in stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "in" / "out").exists()


def test_a_case_whose_dicom_objects_fail_loses_both_and_is_reported(tmp_path, monkeypatch):
    import nnunetv2_gtv.dicom.outputs as outputs

    image, label = synthetic_ct(seed=5, in_plane_size=16, num_slices=5)
    write_ct_series(image, tmp_path / "ct")
    series = find_dicom_series(tmp_path / "ct").series[0]
    (tmp_path / "out").mkdir()
    for case in ("good", "bad", "earlier"):
        sitk.WriteImage(label, str(tmp_path / "out" / f"{case}.nii.gz"))

    def failing_seg(series, labels, codings, target):
        if "bad" in str(target):
            raise TypeError("simulated")
        return write_seg(series, labels, codings, target)

    write_seg = outputs.write_seg
    monkeypatch.setattr(outputs, "write_seg", failing_seg)
    failures = outputs.write_run_outputs({c: series for c in ("good", "bad", "earlier")}, tmp_path / "out", ".nii.gz",
                                         ["good", "bad"], ["earlier"], log=lambda m: None)
    assert failures == ["bad: DICOM outputs not written (TypeError: simulated)"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.dcm")) == [
        "earlier_RTSTRUCT.dcm", "earlier_SEG.dcm", "good_RTSTRUCT.dcm", "good_SEG.dcm"]


# ---------------------------------------------------------------- end to end through gtv-predict


def test_gtv_predict_on_a_dicom_folder(results, gtv_dataset, tmp_path, dciodvfy):  # noqa: F811
    """Two series (file order reversed; in-plane axes rotated) of the session's test CT: each a case with NIfTI,
    RTSTRUCT and SEG that agree; the first case's GTV is the NIfTI input's, which --dicom-reference maps to the
    same RTSTRUCT contours."""
    test_ct = next((gtv_dataset["raw"] / "imagesTs").glob("*_0000.nii.gz"))
    image = sitk.Cast(sitk.ReadImage(str(test_ct)), sitk.sitkInt16)
    rotated = sitk.Image(image)
    rotated.SetDirection((0.8, -0.6, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 1.0))
    write_ct_series(image, tmp_path / "dicom" / "first", "P1", series_number=5, reverse_files=True)
    write_ct_series(rotated, tmp_path / "dicom" / "second", "P1", series_number=6)
    models = ["-m", "Global:0"]  # one model keeps it short; GTV_uncertain is tested above
    code, stdout, stderr = run(["-i", tmp_path / "dicom", "-o", tmp_path / "out", *SMOKE, *models, *FAST, "-np", "0"])
    assert code == 0, stderr
    assert "2 CT series" in stdout and "P1_5: " in stdout and "P1_6: " in stdout
    out = tmp_path / "out"
    for case, reference in (("P1_5", image), ("P1_6", rotated)):
        segmentation = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert segmentation.GetSize() == reference.GetSize()
        np.testing.assert_allclose(segmentation.GetDirection(), reference.GetDirection(), atol=1e-6)
        ct = ct_headers(tmp_path / "dicom" / ("first" if case == "P1_5" else "second"))
        expected = sitk.GetArrayFromImage(segmentation).astype(bool)
        rtstruct = pydicom.dcmread(out / f"{case}_RTSTRUCT.dcm")
        assert dice_score(rasterise_roi(rtstruct, "GTV", ct, segmentation), expected) >= 0.98
        np.testing.assert_array_equal(decode_seg_by_position(out / f"{case}_SEG.dcm", ct, segmentation), expected)
        assert_references_resolve(out / f"{case}_RTSTRUCT.dcm", out / f"{case}_SEG.dcm", ct)
        for path in (out / f"{case}_RTSTRUCT.dcm", out / f"{case}_SEG.dcm"):
            assert dciodvfy_problems(dciodvfy, path) == [], path.name

    code, _, stderr = run(["-i", test_ct, "-o", tmp_path / "nifti", "--dicom-reference", tmp_path / "dicom" / "first",
                           *SMOKE, *models, *FAST, "-np", "0"])
    assert code == 0, stderr
    case = test_ct.name.replace("_0000.nii.gz", "")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nifti" / f"{case}.nii.gz"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(out / "P1_5.nii.gz"))))
    ct = ct_headers(tmp_path / "dicom" / "first")
    assert_references_resolve(tmp_path / "nifti" / f"{case}_RTSTRUCT.dcm", tmp_path / "nifti" / f"{case}_SEG.dcm", ct)


def test_an_empty_gtv_gives_valid_objects_without_contours(tmp_path, dciodvfy):
    image, label = synthetic_ct(seed=4, in_plane_size=16, num_slices=5)
    write_ct_series(image, tmp_path / "ct")
    series = find_dicom_series(tmp_path / "ct").series[0]
    empty = sitk.Image(label.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(label)
    rtstruct, seg = write_dicom_outputs(series, empty, sitk.Cast(empty, sitk.sitkFloat32), tmp_path, "empty")
    assert all("ContourSequence" not in roi for roi in pydicom.dcmread(rtstruct).ROIContourSequence)
    assert not decode_seg_by_position(seg, ct_headers(tmp_path / "ct"), label).any()
    for path in (rtstruct, seg):
        assert dciodvfy_problems(dciodvfy, path) == [], path.name
