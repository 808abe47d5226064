"""Attention maps of a trained model on a CT (Mei et al., Fig. 8), from the forward pass that predicts it.

The map of one attention block (an AM's spatial map ``a`` or an AG's coefficients ``alpha``, one channel in
[0, 1]) is captured by a forward hook while nnU-Net's sliding window predicts the CT, tile by tile. Each tile's
map, at that block's resolution, is up-sampled (trilinear) to the tile and stitched exactly as the logits are:
weighted by the same Gaussian and divided by the summed weights. The stitched map on the preprocessed grid is
then resampled to the CT's grid as nnU-Net resamples probabilities (the plans' ``resampling_fn_probabilities``),
put back into the uncropped image, and transposed back. Outside the region the model predicts (its sampling
region) the map is 0. With test-time mirroring on, only the unmirrored pass of each tile is used.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_gtv.network.blocks import AttentionGate, AttentionModule

DEFAULT_BLOCK = "last"


class AttentionBlockError(ValueError):
    """The model has no attention block of the requested name."""


def attention_blocks(network: nn.Module) -> dict[str, nn.Module]:
    """The network's attention blocks by module path, in forward order, each mapped to the submodule whose output
    is the map (``AttentionModule.attention_map`` or ``AttentionGate.coefficients``)."""
    blocks = {}
    for name, module in network.named_modules():
        if isinstance(module, AttentionModule):
            blocks[name] = module.attention_map
        elif isinstance(module, AttentionGate):
            blocks[name] = module.coefficients
    return blocks


def choose_block(network: nn.Module, block: str = DEFAULT_BLOCK) -> tuple[str, nn.Module]:
    """(name, map submodule) of ``block``: a module path, or "last" (the highest-resolution decoder block)."""
    blocks = attention_blocks(network)
    if not blocks:
        raise AttentionBlockError(f"{type(network).__name__} has no attention module (AM) or gate (AG); "
                                  "attention maps need a model trained with attention")
    if block == DEFAULT_BLOCK:
        return next(reversed(blocks.items()))
    if block not in blocks:
        raise AttentionBlockError(f"no attention block '{block}'; this network has: {', '.join(blocks)}")
    return block, blocks[block]


@dataclass
class _Stitcher:
    """Accumulates tile maps with the sliding window's Gaussian, for one call of the window."""

    shape: tuple[int, ...]
    slicers: list
    tiles_per_batch: int
    gaussian: torch.Tensor | float
    total: torch.Tensor = field(init=False)
    weights: torch.Tensor = field(init=False)
    batch: int = 0

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.shape, dtype=torch.float32)
        self.weights = torch.zeros(self.shape, dtype=torch.float32)

    def add(self, maps: torch.Tensor) -> None:
        """Add one network call's maps (tiles, 1, z, y, x at block resolution) for the next batch of slicers."""
        start = self.batch * self.tiles_per_batch
        batch = self.slicers[start:start + self.tiles_per_batch]
        if len(batch) != maps.shape[0]:
            raise RuntimeError(f"attention map of {maps.shape[0]} tiles for a batch of {len(batch)}")
        tile = tuple(s.stop - s.start for s in batch[0][1:])
        maps = F.interpolate(maps.float(), size=tile, mode="trilinear", align_corners=False)[:, 0].cpu()
        for tile_map, slicer in zip(maps, batch):
            self.total[slicer[1:]] += tile_map * self.gaussian
            self.weights[slicer[1:]] += self.gaussian
        self.batch += 1

    def result(self) -> torch.Tensor:
        return self.total / self.weights.clamp_min(1e-12)


class AttentionRecorder:
    """While active, stitches the chosen block's map of every sliding-window prediction of ``predictor``.

    ``maps`` holds one stitched map per ``predict_sliding_window_return_logits`` call, cropped like its logits.
    """

    def __init__(self, predictor, block: str = DEFAULT_BLOCK):
        self.predictor = predictor
        self.block_name, self.module = choose_block(predictor.network, block)
        self.maps: list[torch.Tensor] = []
        self._stitcher: _Stitcher | None = None
        self._captured: list[torch.Tensor] = []

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._captured.append(output.detach())

    @contextlib.contextmanager
    def active(self) -> Iterator["AttentionRecorder"]:
        """Wrap the predictor's window and tile calls (instance attributes, removed afterwards) and hook the block."""
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        predictor = self.predictor
        window, tiles = predictor._internal_predict_sliding_window_return_logits, \
            predictor._internal_maybe_mirror_and_predict

        def predict_window(data, slicers, *args, **kwargs):
            patch = tuple(predictor.configuration_manager.patch_size)
            gaussian = (compute_gaussian(patch, sigma_scale=1. / 8, value_scaling_factor=10, device=torch.device("cpu"))
                        .float() if predictor.use_gaussian else 1.0)
            self._stitcher = _Stitcher(tuple(data.shape[1:]), list(slicers),
                                       getattr(predictor, "tiles_per_batch", 1), gaussian)
            return window(data, slicers, *args, **kwargs)

        def predict_tiles(x):
            self._captured.clear()
            logits = tiles(x)
            self._stitcher.add(self._captured[0])  # the first network call is the unmirrored one
            return logits

        def predict(data, *args, **kwargs):
            logits = sliding(data, *args, **kwargs)
            _, revert = pad_nd_image(torch.zeros((1, *data.shape[1:]), dtype=torch.uint8),
                                     predictor.configuration_manager.patch_size, "constant", {"value": 0}, True, None)
            self.maps.append(self._stitcher.result()[tuple(revert[1:])])
            self._stitcher = None
            return logits

        sliding = predictor.predict_sliding_window_return_logits
        handle = self.module.register_forward_hook(self._hook)
        predictor._internal_predict_sliding_window_return_logits = predict_window
        predictor._internal_maybe_mirror_and_predict = predict_tiles
        predictor.predict_sliding_window_return_logits = predict
        try:
            yield self
        finally:
            handle.remove()
            for name in ("_internal_predict_sliding_window_return_logits", "_internal_maybe_mirror_and_predict",
                         "predict_sliding_window_return_logits"):
                del predictor.__dict__[name]


