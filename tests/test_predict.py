"""gtv-predict: outputs on the input's grid, equivalence with nnUNetv2_predict + gtv-uncertainty, region
restriction, bad inputs, --continue and sharding. Uses the session's ``_smoke`` models (conftest)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIOWithReorient

from conftest import DATASET_ID, DATASET_NAME, kill_while_writing, run_cli
from independent import largest_component, near_ties, region_aware_fusion
from nnunetv2_gtv.evaluation.metrics import dice_score
from nnunetv2_gtv.cli.predict import main
from nnunetv2_gtv.cli.uncertainty import main as uncertainty_main
from nnunetv2_gtv.demo.synthetic import reversed_slice_order
from nnunetv2_gtv.inference.inputs import InputError, find_cases, intensity_warning
from nnunetv2_gtv.inference.models import ModelError, load_model, parse_model_spec, resolve_models
from nnunetv2_gtv.inference.settings import InferenceSettings, parse_tile, tile_shape

FAST = ["-device", "cpu", "-precision", "float32", "--disable_tta", "-step_size", "1", "--disable_progress_bar"]
SMOKE = ["-d", str(DATASET_ID), "-tr_suffix", "_smoke"]
CSV_COLUMNS_3 = (["case", "n_models"] + [f"volume_ml_model_{i}" for i in (1, 2, 3)]
                 + ["volume_ml_fused", "vvc", "components_removed", "review", "review_rank", "missing_models",
                    "pairwise_dice_mean", "pairwise_dice_min", "agreement", "entropy_in_fused", "soft_dice"])


def run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def assert_same_grid(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    for get in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
        np.testing.assert_allclose(get(image), get(reference), atol=1e-6)


def probabilities(folder: Path, case: str) -> np.ndarray:
    return np.load(folder / f"{case}.npz")["probabilities"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def results(trained_models, tmp_path_factory) -> Path:
    """A private nnUNet_results (links to the session's trained models), set for this module's in-process runs."""
    root = tmp_path_factory.mktemp("results")
    dataset = root / DATASET_NAME
    dataset.mkdir()
    for folder in trained_models.values():
        (dataset / folder.name).symlink_to(folder, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("nnUNet_results", str(root))
        yield root


@pytest.fixture(scope="module")
def test_ct(gtv_dataset) -> Path:
    return next((gtv_dataset["raw"] / "imagesTs").glob("*_0000.nii.gz"))


@pytest.fixture(scope="module")
def cts(test_ct, tmp_path_factory) -> Path:
    """The synthetic test CT as NIfTI, flipped along its superior axis as NRRD, and scaled to [0, 1] as MHA."""
    folder = tmp_path_factory.mktemp("cts")
    shutil.copy(test_ct, folder / test_ct.name)
    image = read(test_ct)
    sitk.WriteImage(sitk.Flip(image, [False, False, True]), str(folder / "flipped.nrrd"))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    scaled = sitk.GetImageFromArray((array - array.min()) / (array.max() - array.min()))
    scaled.CopyInformation(image)
    sitk.WriteImage(scaled, str(folder / "scaled.mha"))
    return folder


@pytest.fixture(scope="module")
def restricted_run(results, cts, tmp_path_factory) -> dict:
    """Three models, regions on, each model's prediction saved, three cases exported by 2 processes, review page."""
    out = tmp_path_factory.mktemp("restricted") / "out"
    started = time.perf_counter()
    code, stdout, stderr = run(["-i", cts, "-o", out, *SMOKE, "-m", "Local:0", "Middle:0", "Global:0", *FAST,
                                "--save-model-predictions", "-np", "2", "--review"])
    assert code == 0, stderr
    return {"out": out, "stdout": stdout, "stderr": stderr, "wall_seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- outputs


def test_outputs_are_on_the_input_grid_in_its_format(restricted_run, cts):
    out = restricted_run["out"]
    for case, source in (("case_006", "case_006_0000.nii.gz"), ("flipped", "flipped.nrrd"), ("scaled", "scaled.mha")):
        ending = "".join(Path(source).suffixes[-2:]) if source.endswith(".nii.gz") else Path(source).suffix
        reference = read(cts / source)
        segmentation, entropy = read(out / f"{case}{ending}"), read(out / f"{case}_entropy{ending}")
        assert_same_grid(segmentation, reference)
        assert_same_grid(entropy, reference)
        labels = np.unique(sitk.GetArrayFromImage(segmentation))
        assert set(labels) <= {0, 1}
        values = sitk.GetArrayFromImage(entropy)
        assert values.dtype == np.float32 and values.min() >= 0 and values.max() <= math.log(2) + 1e-6
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS_3
    assert [r["case"] for r in rows] == ["case_006", "flipped", "scaled"]
    summary = json.loads((out / "summary.json").read_text())
    assert [m["label"] for m in summary["models"]] == ["Local:0", "Middle:0", "Global:0"]
    assert summary["inference"] == {"tile": InferenceSettings().tile, "step_size": 1.0, "mirroring": False,
                                    "restrict_to_region": True, "bfloat16": False}


def _timings(folder: Path) -> dict[str, dict]:
    with open(folder / "timings.csv", newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def test_timings_are_written_per_case_for_the_run_and_each_model(restricted_run):
    """gtv-compare's inference time per case: the whole case in OUT, preprocessing + its network in each model's."""
    out = restricted_run["out"]
    timings = _timings(out)
    assert sorted(timings) == ["case_006", "flipped", "scaled"]
    for row in timings.values():
        models = [float(m) for m in row["models"].split()]
        assert len(models) == 3 and min(models) > 0 and float(row["preprocessing"]) > 0
    # reading, preprocessing and the networks run case after case in the command's own process (exports overlap in
    # other processes): together they fit in the command's wall time, models loaded too
    sequential = sum(float(row["preprocessing"]) + sum(float(m) for m in row["models"].split())
                     for row in timings.values())
    assert 0 < sequential < restricted_run["wall_seconds"]
    assert max(float(row["seconds"]) for row in timings.values()) < restricted_run["wall_seconds"]
    for scale in ("Local", "Middle", "Global"):
        own = _timings(out / "model_predictions" / f"nnUNetTrainerGTV25D{scale}_smoke__fold_0")
        assert sorted(own) == sorted(timings)
        for case, row in own.items():  # one model's share: more than nothing, less than the three together
            assert 0 < float(row["seconds"]) < float(timings[case]["seconds"])


@pytest.mark.parametrize("scale", ["Local", "Middle"])
def test_region_models_predict_background_below_their_region(restricted_run, scale):
    """Local / Middle: foreground probability exactly 0 in the shoulders. The probabilities are stored as the
    plans' reader orients every CT (RAS: the shoulders are the first slices, also of the CT stored flipped); the
    model's own segmentation of the flipped CT is written back in that file's order (shoulders last)."""
    models = restricted_run["out"] / "model_predictions"
    folder = models / f"nnUNetTrainerGTV25D{scale}_smoke__fold_0"
    original, flipped = probabilities(folder, "case_006"), probabilities(folder, "flipped")
    for stored in (original, flipped):
        assert np.all(stored[1, :5] == 0) and np.all(stored[0, :5] == 1) and stored[1].max() > 0.05
    np.testing.assert_array_equal(original, flipped)  # the same CT, read in one orientation
    flipped_segmentation = sitk.GetArrayFromImage(read(folder / "flipped.nrrd"))
    original_segmentation = sitk.GetArrayFromImage(read(folder / "case_006.nii.gz"))
    np.testing.assert_array_equal(flipped_segmentation, original_segmentation[::-1])


def test_global_models_predict_background_outside_the_body(results, test_ct, tmp_path):
    """The CT padded with 30 voxels of air in-plane: Global runs in the body's box (10 mm margin), so the outer
    voxels have foreground probability exactly 0."""
    folder = tmp_path / "in"
    folder.mkdir()
    sitk.WriteImage(sitk.ConstantPad(read(test_ct), [30, 30, 0], [30, 30, 0], -1000), str(folder / "padded.nii.gz"))
    out = tmp_path / "out"
    code, _, stderr = run(["-i", folder, "-o", out, *SMOKE, "-m", "Global:0", *FAST, "--save-model-predictions"])
    assert code == 0, stderr
    foreground = probabilities(out / "model_predictions" / "nnUNetTrainerGTV25DGlobal_smoke__fold_0", "padded")[1]
    for border in (foreground[:, :15], foreground[:, -15:], foreground[:, :, :15], foreground[:, :, -15:]):
        assert np.all(border == 0)
    assert foreground.max() > 0.5


def test_model_predictions_are_nnunet_folders_that_gtv_uncertainty_fuses_identically(restricted_run, tmp_path):
    out = restricted_run["out"]
    folders = [str(out / "model_predictions" / f"nnUNetTrainerGTV25D{s}_smoke__fold_0")
               for s in ("Local", "Middle", "Global")]
    assert json.loads((out / "summary.json").read_text())["inputs"] == folders
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert uncertainty_main(["-i", *folders, "-o", str(tmp_path / "fused"), "-np", "1"]) == 0
    for name in ("case_006.nii.gz", "case_006_entropy.nii.gz"):
        ours = sitk.GetArrayFromImage(read(out / name))
        theirs = sitk.GetArrayFromImage(read(tmp_path / "fused" / name))
        np.testing.assert_array_equal(ours, theirs)
    # and both equal a fusion written here from the saved probabilities (regions, mean, argmax, largest component),
    # read in the orientation the plans read CTs in, as the probabilities were saved
    expected, _ = largest_component(region_aware_fusion([Path(f) for f in folders], "case_006") == 1)
    fused_as_read = SimpleITKIOWithReorient().read_seg(str(out / "case_006.nii.gz"))[0][0]
    differing = (fused_as_read == 1) != expected  # only where the mean probabilities tie (float16 inputs)
    assert not (differing & ~near_ties([Path(f) for f in folders], "case_006")).any() and differing.sum() <= 5


def test_review_switch_writes_the_page_with_every_case_and_its_ct(restricted_run):
    page = restricted_run["out"] / "review" / "review.html"
    assert f"gtv-predict: wrote {page}" in restricted_run["stdout"]
    data = json.loads(page.read_text().split('id="review-data">', 1)[1].split("</script>", 1)[0])
    assert sorted(c["case"] for c in data["cases"]) == ["case_006", "flipped", "scaled"]
    assert all(c["error"] is None and c["view"]["ct"] for c in data["cases"])  # NIfTI, NRRD and MHA outputs


def test_non_ct_intensities_warn_but_run(restricted_run):
    warnings = [line for line in restricted_run["stderr"].splitlines() if "not Hounsfield units" in line]
    assert len(warnings) == 1 and "scaled.mha: intensities lie in [0, 1]" in warnings[0]


def test_nothing_temporary_is_left(restricted_run):
    leftovers = [p for p in restricted_run["out"].rglob(".*")]
    assert leftovers == []


def on_grid(image: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """``image`` taken onto ``grid`` voxel for voxel (nearest neighbour: exact where both hold the same centres)."""
    return sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0,
                                                image.GetPixelID()))


def test_flipped_and_permuted_copies_of_a_ct_get_the_same_contour(results, test_ct, tmp_path):
    """The plans read every CT in one orientation: copies stored with z or x flipped, or in-plane axes swapped,
    give fused labels, entropy and probability identical to the original's, compared on the original's grid."""
    folder = tmp_path / "in"
    folder.mkdir()
    original = read(test_ct)
    copies = {"original": original, "z_flipped": reversed_slice_order(original),
              "x_flipped": sitk.Flip(original, [True, False, False]),
              "permuted": sitk.PermuteAxes(original, [1, 0, 2])}
    for name, image in copies.items():
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    out = tmp_path / "out"
    code, _, stderr = run(["-i", folder, "-o", out, *SMOKE, "-m", "Local:0", "Middle:0", "Global:0", *FAST, "-np", "0",
                           "--save-probability"])
    assert code == 0, stderr
    for suffix in ("", "_entropy", "_probability"):
        reference = sitk.GetArrayFromImage(read(out / f"original{suffix}.nii.gz"))
        for name in ("z_flipped", "x_flipped", "permuted"):
            written = read(out / f"{name}{suffix}.nii.gz")
            assert_same_grid(written, read(folder / f"{name}.nii.gz"))  # each on its own input's grid
            np.testing.assert_array_equal(on_grid(written, original), reference, err_msg=f"{name}{suffix}")
    assert 0 < np.count_nonzero(sitk.GetArrayFromImage(read(out / "original.nii.gz"))) < original.GetNumberOfPixels()


def test_sagittal_ct_is_segmented_on_its_own_grid_as_its_axial_twin(results, test_ct, tmp_path):
    """The same CT stored with sagittal slices (SimpleITK's PermuteAxes: same voxels, same world positions):
    the models see it axial, and the outputs, on the sagittal grid, hold exactly the axial run's values."""
    folder = tmp_path / "in"
    folder.mkdir()
    axial = read(test_ct)
    sitk.WriteImage(axial, str(folder / "axial.nii.gz"))
    sitk.WriteImage(sitk.PermuteAxes(axial, [2, 0, 1]), str(folder / "sagittal.nii.gz"))
    out = tmp_path / "out"
    code, _, stderr = run(["-i", folder, "-o", out, *SMOKE, "-m", "Local:0", "Global:0", *FAST, "-np", "0",
                           "--save-probability"])
    assert code == 0, stderr
    assert "slices are not axial" not in stderr  # the plans' reader reorients every CT
    for suffix in ("", "_entropy", "_probability"):
        sagittal = read(out / f"sagittal{suffix}.nii.gz")
        assert_same_grid(sagittal, read(folder / "sagittal.nii.gz"))
        back = sitk.GetArrayFromImage(sitk.PermuteAxes(sagittal, [1, 2, 0]))
        np.testing.assert_array_equal(back, sitk.GetArrayFromImage(read(out / f"axial{suffix}.nii.gz")))
    assert sitk.GetArrayFromImage(read(out / "axial_probability.nii.gz")).max() > 0


def _ensemble(results: Path):
    import torch
    from nnunetv2_gtv.inference import EnsemblePredictor

    specs = resolve_models(results, DATASET_NAME, ["Local:0", "Global:0"], tr_suffix="_smoke")
    return EnsemblePredictor([load_model(s, torch.device("cpu"), 1.0, False) for s in specs], InferenceSettings())


def test_export_overlapping_prediction_writes_the_same_files(results, test_ct, tmp_path):
    """As on a GPU: each model is exported in a thread while the next one predicts."""
    from nnunetv2_gtv.ensemble.fusion import FusionSettings
    from nnunetv2_gtv.inference import RunOptions, predict_cases

    ensemble, cases = _ensemble(results), find_cases(test_ct)
    for overlap in (False, True):
        report = predict_cases(ensemble, cases, tmp_path / str(overlap), FusionSettings(), {},
                               RunOptions(num_processes=0, progress=False, overlap_export=overlap), log=lambda m: None)
        assert report.done == [cases[0].case] and not report.failures
    for name in (f"{cases[0].case}.nii.gz", f"{cases[0].case}_entropy.nii.gz"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read(tmp_path / "True" / name)),
                                      sitk.GetArrayFromImage(read(tmp_path / "False" / name)))


def test_a_model_failing_mid_case_leaves_no_outputs(results, test_ct, tmp_path, monkeypatch):
    from nnunetv2_gtv.ensemble.fusion import FusionSettings
    from nnunetv2_gtv.inference import RunOptions, predict_cases

    ensemble = _ensemble(results)
    predict = ensemble.predict_logits
    calls = []

    def second_model_fails(model, data, boxes):
        calls.append(model.label)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return predict(model, data, boxes)

    monkeypatch.setattr(ensemble, "predict_logits", second_model_fails)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="out of memory"):
        predict_cases(ensemble, find_cases(test_ct), out, FusionSettings(), {},
                      RunOptions(num_processes=0, progress=False, overlap_export=True), log=lambda m: None)
    assert calls == ["Local:0", "Global:0"]
    assert not out.exists() or [p for p in out.rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------- equivalence with the two-step path


@pytest.mark.slow
def test_same_result_as_nnunetv2_predict_plus_gtv_uncertainty(results, gtv_dataset, trained_models, test_ct,
                                                              tmp_path):
    """Same tile (the patch), step and mirroring: the fused segmentation agrees with the two-step path."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(test_ct, inputs / test_ct.name)
    env = {**gtv_dataset["env"], "nnUNet_results": str(results)}
    folders = []
    for scale in ("Local", "Global"):
        folder = tmp_path / scale
        run_cli(["nnUNetv2_predict", "-i", str(inputs), "-o", str(folder), "-d", str(DATASET_ID), "-c", "3d_fullres",
                 "-tr", f"nnUNetTrainerGTV25D{scale}_smoke", "-f", "0", "-device", "cpu", "--save_probabilities",
                 "-step_size", "1", "--disable_tta", "-npp", "1", "-nps", "1", "--disable_progress_bar"], env)
        folders.append(str(folder))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert uncertainty_main(["-i", *folders, "-o", str(tmp_path / "two_step"), "-np", "1"]) == 0
    code, _, stderr = run(["-i", inputs, "-o", tmp_path / "one_step", *SMOKE, "-m", "Local:0", "Global:0", *FAST,
                           "--tile", "patch", "--no-region-restriction", "-np", "0"])
    assert code == 0, stderr
    case = test_ct.name.removesuffix("_0000.nii.gz")
    two = sitk.GetArrayFromImage(read(tmp_path / "two_step" / f"{case}.nii.gz")) > 0
    one = sitk.GetArrayFromImage(read(tmp_path / "one_step" / f"{case}.nii.gz")) > 0
    assert two.any() and dice_score(one, two) >= 0.999
    entropy_two = sitk.GetArrayFromImage(read(tmp_path / "two_step" / f"{case}_entropy.nii.gz"))
    entropy_one = sitk.GetArrayFromImage(read(tmp_path / "one_step" / f"{case}_entropy.nii.gz"))
    assert np.mean(entropy_two != entropy_one) < 1e-3
    with open(tmp_path / "two_step" / "summary.csv") as f, open(tmp_path / "one_step" / "summary.csv") as g:
        row_two, row_one = next(csv.DictReader(f)), next(csv.DictReader(g))
    for column in ("volume_ml_model_1", "volume_ml_model_2", "volume_ml_fused"):
        assert float(row_one[column]) == pytest.approx(float(row_two[column]), rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("mirroring", [False, True])
def test_batched_tiles_give_nnunets_sliding_window_result(results, mirroring):
    """Tiles run three per call (an uneven last batch included) sum up to nnU-Net's own one-tile-per-call
    sliding window, with and without mirroring; only rounding may differ."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    spec = resolve_models(results, DATASET_NAME, ["Global:0"], tr_suffix="_smoke")[0]
    batched = load_model(spec, torch.device("cpu"), 0.5, mirroring, tiles_per_batch=3).predictor
    assert batched.tiles_per_batch == 3
    reference = nnUNetPredictor(tile_step_size=0.5, use_mirroring=mirroring, device=torch.device("cpu"),
                                allow_tqdm=False)
    reference.initialize_from_trained_model_folder(str(spec.folder), (0,), "checkpoint_final.pth")
    for predictor in (batched, reference):  # the _smoke trainers allow no mirroring; nnU-Net's GTV trainers do
        predictor.allowed_mirroring_axes = (0, 1, 2)
    data = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 20, 70, 75)).astype(np.float32))
    assert len(reference._internal_get_sliding_window_slicers(data.shape[1:])) % 3 != 0
    ours = batched.predict_sliding_window_return_logits(data).float()
    theirs = reference.predict_sliding_window_return_logits(data).float()
    assert ours.shape == theirs.shape == (2, 20, 70, 75)
    # both sum Gaussian-weighted logits (weights up to 10) in float16 and divide by the summed weights; up to 8 tiles
    # overlap a voxel here and the two add them in a different order, each addition rounding the running sum, so a
    # rare voxel differs by several units in the last place (0.021 and 0.11 seen, one voxel in 210,000): bounded
    # here, while the share of such voxels and the mean difference stay strict
    difference = torch.abs(ours - theirs)
    assert float(difference.max()) < 0.5 and float(torch.mean((difference > 0.065).float())) < 1e-4
    assert float(torch.mean(difference)) < 1e-4
    assert torch.mean((ours.argmax(0) != theirs.argmax(0)).float()) < 1e-4


