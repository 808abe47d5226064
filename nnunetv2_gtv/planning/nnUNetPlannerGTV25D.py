"""``nnUNetPlannerGTV25D``: nnU-Net plans for the 2.5D GTV network of Mei et al.

What differs from nnU-Net's default ``ExperimentPlanner`` (everything else is nnU-Net's own):

- target spacing 3 x 1 x 1 mm (z, y, x) whatever the data's median spacing, or the one given with nnU-Net's
  ``-overwrite_target_spacing Z Y X`` (e.g. the CPU recipe's coarser grid); array axis 0 stays the slice axis
  (no transpose), since the 2.5D network convolves in-plane only;
- one configuration, ``3d_fullres``: patch 16 x 64 x 64, batch 16, the 2.5D network with its default
  arch_kwargs. There is no ``2d`` and no ``3d_lowres`` configuration (plans list only ``3d_fullres``);
- intensities: nnU-Net's built-in ``CTNormalization`` clips each channel to the window written in the plans and
  z-scores it with the mean and std written there. This planner writes the window [-200, 700] HU (or the channel's
  from dataset.json, ``planning.ct_channels``) and, by default (``intensity_statistics = "clipped_body"``), the
  mean and std of the training images' body voxels (HU > ``body_threshold_hu``) after clipping to the window
  (paper section 3.1), channel by channel. With ``intensity_statistics = "foreground"`` it keeps nnU-Net's
  statistics of the labelled voxels instead;
- images are read in one orientation whatever their storage order: for NIfTI/NRRD/MHA the plans name nnU-Net's
  ``SimpleITKIOWithReorient`` (every image reoriented to RAS when read, segmentations written back in the file's
  own orientation), so training, ``nnUNetv2_predict`` and ``gtv-predict`` see the same array for the same CT
  however it is stored, and the 2.5D network's tiles fall on the same voxels;
- the channels must be CTs (one, or several co-registered ones such as a plain and a contrast-enhanced CT,
  ``planning.ct_channels``); the sampling regions are found on channel 0;
- plans are written whole (atomically), never merged with configurations of an older file of the same name.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join, save_json
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from tqdm import tqdm

from nnunetv2_gtv import __version__
from nnunetv2_gtv.io.atomic import atomic_path
from nnunetv2_gtv.planning.ct_channels import REGION_CHANNEL, ct_windows
from nnunetv2_gtv.network.gtv_unet import plans_architecture
from nnunetv2_gtv.planning.plans_check import GTV_PLANS_KEY, GTVPlansError

TARGET_SPACING_ZYX = (3.0, 1.0, 1.0)
PATCH_SIZE_ZYX = (16, 64, 64)
BATCH_SIZE = 16


class nnUNetPlannerGTV25D(ExperimentPlanner):
    intensity_statistics: str = "clipped_body"  # or "foreground" (nnU-Net's fingerprint of the labelled voxels)
    body_threshold_hu: float = -500.0
    statistics_voxel_stride: int = 7  # every n-th body voxel enters the median estimate

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnUNetPlans",
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        if overwrite_target_spacing is not None:
            spacing = [float(v) for v in overwrite_target_spacing]
            if len(spacing) != 3 or not all(np.isfinite(v) and v > 0 for v in spacing):
                raise GTVPlansError(f"-overwrite_target_spacing needs three positive numbers (z y x, mm), got "
                                    f"{list(overwrite_target_spacing)}")
            overwrite_target_spacing = spacing
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.lowres_creation_threshold = 0  # never plan 3d_lowres
        self.ct_windows = ct_windows(self.dataset_json, join(self.raw_dataset_folder, "dataset.json"))

    def determine_reader_writer(self):
        """nnU-Net's reader for the dataset's files, reorienting (SimpleITKIOWithReorient) where that is
        SimpleITKIO: a z-flipped or axis-permuted copy of a CT must give the same contour."""
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO, SimpleITKIOWithReorient

        reader = super().determine_reader_writer()
        return SimpleITKIOWithReorient if reader is SimpleITKIO else reader

    def determine_fullres_target_spacing(self) -> np.ndarray:
        return np.array(self.target_spacing_zyx)

    @property
    def target_spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(self.overwrite_target_spacing) if self.overwrite_target_spacing else TARGET_SPACING_ZYX

    def determine_transpose(self):
        """No transpose: nnU-Net would put the axis of the largest target spacing first, which for an in-plane
        spacing coarser than the slices' would make the 2.5D network convolve across slices."""
        return [0, 1, 2], [0, 1, 2]

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        if len(spacing) == 2:
            # ExperimentPlanner.plan_experiment always asks for a 2d configuration; save_plans drops it
            return {"dropped_by": type(self).__name__}
        # built here rather than by ExperimentPlanner, whose network sizing (VRAM estimates of PlainConvUNet
        # patches) is slow, fails with nnUNet_n_proc_DA=0, and would be overwritten anyway
        resampling_data, resampling_data_kwargs, resampling_seg, resampling_seg_kwargs = self.determine_resampling()
        resampling_probabilities, resampling_probabilities_kwargs = self.determine_segmentation_softmax_export_fn()
        return {
            "data_identifier": data_identifier,
            "preprocessor_name": self.preprocessor_name,
            "batch_size": BATCH_SIZE,
            "patch_size": list(PATCH_SIZE_ZYX),
            "median_image_size_in_voxels": median_shape,
            "spacing": spacing,
            "normalization_schemes": ["CTNormalization"] * len(self.ct_windows),
            "use_mask_for_norm": [False] * len(self.ct_windows),
            "resampling_fn_data": resampling_data.__name__,
            "resampling_fn_seg": resampling_seg.__name__,
            "resampling_fn_data_kwargs": resampling_data_kwargs,
            "resampling_fn_seg_kwargs": resampling_seg_kwargs,
            "resampling_fn_probabilities": resampling_probabilities.__name__,
            "resampling_fn_probabilities_kwargs": resampling_probabilities_kwargs,
            "architecture": plans_architecture(),
        }

    def _clipped_body_statistics(self) -> list[dict]:
        """Per channel: mean, std and median of the body voxels of all training images (the channel's own voxels
        above ``body_threshold_hu``) after clipping to the channel's CT window."""
        reader = self.determine_reader_writer()()
        sums = [{"count": 0, "total": 0.0, "total_sq": 0.0, "sample": []} for _ in self.ct_windows]
        for case in tqdm(self.dataset.values(), desc="CT window statistics"):
            image, _ = reader.read_images(case["images"])
            for channel, ((low, high), acc) in enumerate(zip(self.ct_windows, sums)):
                values = image[channel][image[channel] > self.body_threshold_hu].astype(np.float64)
                np.clip(values, low, high, out=values)
                acc["count"] += values.size
                acc["total"] += values.sum()
                acc["total_sq"] += np.square(values).sum()
                acc["sample"].append(values[:: self.statistics_voxel_stride])
        statistics = []
        for channel, acc in enumerate(sums):
            if acc["count"] == 0:
                raise GTVPlansError(f"no training image in {self.raw_dataset_folder} has voxels above "
                                    f"{self.body_threshold_hu} HU in channel {channel}: are these CT images in "
                                    "Hounsfield units?")
            mean = acc["total"] / acc["count"]
            statistics.append({"mean": mean, "std": float(np.sqrt(max(acc["total_sq"] / acc["count"] - mean**2, 0.0))),
                               "median": float(np.median(np.concatenate(acc["sample"])))})
        return statistics

    def plan_experiment(self) -> dict:
        if self.intensity_statistics == "clipped_body":
            statistics = self._clipped_body_statistics()
        elif self.intensity_statistics == "foreground":
            fingerprint = self.dataset_fingerprint["foreground_intensity_properties_per_channel"]
            statistics = [{key: fingerprint[str(channel)][key] for key in ("mean", "std", "median")}
                          for channel in range(len(self.ct_windows))]
        else:
            raise GTVPlansError(f"unknown intensity_statistics '{self.intensity_statistics}' "
                                "(use 'clipped_body' or 'foreground')")
        self._ct_intensity_properties = {
            str(channel): {**channel_statistics, "min": low, "max": high, "percentile_00_5": low,
                           "percentile_99_5": high}
            for channel, (channel_statistics, (low, high)) in enumerate(zip(statistics, self.ct_windows))}
        return super().plan_experiment()

    def save_plans(self, plans: dict) -> None:
        plans["configurations"].pop("2d", None)
        plans["foreground_intensity_properties_per_channel"] = self._ct_intensity_properties
        plans[GTV_PLANS_KEY] = {
            "planner": type(self).__name__,
            "nnunetv2_gtv_version": __version__,
            "ct_window_hu": list(self.ct_windows[0]),
            "ct_windows_hu": [list(window) for window in self.ct_windows],
            "region_channel": REGION_CHANNEL,
            "intensity_statistics": self.intensity_statistics,
            "body_threshold_hu": self.body_threshold_hu,
            "target_spacing_zyx": list(self.target_spacing_zyx),
            "patch_size_zyx": list(PATCH_SIZE_ZYX),
        }
        recursive_fix_for_json_export(plans)
        folder = join(nnUNet_preprocessed, self.dataset_name)
        os.makedirs(folder, exist_ok=True)
        plans_file = join(folder, self.plans_identifier + ".json")
        with atomic_path(plans_file, ".json") as temporary:
            save_json(plans, str(temporary), sort_keys=False)
        print(f"nnUNetPlannerGTV25D: plans (3d_fullres only, {self.target_spacing_zyx} mm, patch {PATCH_SIZE_ZYX}, "
              f"CT window{'s' if len(self.ct_windows) > 1 else ''} "
              f"{', '.join(str(w) for w in self.ct_windows)} HU) saved to {plans_file}")
