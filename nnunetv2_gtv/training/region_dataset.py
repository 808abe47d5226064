"""A view of an nnU-Net dataset in which every case is cropped to its sampling region.

nnU-Net's ``nnUNetDataLoader`` draws patches inside whatever array ``load_case`` returns, and centres
forced-foreground patches on ``properties['class_locations']``. Handing it cases that are already cropped to
the region therefore keeps every patch box inside the region (clipped at its borders) and keeps nnU-Net's
foreground oversampling, restricted to the foreground inside the region, without touching the loader.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset

BoxZYX = Sequence[tuple[int, int]]  # half-open (start, stop) per spatial axis of the preprocessed array


def crop_class_locations(class_locations: Mapping, box: BoxZYX) -> dict:
    """Keep the (c, z, y, x) locations inside ``box`` and shift them to the cropped array's coordinates."""
    lower = np.array([0] + [start for start, _ in box])
    upper = np.array([np.iinfo(np.int64).max] + [stop for _, stop in box])
    cropped = {}
    for label, locations in class_locations.items():
        locations = np.asarray(locations)
        if locations.size == 0:
            cropped[label] = locations
            continue
        inside = np.all((locations >= lower) & (locations < upper), axis=1)
        cropped[label] = locations[inside] - lower
    return cropped


class RegionCroppedDataset(nnUNetBaseDataset):
    """Wraps an nnU-Net dataset; ``load_case`` returns each case cropped to ``boxes[identifier]``."""

    def __init__(self, dataset: nnUNetBaseDataset, boxes: Mapping[str, BoxZYX]):
        missing = sorted(set(dataset.identifiers) - set(boxes))
        if missing:
            raise KeyError(f"no sampling region for cases {missing}")
        super().__init__(dataset.source_folder, list(dataset.identifiers), dataset.folder_with_segs_from_previous_stage)
        self.dataset = dataset
        self.boxes = {key: tuple((int(a), int(b)) for a, b in boxes[key]) for key in dataset.identifiers}

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        box = self.boxes[identifier]
        window = (slice(None),) + tuple(slice(start, stop) for start, stop in box)
        properties = dict(properties)
        properties["class_locations"] = crop_class_locations(properties["class_locations"], box)
        properties["gtv_sampling_box"] = box
        return (np.asarray(data[window]), np.asarray(seg[window]),
                None if seg_prev is None else np.asarray(seg_prev[window]), properties)

    @staticmethod
    def save_case(*args, **kwargs):
        raise NotImplementedError("RegionCroppedDataset is a read-only view")

    @staticmethod
    def get_identifiers(folder: str):
        raise NotImplementedError("RegionCroppedDataset takes its identifiers from the wrapped dataset")

    @staticmethod
    def unpack_dataset(*args, **kwargs):
        raise NotImplementedError("RegionCroppedDataset is a read-only view")