def map_to_ct_grid(attention: np.ndarray, plans_manager, configuration_manager, properties: dict,
                   permutation: tuple[int, int, int] | None) -> np.ndarray:
    """A (z, y, x) map on the preprocessed grid, on the input CT's grid: nnU-Net's probability export steps
    (resample, un-crop, transpose back), then the reorientation of non-axial inputs undone."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    resampled = configuration_manager.resampling_fn_probabilities(
        attention[None].astype(np.float32), properties["shape_after_cropping_and_before_resampling"],
        configuration_manager.spacing, spacing)
    resampled = np.asarray(resampled, dtype=np.float32)[0]
    full = np.zeros(properties["shape_before_cropping"], dtype=np.float32)
    full = insert_crop_into_image(full, resampled, properties["bbox_used_for_cropping"])
    full = np.asarray(full).transpose(plans_manager.transpose_backward)
    if permutation is not None:
        full = full.transpose([int(a) for a in np.argsort(permutation)])
    return np.ascontiguousarray(np.clip(full, 0.0, 1.0))


def _axial_slice(segmentation: np.ndarray, attention: np.ndarray, superior_axis: int) -> int:
    """The slice through the segmentation's centre (else through the attention maximum) along the axial axis."""
    source = segmentation if segmentation.any() else attention == attention.max()
    return int(round(float(np.argwhere(source)[:, superior_axis].mean())))


def write_attention_maps(model, cases, output_folder: Path, settings, block: str = DEFAULT_BLOCK,
                         warn=print) -> list[Path]:
    """For each CT: ``<case>_attention<ending>`` (the map on the CT's grid), ``<case><ending>`` (the model's
    segmentation, nnU-Net's export) and ``<case>_attention.png``; returns the written files. Raises InputError
    (unreadable CT) or AttentionBlockError."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from nnunetv2_gtv.io.images import write_image
    from nnunetv2_gtv.figures.overlay import attention_plot
    from nnunetv2_gtv.inference.pipeline import RunReport, prepare_case
    from nnunetv2_gtv.inference.predictor import EnsemblePredictor
    from nnunetv2_gtv.training.regions import superior_axis_from_direction

    ensemble = EnsemblePredictor([model], settings)
    recorder = AttentionRecorder(model.predictor, block)
    label_manager = ensemble.plans_manager.get_label_manager(ensemble.dataset_json)
    reader_writer = ensemble.plans_manager.plans["image_reader_writer"]
    written = []
    for case in cases:
        prepared = prepare_case(ensemble, case, RunReport(), warn)
        with recorder.active():
            logits = ensemble.predict_logits(model, prepared.data, prepared.boxes)
        box = prepared.boxes.get(model.sampling_region, prepared.boxes["global"])
        stitched = np.zeros(tuple(prepared.data.shape[1:]), dtype=np.float32)
        stitched[box.slices] = recorder.maps.pop().numpy()
        attention = map_to_ct_grid(stitched, ensemble.plans_manager, ensemble.configuration_manager,
                                   prepared.properties, prepared.permutation)
        segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, ensemble.plans_manager, ensemble.configuration_manager, label_manager, prepared.properties)
        if prepared.permutation is not None:
            segmentation = segmentation.transpose([int(a) for a in np.argsort(prepared.permutation)])
        ending = case.file_ending
        written.append(write_image(attention, output_folder / f"{case.case}_attention{ending}", ending,
                                   prepared.output_properties, reader_writer))
        written.append(write_image(np.ascontiguousarray(segmentation), output_folder / f"{case.case}{ending}",
                                   ending, prepared.output_properties, reader_writer))
        ct = model.predictor.plans_manager.image_reader_writer_class().read_images([str(case.path)])[0][0]
        stuff = prepared.output_properties["sitk_stuff"]
        superior, _ = superior_axis_from_direction(stuff["direction"])
        index = _axial_slice(segmentation > 0, attention, superior)
        take = [slice(None)] * 3
        take[superior] = index
        in_plane = [a for a in range(3) if a != superior]  # array axes shown as rows, columns
        spacing_zyx = list(reversed(stuff["spacing"]))
        written.append(output_folder / f"{case.case}_attention.png")
        attention_plot(ct[tuple(take)], (segmentation > 0)[tuple(take)], attention[tuple(take)],
                       spacing_zyx[in_plane[0]] / spacing_zyx[in_plane[1]],
                       f"{case.case}: {model.label}, block {recorder.block_name}, slice {index} of array axis "
                       f"{superior}", written[-1])
    return written