def test_bfloat16_runs_and_stays_close_to_float32(results, test_ct, tmp_path):
    maps = {}
    for precision in ("float32", "bfloat16"):
        args = [a if a != "float32" else precision for a in FAST]
        out = tmp_path / precision
        code, _, stderr = run(["-i", test_ct, "-o", out, *SMOKE, "-m", "Global:0", *args, "--save-probability"])
        assert code == 0, stderr
        assert json.loads((out / "summary.json").read_text())["inference"]["bfloat16"] == (precision == "bfloat16")
        maps[precision] = sitk.GetArrayFromImage(read(next(out.glob("*_probability.nii.gz"))))
    difference = np.abs(maps["float32"] - maps["bfloat16"])
    assert 0 < difference.max() and difference.mean() < 0.01


def test_precision_auto_follows_the_cpu(monkeypatch):
    from nnunetv2_gtv.inference import settings

    for native in (True, False):
        monkeypatch.setattr(settings, "cpu_has_native_bfloat16", lambda: native)
        assert settings.use_cpu_bfloat16("auto", "cpu") is native
        assert settings.use_cpu_bfloat16("auto", "cuda") is False
    assert settings.use_cpu_bfloat16("bfloat16", "cpu") and not settings.use_cpu_bfloat16("float32", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        settings.use_cpu_bfloat16("half", "cpu")
    assert settings.default_step_size("cpu") == 1.0 and settings.default_step_size("cuda") == 0.5


# ---------------------------------------------------------------- bad input


def write_image(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


@pytest.mark.parametrize("kind, message", [
    ("2d", "a 2D image of size (40, 30)"),
    ("4d", "a 4D image"),
    ("one_slice", "is a single slice (2D)"),
    ("vector", "3 components per voxel"),
    ("garbage", "cannot read the image"),
])
def test_bad_images_are_refused_before_any_work(results, tmp_path, kind, message):
    folder = tmp_path / "in"
    folder.mkdir()
    ct = np.full((20, 30, 40), -1000, dtype=np.int16)
    if kind == "2d":
        bad = write_image(folder / "bad.nii.gz", ct[0])
    elif kind == "4d":
        bad = folder / "bad.nii.gz"
        sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(ct)] * 2), str(bad))
    elif kind == "one_slice":
        bad = write_image(folder / "bad.nii.gz", ct[:1])
    elif kind == "vector":
        bad = folder / "bad.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.stack([ct] * 3, axis=-1), isVector=True), str(bad))
    else:
        bad = folder / "bad.nii.gz"
        bad.write_bytes(b"this is not an image" * 10)
    write_image(folder / "good.nii.gz", ct)
    code, _, stderr = run(["-i", folder, "-o", tmp_path / "out", *SMOKE, "-m", "Global:0", *FAST])
    assert code == 2
    assert str(bad) in stderr and message in stderr
    assert not (tmp_path / "out").exists()


