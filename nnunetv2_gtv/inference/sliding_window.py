"""nnU-Net's predictor with the sliding window's tiles run several at a time.

nnU-Net feeds its network one tile per call. On the CPU, PyTorch (2.x, float32) then runs a ``Conv3d`` on these
small 16 x 64 x 64 tiles with its slow reference kernel (``slow_conv3d``) instead of oneDNN: its heuristic
for batch 1 looks at N x C x D x H only. From two tiles per call on it takes oneDNN, and a tile costs about
half (README, gtv-predict). Under bfloat16 two tiles per call are also faster here (0.079 s against 0.108 s
per tile on the clinical-size benchmark CT). On a GPU, batches keep the device busy.

The result is nnU-Net's sliding window: the same tiles and Gaussian weights, accumulated in the same order and
precision (float16, as nnU-Net does); only floating-point rounding inside the convolutions may differ.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

DEFAULT_TILES_PER_BATCH = {"cpu": 2, "cuda": 8}


def default_tiles_per_batch(device: torch.device) -> int:
    return DEFAULT_TILES_PER_BATCH.get(device.type, 1)


class BatchedTilePredictor(nnUNetPredictor):
    """``nnUNetPredictor`` whose sliding window runs ``tiles_per_batch`` tiles per network call."""

    def __init__(self, *args, tiles_per_batch: int = 2, **kwargs):
        if tiles_per_batch < 1:
            raise ValueError(f"tiles_per_batch must be at least 1, got {tiles_per_batch}")
        super().__init__(*args, **kwargs)
        self.tiles_per_batch = tiles_per_batch

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers,
                                                       do_on_device: bool = True) -> torch.Tensor:
        results_device = self.device if do_on_device else torch.device("cpu")
        data = data.to(results_device)
        logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.half,
                             device=results_device)
        weights = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
        gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                    value_scaling_factor=10, device=results_device) if self.use_gaussian else 1
        for start in range(0, len(slicers), self.tiles_per_batch):
            batch = slicers[start:start + self.tiles_per_batch]
            tiles = torch.stack([data[tile] for tile in batch]).to(self.device)
            predictions = self._internal_maybe_mirror_and_predict(tiles).to(results_device)
            for prediction, tile in zip(predictions, batch):
                if self.use_gaussian:
                    prediction *= gaussian
                logits[tile] += prediction
                weights[tile[1:]] += gaussian
        torch.div(logits, weights, out=logits)
        if torch.isinf(logits).any():
            raise RuntimeError("infinite logits in the sliding-window sum (float16 overflow)")
        return logits


@contextlib.contextmanager
def batched_tiles_in_nnunet_validation(tile_step_size: float, tiles_per_batch: int) -> Iterator[None]:
    """While active, nnU-Net's end-of-training validation (``nnUNetTrainer.perform_actual_validation``) predicts
    with a :class:`BatchedTilePredictor` of ``tiles_per_batch`` tiles per call at ``tile_step_size`` instead of
    its one-tile ``nnUNetPredictor`` at step 0.5; everything else of the validation stays nnU-Net's.

    nnU-Net builds that predictor from a name of its trainer module, so the name is swapped here and restored.
    """
    trainer_module = importlib.import_module("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")
    original = trainer_module.nnUNetPredictor

    def predictor(**kwargs) -> BatchedTilePredictor:
        return BatchedTilePredictor(**{**kwargs, "tile_step_size": tile_step_size}, tiles_per_batch=tiles_per_batch)

    trainer_module.nnUNetPredictor = predictor
    try:
        yield
    finally:
        trainer_module.nnUNetPredictor = original
