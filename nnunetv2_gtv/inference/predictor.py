"""One preprocessing per CT, then every model of the ensemble on the same tensor.

Preprocessing is nnU-Net's (``DefaultPreprocessor.run_case_npy`` under the shared plans) and each model runs
through its own ``nnUNetPredictor.predict_sliding_window_return_logits``, with the tile of the settings
swapped in as the configuration's patch size. Logits stay on the preprocessed grid; ``export`` maps them back.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunetv2_gtv.inference.models import LoadedModel
from nnunetv2_gtv.inference.settings import InferenceSettings, tile_shape
from nnunetv2_gtv.training.regions import (
    Box, air_threshold_from_plans, anterior_axis_from_direction, body_threshold_from_plans, bone_threshold_from_plans,
    compute_regions, superior_axis_from_direction,
)

# foreground logit outside a model's region: softmax gives background probability 1 (and fits float16); the
# region-aware fusion leaves the model out there instead (``model_region``), nnU-Net's own tools read background
OUTSIDE_FOREGROUND_LOGIT = -1e4


class EnsemblePredictor:
    """The models of one ensemble (sharing plans, see ``check_shared_preprocessing``) and how they run."""

    def __init__(self, models: Sequence[LoadedModel], settings: InferenceSettings):
        self.models = list(models)
        self.settings = settings
        reference = self.models[0].predictor
        self.plans_manager = reference.plans_manager
        self.configuration_manager = reference.configuration_manager
        self.dataset_json = reference.dataset_json
        self.num_labels = reference.label_manager.num_segmentation_heads
        for model in self.models:  # an explicit tile that does not fit a network fails now, not mid-run
            tile_shape(settings.tile, model.predictor.configuration_manager.patch_size,
                       model.predictor.configuration_manager.patch_size, model.required_divisor)

    def preprocess(self, image: np.ndarray, properties: dict) -> tuple[torch.Tensor, dict]:
        """nnU-Net's preprocessing of a (1, z, y, x) image read by the plans' reader/writer."""
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case_npy(image, None, properties, self.plans_manager,
                                                        self.configuration_manager, self.dataset_json)
        return torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format), properties

    def region_boxes(self, data: torch.Tensor, properties: dict) -> tuple[dict[str, Box], tuple[str, ...]]:
        """Where each sampling region's models run on the preprocessed CT, and any warnings of the region finder.

        Local and Middle: their sampling regions as the trainers found them for training. Global: the body's
        bounding box (with the regions' margins, 10 mm in-plane), all its slices; outside the body there is no
        tumour to find. Without region restriction every model runs on the whole image.
        """
        shape = tuple(data.shape[1:])
        if not self.settings.restrict_to_region:
            return {"global": Box.full(shape)}, ()
        direction, transpose_forward = properties["sitk_stuff"]["direction"], self.plans_manager.transpose_forward
        plans = self.plans_manager.plans
        regions = compute_regions(data[0].numpy(), self.configuration_manager.spacing,
                                  *superior_axis_from_direction(direction, transpose_forward),
                                  body_threshold_from_plans(plans), bone_threshold=bone_threshold_from_plans(plans),
                                  anterior=anterior_axis_from_direction(direction, transpose_forward),
                                  air_threshold=air_threshold_from_plans(plans))
        return {**regions.boxes, "global": regions.body_box}, regions.warnings

    @staticmethod
    def model_box(model: LoadedModel, boxes: Mapping[str, Box]) -> Box:
        """The box ``model`` runs in: its sampling region's, else the global one."""
        return boxes.get(model.sampling_region, boxes["global"])

    def model_region(self, model: LoadedModel, data: torch.Tensor, boxes: Mapping[str, Box]
                     ) -> tuple[tuple[int, int], ...] | None:
        """The box ``model`` runs in on the preprocessed grid; None when it is the whole image."""
        box = self.model_box(model, boxes)
        return None if box.shape == tuple(data.shape[1:]) else box.ranges

    def predict_logits(self, model: LoadedModel, data: torch.Tensor, boxes: Mapping[str, Box]) -> np.ndarray:
        """(C, z, y, x) float16 logits of ``model`` on the preprocessed grid, as nnU-Net's predictor makes them."""
        box = self.model_box(model, boxes)
        predictor = model.predictor
        patch_size = predictor.configuration_manager.patch_size
        tile = tile_shape(self.settings.tile, patch_size, box.shape, model.required_divisor)
        configuration = predictor.configuration_manager
        predictor.configuration_manager = ConfigurationManager({**configuration.configuration,
                                                                "patch_size": list(tile)})
        # nnU-Net autocasts only on CUDA; this context is the optional bfloat16 of the CPU
        cpu_bfloat16 = self.settings.bfloat16 and predictor.device.type == "cpu"
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bfloat16):
                logits = predictor.predict_sliding_window_return_logits(data[(slice(None), *box.slices)]).cpu()
        finally:
            predictor.configuration_manager = configuration
        if box.shape == tuple(data.shape[1:]):
            return logits.numpy()
        full = torch.full((logits.shape[0], *data.shape[1:]), OUTSIDE_FOREGROUND_LOGIT, dtype=logits.dtype)
        full[0] = 0
        full[(slice(None), *box.slices)] = logits
        return full.numpy()