def test_unreadable_pixel_data_fails_that_case_only(results, test_ct, tmp_path):
    """A valid header with truncated data: the case fails (exit 1) and leaves no images; the others finish."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(test_ct, folder / "good.nii.gz")
    data = test_ct.read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[:len(data) // 2])
    code, stdout, stderr = run(["-i", folder, "-o", tmp_path / "out", *SMOKE, "-m", "Global:0", *FAST, "-np", "0"])
    assert code == 1
    assert f"{folder / 'truncated.nii.gz'}: cannot read the image" in stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_file()) == [
        "good.nii.gz", "good_entropy.nii.gz", "summary.csv", "summary.json", "timings.csv"]


def _tiny_ct(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 8, 8), -1000, np.int16)), str(path))
    return path


def _fake_checkpoints(results: Path, trainer: str, folds: tuple[int, ...]) -> None:
    """Checkpoint files where nnUNetv2_train puts them: enough for resolving models, not for loading them."""
    for fold in folds:
        folder = results / DATASET_NAME / f"{trainer}__nnUNetPlans__3d_fullres" / f"fold_{fold}"
        folder.mkdir(parents=True)
        (folder / "checkpoint_final.pth").write_bytes(b"")


def test_output_folder_must_not_be_in_or_hold_an_input_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    ct = _tiny_ct(tmp_path / "in" / "ct_0000.nii.gz")
    before = sorted(tmp_path.rglob("*"))
    for source, out in ((ct, ct.parent), (ct.parent, ct.parent), (ct.parent, ct.parent / "out"),
                        (ct.parent, tmp_path), (ct, tmp_path)):
        code, _, stderr = run(["-i", source, "-o", out, *SMOKE, "-m", "Global:0", *FAST])
        assert code == 2 and f"output folder {out}" in stderr and "input" in stderr, stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_a_missing_fold_is_named_with_the_folds_that_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    _fake_checkpoints(tmp_path / "results", "nnUNetTrainerGTV25DLocal", (0, 1))
    ct = _tiny_ct(tmp_path / "in" / "ct_0000.nii.gz")
    code, _, stderr = run(["-i", ct, "-o", tmp_path / "out", "-d", str(DATASET_ID), "-m", "Local:3", *FAST])
    assert code == 2
    missing = tmp_path / "results" / DATASET_NAME / "nnUNetTrainerGTV25DLocal__nnUNetPlans__3d_fullres" / "fold_3"
    assert f"Local:3: no {missing / 'checkpoint_final.pth'}" in stderr
    assert "folds with checkpoint_final.pth: 0, 1" in stderr and "-m Local:0 Local:1" in stderr
    code, _, stderr = run(["-i", ct, "-o", tmp_path / "out", "-d", str(DATASET_ID), "-m", "Local:1", "Middle:0",
                           *FAST])
    assert code == 2 and "Middle:0: no " in stderr and "no fold has checkpoint_final.pth" in stderr
    assert stderr.rstrip().endswith("-m Local:1")


def test_missing_models_are_listed_with_the_available_ones(results, test_ct, tmp_path):
    code, _, stderr = run(["-i", test_ct, "-o", tmp_path / "out", *SMOKE, *FAST])
    assert code == 2
    assert "3 of 6 models have no checkpoint" in stderr
    for label in ("Local:1", "Middle:1", "Global:1"):
        assert f"{label}: no " in stderr
    assert "-m Local:0 Middle:0 Global:0" in stderr
    code, _, stderr = run(["-i", test_ct, "-o", tmp_path / "out", *SMOKE, "-m", "Local:0", "Local:3", *FAST])
    assert code == 2 and "1 of 2 models have no checkpoint" in stderr and "fold_3" in stderr


def _copy_model(results: Path, source: str, name: str) -> Path:
    """A model folder ``name`` (trainer nnUNetTrainerX) holding ``source``'s files, checkpoint linked."""
    source_folder = results / DATASET_NAME / f"{source}__nnUNetPlans__3d_fullres"
    folder = results / DATASET_NAME / f"{name}__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    for file in ("plans.json", "dataset.json"):
        shutil.copy(source_folder / file, folder / file)
    return folder


