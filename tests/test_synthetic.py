"""The synthetic CT generator writes a valid nnU-Net raw dataset with the intended geometry."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_gtv.demo import synthetic
from nnunetv2_gtv.demo.synthetic import NECK_START, CaseGeometry, render_case, write_dataset

from conftest import clean_env, run_cli


def test_dataset_passes_nnunet_integrity_check(nnunet_dirs):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    path = write_dataset(nnunet_dirs["nnUNet_raw"], 991, num_train=3, num_test=1, in_plane_size=48, num_slices=16,
                         orientations="mixed")
    verify_dataset_integrity(str(path), num_processes=1)  # raises on any problem
    dataset = json.loads((path / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"} and dataset["labels"] == {"background": 0, "GTV": 1}
    assert dataset["numTraining"] == 3
    assert sorted(p.name for p in (path / "imagesTs").iterdir()) == ["case_003_0000.nii.gz"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_files_carry_spacing_direction_and_hounsfield_units(tmp_path):
    path = write_dataset(tmp_path, 992, num_train=3, num_test=0, in_plane_size=40, num_slices=12,
                         orientations="mixed", seed=3)
    directions = []
    for case in ("case_000", "case_001", "case_002"):
        image = sitk.ReadImage(str(path / "imagesTr" / f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(str(path / "labelsTr" / f"{case}.nii.gz"))
        sx, sy, sz = image.GetSpacing()
        assert sx == pytest.approx(sy) and 0.8 <= sx <= 1.2 and 2.5 <= sz <= 3.5
        assert label.GetSpacing() == image.GetSpacing() and label.GetDirection() == image.GetDirection()
        assert label.GetOrigin() == image.GetOrigin()
        directions.append(tuple(round(v) for v in np.array(image.GetDirection())[[0, 4, 8]]))
        hu = sitk.GetArrayFromImage(image)
        assert hu.dtype == np.int16 and hu.min() <= -950 and hu.max() >= 900  # air and bone in HU
        assert sitk.GetArrayFromImage(label).sum() > 0
    assert directions == [synthetic.ORIENTATIONS[o] for o in ("identity", "flip_superior", "flip_inplane")]


@pytest.mark.parametrize("orientation", list(synthetic.ORIENTATIONS))
def test_anatomy_is_the_same_in_the_world_whatever_the_voxel_order(orientation):
    """The GTV is centred in the upper (head) part in world coordinates (sized in mm, a large one can reach below
    the head in a small field of view), the shoulders are widest, in every orientation."""
    geometry = CaseGeometry((30, 64, 64), (1.0, 1.0, 3.0), synthetic.ORIENTATIONS[orientation])
    image, label = render_case(geometry, np.random.default_rng(0))
    world_z = geometry.world_axes()[2]
    gtv_z = np.repeat(world_z, label.sum(axis=(1, 2)).astype(np.int64))
    relative = (gtv_z - world_z.min()) / (world_z.max() - world_z.min())
    assert relative.mean() > synthetic.HEAD_START
    body_area = (image > -500).sum(axis=(1, 2))
    lowest_slice = int(np.argmin(world_z))
    neck_slice = int(np.argmin(np.abs((world_z - world_z.min()) / np.ptp(world_z) - (NECK_START + 0.15))))
    assert body_area[lowest_slice] > 2 * body_area[neck_slice]
    # low contrast: the GTV is within 40 HU of the surrounding soft tissue on average
    assert abs(float(image[label > 0].mean()) - synthetic.SOFT_TISSUE_HU) < 40


def test_same_seed_same_data_and_refusal_to_overwrite(tmp_path):
    first = write_dataset(tmp_path / "a", 993, num_train=1, num_test=0, in_plane_size=32, num_slices=10, seed=7)
    second = write_dataset(tmp_path / "b", 993, num_train=1, num_test=0, in_plane_size=32, num_slices=10, seed=7)
    read = lambda p: sitk.GetArrayFromImage(sitk.ReadImage(str(p / "imagesTr" / "case_000_0000.nii.gz")))  # noqa: E731
    np.testing.assert_array_equal(read(first), read(second))
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_dataset(tmp_path / "a", 993, num_train=1, num_test=0, in_plane_size=32, num_slices=10, seed=8)
    np.testing.assert_array_equal(read(first), read(second))  # untouched after the refusal
    write_dataset(tmp_path / "a", 993, num_train=1, num_test=0, in_plane_size=32, num_slices=10, seed=8,
                  overwrite=True)
    assert not np.array_equal(read(first), read(second))


def test_cli_refuses_existing_dataset_with_exit_code(tmp_path):
    env = clean_env()
    args = ["gtv-synthetic", "-o", str(tmp_path), "-d", "994", "--num-train", "1", "--num-test", "0",
            "--size", "32", "--slices", "10"]
    assert "wrote 1 training" in run_cli(args, env).stdout
    refused = run_cli(args, env, check=False)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr and "Dataset994_SyntheticGTV" in refused.stderr


def test_nodes_are_labelled_gtvnd_in_the_upper_and_middle_neck(tmp_path):
    from scipy import ndimage

    path = write_dataset(tmp_path, 995, num_train=6, num_test=0, in_plane_size=64, num_slices=24,
                         orientations="mixed", seed=5, in_plane_mm=(1.6, 1.9), nodes=True)
    assert json.loads((path / "dataset.json").read_text())["labels"] == {"background": 0, "GTVp": 1, "GTVnd": 2}
    for label_path in sorted((path / "labelsTr").iterdir()):
        label = sitk.ReadImage(str(label_path))
        array = sitk.GetArrayFromImage(label)
        assert set(np.unique(array)) == {0, 1, 2}
        components, count = ndimage.label(array == 2)
        assert 1 <= count <= 4
        world_z = np.array([label.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(array.shape[0])])
        for centre in ndimage.center_of_mass(array == 2, components, range(1, count + 1)):
            relative = (np.interp(centre[0], np.arange(len(world_z)), world_z) - world_z.min()) / np.ptp(world_z)
            assert NECK_START < relative < synthetic.HEAD_START  # each node's centre lies in the neck
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(path / "imagesTr" / label_path.name.replace(
            ".nii.gz", "_0000.nii.gz"))))
        assert abs(float(image[array == 2].mean()) - synthetic.GTV_HU) < 15  # as dense as the primary