def test_unreadable_checkpoint(results, test_ct, tmp_path):
    folder = _copy_model(results, "nnUNetTrainerGTV25DGlobal_smoke", "nnUNetTrainerBrokenCheckpoint")
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    code, _, stderr = run(["-i", test_ct, "-o", tmp_path / "out", "-d", str(DATASET_ID),
                           "-m", "nnUNetTrainerBrokenCheckpoint:0", *FAST])
    assert code == 2
    assert "model nnUNetTrainerBrokenCheckpoint:0: cannot load" in stderr and "checkpoint_final.pth" in stderr


def test_models_with_different_plans_are_refused(results, test_ct, tmp_path):
    folder = _copy_model(results, "nnUNetTrainerGTV25DGlobal_smoke", "nnUNetTrainerOtherPlans")
    source = results / DATASET_NAME / "nnUNetTrainerGTV25DGlobal_smoke__nnUNetPlans__3d_fullres" / "fold_0"
    (folder / "fold_0" / "checkpoint_final.pth").symlink_to(source / "checkpoint_final.pth")
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = [2.0, 1.0, 1.0]
    (folder / "plans.json").write_text(json.dumps(plans))
    code, _, stderr = run(["-i", test_ct, "-o", tmp_path / "out", *SMOKE,
                           "-m", "Local:0", "nnUNetTrainerOtherPlans:0", *FAST])
    assert code == 2
    assert "were trained with different plans" in stderr and "configuration 'spacing'" in stderr
    assert "nnUNetTrainerOtherPlans:0" in stderr


# ---------------------------------------------------------------- --continue and sharding


def _mtimes(folder: Path) -> dict[str, int]:
    """Modification times of the images in ``folder`` (not the tables)."""
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()
            if p.is_file() and not p.name.startswith("summ") and p.name != "timings.csv"}


def test_continue_skips_finished_cases_unless_settings_change(results, test_ct, tmp_path):
    args = ["-i", test_ct, "-o", tmp_path / "out", *SMOKE, "-m", "Local:0", "Global:0", *FAST, "-np", "0"]
    assert run(args)[0] == 0
    before = _mtimes(tmp_path / "out")
    kill_while_writing(tmp_path / "out" / "case_006.nii.gz")  # what a killed run leaves
    kill_while_writing(tmp_path / "out" / "per_case" / "case_006.json")
    code, stdout, _ = run([*args, "--continue"])
    assert code == 0 and "1 already finished, 0 to predict" in stdout
    assert _mtimes(tmp_path / "out") == before
    assert not list((tmp_path / "out").rglob(".*"))
    code, stdout, _ = run([*args, "--continue", "--tile", "slab"])
    assert code == 0 and "0 already finished, 1 to predict" in stdout
    assert all(_mtimes(tmp_path / "out")[name] > time for name, time in before.items())
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["inference"]["tile"] == "slab"


def test_a_run_killed_and_continued_keeps_every_cases_timing_row(results, test_ct, tmp_path):
    """kill -9 of gtv-predict as soon as its first case is finished, then --continue: timings.csv ends with one row
    per case, the killed run's included, like the summary."""
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(5):
        shutil.copy(test_ct, folder / f"copy_{k}_0000.nii.gz")
    out = tmp_path / "out"
    args = ["-i", str(folder), "-o", str(out), *SMOKE, "-m", "Local:0", "Global:0", *FAST, "-np", "0"]
    command = [sys.executable, "-c", "import sys; from nnunetv2_gtv.cli.predict import main; sys.exit(main())", *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / "per_case").glob("*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = sorted(p.stem for p in (out / "per_case").glob("*.json"))
    assert 1 <= len(finished) < 5, "the run must be killed between its cases"
    code, stdout, _ = run([*args, "--continue"])
    assert code == 0 and f"{len(finished)} already finished, {5 - len(finished)} to predict" in stdout
    timings = _timings(out)
    assert sorted(timings) == [f"copy_{k}" for k in range(5)]
    assert all(float(row["seconds"]) > 0 and len(row["models"].split()) == 2 for row in timings.values())


def test_parts_share_one_output_folder(results, cts, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("case_006_0000.nii.gz", "flipped.nrrd"):
        shutil.copy(cts / name, folder / name)
    out = tmp_path / "out"
    args = ["-i", folder, "-o", out, *SMOKE, "-m", "Global:0", *FAST, "-num_parts", "2"]

    def summary_cases() -> list[str]:
        with open(out / "summary.csv") as f:
            return [row["case"] for row in csv.DictReader(f)]

    assert run([*args, "-part_id", "1"])[0] == 0  # cases sorted: case_006, flipped; part 1 is flipped
    assert sorted(_mtimes(out)) == ["flipped.nrrd", "flipped_entropy.nrrd"]
    assert summary_cases() == ["flipped"]
    check = ["-i", folder, "-o", out, *SMOKE, "-m", "Global:0", *FAST, "--check"]
    code, stdout, stderr = run(check)  # what the last job of a sharded run does: nothing predicted, case_006 named
    assert code == 1 and "1 finished" in stdout and "case_006: not finished in" in stderr
    assert sorted(_mtimes(out)) == ["flipped.nrrd", "flipped_entropy.nrrd"] and summary_cases() == ["flipped"]
    assert run([*args, "-part_id", "0"])[0] == 0
    assert sorted(_mtimes(out)) == ["case_006.nii.gz", "case_006_entropy.nii.gz", "flipped.nrrd",
                                    "flipped_entropy.nrrd"]
    assert summary_cases() == ["case_006", "flipped"]
    assert sorted(_timings(out)) == ["case_006", "flipped"]  # the second part kept the first part's row
    before = _mtimes(out)
    code, stdout, _ = run(check)
    assert code == 0 and "2 finished" in stdout and summary_cases() == ["case_006", "flipped"]
    assert _mtimes(out) == before
    with pytest.raises(SystemExit):
        run([*check, "-num_parts", "2"])


# ---------------------------------------------------------------- units


def test_model_specs():
    assert parse_model_spec("Local:0") == ("nnUNetTrainerGTV25DLocal", 0)
    assert parse_model_spec("global:1", "_smoke") == ("nnUNetTrainerGTV25DGlobal_smoke", 1)
    assert parse_model_spec("nnUNetTrainerGTV25DMiddle_smoke:all") == ("nnUNetTrainerGTV25DMiddle_smoke", "all")
    for bad in ("Local", "Local:x", "Head:0", ":0"):
        with pytest.raises(ModelError):
            parse_model_spec(bad)


def test_default_models_and_duplicates(tmp_path):
    with pytest.raises(ModelError, match="6 of 6 models have no checkpoint"):
        resolve_models(tmp_path, "Dataset001_X", None)
    with pytest.raises(ModelError, match="listed twice"):
        resolve_models(tmp_path, "Dataset001_X", ["Local:0", "nnUNetTrainerGTV25DLocal:0"])


def test_tiles():
    assert parse_tile("16x128x96") == (16, 128, 96)
    for bad in ("big", "16x128", "0x64x64"):
        with pytest.raises(ValueError):
            parse_tile(bad)
    patch, divisor = (16, 64, 64), (1, 8, 8)
    assert tile_shape("patch", patch, (40, 90, 100), divisor) == (16, 64, 64)
    assert tile_shape("slab", patch, (40, 90, 100), divisor) == (16, 96, 104)
    assert tile_shape("whole", patch, (40, 90, 100), divisor) == (40, 96, 104)
    assert tile_shape("whole", patch, (10, 30, 100), divisor) == (16, 64, 104)
    with pytest.raises(ValueError, match="multiple of"):
        tile_shape((16, 60, 64), patch, (40, 90, 100), divisor)
    with pytest.raises(ValueError):
        InferenceSettings(step_size=0)


def test_case_names(tmp_path):
    for name in ("a_0000.nii.gz", "b.nrrd", "c_0001.mha", "d.nii"):
        write_image(tmp_path / name, np.zeros((4, 4, 4), np.int16))
    assert [(c.case, c.file_ending) for c in find_cases(tmp_path)] == [
        ("a", ".nii.gz"), ("b", ".nrrd"), ("c_0001", ".mha"), ("d", ".nii")]
    write_image(tmp_path / "a_0001.nii.gz", np.zeros((4, 4, 4), np.int16))
    assert [f.name for f in find_cases(tmp_path)[0].files] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    (tmp_path / "a_0001.nii.gz").unlink()
    write_image(tmp_path / "a.nrrd", np.zeros((4, 4, 4), np.int16))
    with pytest.raises(InputError, match="are both case 'a'"):
        find_cases(tmp_path)
    with pytest.raises(InputError, match="no such file or folder"):
        find_cases(tmp_path / "missing")


def test_intensity_warnings():
    path = Path("x.nii.gz")
    assert intensity_warning(np.array([-1000.0, 40.0, 1200.0]), path) is None
    assert "not Hounsfield units" in intensity_warning(np.array([0.0, 0.3, 1.0]), path)
    assert "no intensity below 0" in intensity_warning(np.array([0.0, 1024.0, 2200.0]), path)


def test_in_memory_fusion_checks_each_map(tmp_path):
    from nnunetv2_gtv.ensemble import DatasetInfo, FusionInputError
    from nnunetv2_gtv.ensemble.fusion import fuse_probability_maps

    properties = {"spacing": [3.0, 1.0, 1.0], "shape_before_cropping": (4, 5, 6),
                  "sitk_stuff": {"spacing": (1.0, 1.0, 3.0), "origin": (0.0, 0.0, 0.0),
                                 "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}}
    dataset = DatasetInfo(".nii.gz", 2)
    good = np.stack([np.full((4, 5, 6), 0.75, np.float32), np.full((4, 5, 6), 0.25, np.float32)])
    with pytest.raises(FusionInputError, match=r"case c: B: probabilities of shape \(2, 4, 5, 7\)"):
        fuse_probability_maps("c", iter([good, np.zeros((2, 4, 5, 7), np.float32)]), ["A", "B"], properties,
                              tmp_path, dataset)
    with pytest.raises(FusionInputError, match="case c: B: probabilities do not sum to 1"):
        fuse_probability_maps("c", iter([good, good * 0.5]), ["A", "B"], properties, tmp_path, dataset)
    result = fuse_probability_maps("c", iter([good, good[::-1]]), ["A", "B"], properties, tmp_path, dataset)
    assert result.model_volumes_ml == (0.0, 0.36)  # B votes foreground in all 120 voxels of 3 mm^3
    entropy = sitk.GetArrayFromImage(read(tmp_path / "c_entropy.nii.gz"))
    np.testing.assert_allclose(entropy, math.log(2))
