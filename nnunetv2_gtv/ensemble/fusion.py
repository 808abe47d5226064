"""Fusion of N models' probability maps for one case, with the uncertainty of Mei et al. (eqs. 6 and 7).

Memory stays flat in N: each model's npz member is streamed once, channel by channel, into a running
(weighted) sum of probabilities, a running per-voxel argmax for that model, and per-label vote counts.
No two models' maps are ever held at the same time. ``fuse_probability_maps`` does the same for maps that
are already in memory (``gtv-predict``), one model at a time.
"""
from __future__ import annotations

import math
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.special import xlogy

from nnunetv2_gtv.ensemble.agreement import AgreementScores, mean_inside, pairwise_dice, soft_dice, vote_agreement
from nnunetv2_gtv.ensemble.errors import FusionInputError, SingleModelWarning
from nnunetv2_gtv.ensemble.folders import DatasetInfo
from nnunetv2_gtv.ensemble.probability_file import open_probabilities, read_region
from nnunetv2_gtv.io.images import write_image

CHUNK_VOXELS = 1 << 20  # 4 MiB of float32 per streamed chunk
CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}  # neighbours -> scipy generate_binary_structure(3, rank)
COMPONENT_RULES = ("largest", "all", "min_volume")
AUTO_COMPONENTS = "auto"  # largest component with one foreground label, every component with several
OUTSIDE_REGION_RULES = ("abstain", "background")
ENTROPY_MODES = ("votes", "mean_probability")
ENTROPY_SUFFIX = "_entropy"
PROBABILITY_SUFFIX = "_probability"

Ranges = tuple[tuple[int, int], ...]  # half-open (start, stop) per array axis (z, y, x) of a box


@dataclass(frozen=True)
class ComponentRule:
    """The connected-component rule of one label: ``largest`` keeps its largest component, ``all`` everything,
    ``min_volume`` the components larger than ``min_component_ml``."""

    rule: str = "largest"
    min_component_ml: float = 0.0

    def __post_init__(self):
        if self.rule not in COMPONENT_RULES:
            raise ValueError(f"component rule must be one of {COMPONENT_RULES}, got {self.rule!r}")
        if not math.isfinite(self.min_component_ml) or self.min_component_ml < 0:
            raise ValueError(f"min_component_ml must be >= 0, got {self.min_component_ml}")

    def describe(self) -> str:
        return f"min_volume > {self.min_component_ml:g} ml" if self.rule == "min_volume" else self.rule


@dataclass(frozen=True)
class FusionSettings:
    """How models are fused and post-processed.

    weights: one positive weight per model (None: equal). Weights act on the mean probability (fused
        segmentation, probability map, ``mean_probability`` entropy); vote entropy and VVC count every
        model once, as in the paper.
    components: the connected-component rule of every label without a rule in ``label_rules``: ``auto`` (the
        default) keeps the largest component when the dataset has one foreground label (the paper) and every
        component when it has several (a node must never be deleted because the primary is larger); ``largest``,
        ``all`` or ``min_volume`` (components larger than ``min_component_ml``) for every label. Each label's
        components are found on its own mask.
    label_rules: (label, ComponentRule) pairs, e.g. chosen per label on cross-validation (``gtv-postprocessing``).
    outside_region: where a voxel lies outside a model's region (gtv-predict runs Local and Middle models in their
        sampling region only), ``abstain``: the model is left out of the mean probability and the votes there
        (weights renormalised over the models that cover the voxel); ``background``: it counts as a background
        vote with probability 1 (the behaviour before region-aware fusion).
    entropy: ``votes`` = eq. 6 over the models' argmax labels; ``mean_probability`` = entropy of the mean map.
    vvc_threshold: ``review`` is set when VVC exceeds it (Fig. 12 of the paper spans VVC 0.06-0.16).
    sum_tolerance: allowed deviation of a model's channel sum from 1 (and below 0 / above 1) per voxel.
    """

    weights: tuple[float, ...] | None = None
    connectivity: int = 6
    components: str = AUTO_COMPONENTS
    min_component_ml: float = 0.0
    label_rules: tuple[tuple[int, ComponentRule], ...] = ()
    outside_region: str = "abstain"
    entropy: str = "votes"
    save_probability: bool = False
    vvc_threshold: float = 0.1
    sum_tolerance: float = 1e-3

    def __post_init__(self):
        if self.connectivity not in CONNECTIVITY_RANK:
            raise ValueError(f"connectivity must be one of {sorted(CONNECTIVITY_RANK)}, got {self.connectivity}")
        if self.components not in (AUTO_COMPONENTS, *COMPONENT_RULES):
            raise ValueError(f"components must be one of {(AUTO_COMPONENTS, *COMPONENT_RULES)}, "
                             f"got {self.components!r}")
        if self.entropy not in ENTROPY_MODES:
            raise ValueError(f"entropy must be one of {ENTROPY_MODES}, got {self.entropy!r}")
        if self.outside_region not in OUTSIDE_REGION_RULES:
            raise ValueError(f"outside_region must be one of {OUTSIDE_REGION_RULES}, got {self.outside_region!r}")
        if self.min_component_ml < 0:
            raise ValueError(f"min_component_ml must be >= 0, got {self.min_component_ml}")
        if self.weights is not None and not all(math.isfinite(w) and w > 0 for w in self.weights):
            raise ValueError(f"weights must be positive finite numbers, got {list(self.weights)}")
        labels = [label for label, _ in self.label_rules]
        if len(set(labels)) != len(labels) or any(label < 1 for label in labels):
            raise ValueError(f"label rules need distinct foreground labels (>= 1), got {labels}")

    def model_weights(self, num_models: int) -> tuple[float, ...]:
        if self.weights is None:
            return (1.0,) * num_models
        if len(self.weights) != num_models:
            raise ValueError(f"{len(self.weights)} weights given for {num_models} models")
        return tuple(float(w) for w in self.weights)

    def record(self) -> dict:
        """JSON-ready, for summary headers and --continue fingerprints."""
        return {
            "connectivity": self.connectivity,
            "components": self.components,
            "min_component_ml": self.min_component_ml,
            "label_rules": {str(label): rule.describe() for label, rule in self.label_rules},
            "outside_region": self.outside_region,
            "entropy": self.entropy,
            "entropy_log": "natural",
            "save_probability": self.save_probability,
            "vvc_threshold": self.vvc_threshold,
            "vvc_std": "population (ddof=0) over the models whose region holds at least half of the fused label's "
                       "voxels (all models when fewer than two do, or the label is empty); VVC empty/null when fewer "
                       "than 2 models or all volumes are 0",
            "sum_tolerance": self.sum_tolerance,
        }

    def component_rules(self, num_labels: int) -> dict[int, ComponentRule]:
        """The rule of each foreground label 1..num_labels-1."""
        foreground = range(1, num_labels)
        unknown = sorted(set(dict(self.label_rules)) - set(foreground))
        if unknown:
            raise ValueError(f"post-processing rules for labels {unknown}, but the dataset's labels are "
                             f"0..{num_labels - 1}")
        if self.components == AUTO_COMPONENTS:
            default = ComponentRule("largest" if num_labels == 2 else "all")
        else:
            default = ComponentRule(self.components, self.min_component_ml)
        explicit = dict(self.label_rules)
        return {label: explicit.get(label, default) for label in foreground}


@dataclass(frozen=True)
class LabelResult:
    """One foreground label of a case: volumes in ml (None for a model that lacks the case), VVC over the models
    whose region holds most of the fused label (``vvc_models``, 1-based), components removed by its rule."""

    label: int
    name: str
    model_volumes_ml: tuple[float | None, ...]
    fused_volume_ml: float
    vvc: float
    vvc_models: tuple[int, ...]
    components_removed: int
    review: bool
    scores: AgreementScores = field(default=AgreementScores())


@dataclass(frozen=True)
class CaseResult:
    """Per-case numbers for the summary; volumes in ml, None for a model that lacks the case. The case-level
    numbers pool every foreground label; ``labels`` holds each label's own."""

    case: str
    n_models: int
    model_volumes_ml: tuple[float | None, ...]
    fused_volume_ml: float
    vvc: float  # NaN when undefined: fewer than 2 models, or every model volume is 0
    components_removed: int
    review: bool
    missing_models: tuple[int, ...]  # 1-based positions of the models that lack the case
    outputs: tuple[Path, ...] = field(default=())
    labels: tuple[LabelResult, ...] = field(default=())
    scores: AgreementScores = field(default=AgreementScores())


@dataclass
class ModelMap:
    """One model's (C, z, y, x) probabilities on the image grid and the box it predicted in (None: everywhere)."""

    probabilities: np.ndarray
    region: Ranges | None = None


def output_files(case: str, output_folder: str | os.PathLike, file_ending: str,
                 settings: FusionSettings) -> list[Path]:
    """The image files ``fuse_case`` writes for ``case``."""
    folder = Path(output_folder)
    names = [case, case + ENTROPY_SUFFIX] + ([case + PROBABILITY_SUFFIX] if settings.save_probability else [])
    return [folder / (name + file_ending) for name in names]


def volume_variation_coefficient(volumes: Sequence[float]) -> float:
    """Eq. 7: population standard deviation / mean of the model volumes; NaN if < 2 volumes or mean 0."""
    if len(volumes) < 2:
        return math.nan
    mean = float(np.mean(volumes))
    return float(np.std(volumes)) / mean if mean > 0 else math.nan


def _update_argmax(running_max: np.ndarray, label: np.ndarray, values: np.ndarray, channel: int) -> None:
    """Running argmax over channels; ties keep the lower channel, like ``np.argmax``."""
    label[values > running_max] = channel
    np.maximum(running_max, values, out=running_max)


def _chunks(num_voxels: int):
    for start in range(0, num_voxels, CHUNK_VOXELS):
        yield slice(start, min(start + CHUNK_VOXELS, num_voxels))


def _check_values(values: np.ndarray, tolerance: float, npz: Path | str) -> None:
    low, high = values.min(), values.max()
    if low >= -tolerance and high <= 1 + tolerance:
        return
    if np.isnan(values).any():
        problem = "contains NaN"
    elif np.isinf(values).any():
        problem = "contains inf"
    else:
        problem = f"has values outside [0, 1] (min {low:.4g}, max {high:.4g})"
    raise FusionInputError(f"{npz}: {problem}")


def _load_properties(npz: Path) -> dict:
    pkl = npz.with_suffix(".pkl")
    try:
        with open(pkl, "rb") as f:
            properties = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise FusionInputError(f"{pkl}: cannot read the properties ({err})") from err
    if not isinstance(properties, dict) or "spacing" not in properties or "shape_before_cropping" not in properties:
        raise FusionInputError(f"{pkl}: not an nnU-Net properties file")
    return properties


def _geometry(properties: dict) -> dict:
    """The image geometry in nnU-Net's properties: spacing, shape and the reader's own record (sitk_stuff...)."""
    keys = ["spacing", "shape_before_cropping"] + sorted(k for k in properties if k.endswith("_stuff"))
    return {k: properties[k] for k in keys}


def _same(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_same(a[k], b[k]) for k in a))
    try:
        x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    except (TypeError, ValueError):
        return a == b
    return x.shape == y.shape and np.allclose(x, y, rtol=1e-6, atol=1e-6)


def _check_models(present: list[tuple[int, Path]], dataset: DatasetInfo) -> tuple[dict, tuple[int, ...]]:
    """Read every model's header and properties before any data; return the first model's properties and shape."""
    reference = None
    for _, npz in present:
        properties = _load_properties(npz)
        with open_probabilities(npz) as stream:
            shape = stream.shape
        if shape[0] != dataset.num_labels:
            raise FusionInputError(f"{npz}: {shape[0]} channels but dataset.json "
                                   f"has {dataset.num_labels} labels")
        image_shape = tuple(int(properties["shape_before_cropping"][i]) for i in dataset.transpose_backward)
        if shape[1:] != image_shape:
            raise FusionInputError(f"{npz}: shape {shape[1:]} but its .pkl describes "
                                   f"an image of shape {image_shape}")
        if reference is None:
            reference = (npz, properties, shape)
            continue
        first_npz, first_properties, first_shape = reference
        if shape != first_shape:
            raise FusionInputError(f"probability shape {shape} in {npz.parent} differs from "
                                   f"{first_shape} in {first_npz.parent}")
        first_geometry, geometry = _geometry(first_properties), _geometry(properties)
        for key in first_geometry.keys() | geometry.keys():
            if not _same(first_geometry.get(key), geometry.get(key)):
                raise FusionInputError(f"image geometry '{key}' in {npz.parent} "
                                       f"({geometry.get(key)}) differs from {first_npz.parent} "
                                       f"({first_geometry.get(key)})")
    return reference[1], reference[2]


class ArrayStream:
    """An in-memory (C, z, y, x) probability map read like ``ProbabilityStream``: flat C-order chunks."""

    def __init__(self, array: np.ndarray, name: str):
        self.path = name  # named in error messages
        self.shape = tuple(int(n) for n in array.shape)
        self._flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
        self._position = 0

    def read(self, count: int) -> np.ndarray:
        values = self._flat[self._position:self._position + count]
        self._position += count
        return values


def region_mask(region: Ranges | None, shape: Sequence[int]) -> np.ndarray | None:
    """Flat boolean mask of ``region`` on an array of ``shape``; None when the region covers the whole array."""
    if region is None or all(lo <= 0 and hi >= n for (lo, hi), n in zip(region, shape)):
        return None
    mask = np.zeros(tuple(shape), dtype=bool)
    mask[tuple(slice(max(0, lo), max(0, hi)) for lo, hi in region)] = True
    return mask.reshape(-1)


def _count_dtype(num_models: int):
    return np.uint8 if num_models < 256 else np.uint16


class _Accumulator:
    """Running weighted sum of probabilities and per-label vote counts, flat over voxels.

    A model added with a region contributes only inside it: from the first such model on, a per-voxel sum of the
    weights and a per-voxel count of the models that cover each voxel are kept, and the mean probability and
    vote frequencies are taken over the covering models (where none covers a voxel it is background).
    """

    def __init__(self, num_labels: int, shape: Sequence[int], num_models: int):
        self.num_labels = num_labels
        self.shape = tuple(int(n) for n in shape)
        self.num_voxels = int(np.prod(self.shape))
        self.total_weight = 0.0
        self.num_models = 0
        self.weight_map: np.ndarray | None = None  # per-voxel weight of the covering models (regions only)
        self.cover_count: np.ndarray | None = None  # per-voxel number of covering models (regions only)
        self.sum = np.zeros((num_labels, self.num_voxels), dtype=np.float32)
        # votes for labels 1..C-1; the background count is the covering models minus their sum
        self.votes = np.zeros((num_labels - 1, self.num_voxels), dtype=_count_dtype(num_models))
        self._capacity = num_models
        self._running_max = np.empty(self.num_voxels, dtype=np.float32)
        self._label = np.empty(self.num_voxels, dtype=np.uint8 if num_labels <= 256 else np.uint16)
        # each model's own mask per foreground label and its region, bit-packed, for the agreement scores
        self.model_masks: list[list[np.ndarray]] = []
        self.model_covers: list[np.ndarray | None] = []

    def add(self, npz: Path, weight: float, tolerance: float, region: Ranges | None = None) -> np.ndarray:
        """Stream one model's npz in; return its voxel count per label inside its region (argmax of its own
        probabilities)."""
        with open_probabilities(npz) as stream:
            return self.add_stream(stream, weight, tolerance, region)

    def _start_region_maps(self) -> None:
        self.weight_map = np.full(self.num_voxels, self.total_weight, dtype=np.float32)
        self.cover_count = np.full(self.num_voxels, self.num_models, dtype=_count_dtype(self._capacity))

    def add_stream(self, stream, weight: float, tolerance: float, region: Ranges | None = None) -> np.ndarray:
        """Add one model read from ``stream`` (``ProbabilityStream`` or ``ArrayStream``); see ``add``."""
        covered = region_mask(region, self.shape)
        if covered is not None and self.weight_map is None:
            self._start_region_maps()
        self.total_weight += weight
        self.num_models += 1
        if self.weight_map is not None:
            self.weight_map += weight if covered is None else np.float32(weight) * covered
            self.cover_count += 1 if covered is None else covered
        for channel in range(self.num_labels):
            for part in _chunks(self.num_voxels):
                values = stream.read(part.stop - part.start)
                _check_values(values, tolerance, stream.path)
                if channel == 0:
                    self._running_max[part] = values
                    self._label[part] = 0
                else:
                    _update_argmax(self._running_max[part], self._label[part], values, channel)
                contribution = values if weight == 1.0 else weight * values
                if covered is not None:
                    contribution = np.where(covered[part], contribution, np.float32(0))
                self.sum[channel, part] += contribution
                if channel == self.num_labels - 1:
                    self._check_sums(part, weight, tolerance, stream.path)
        if covered is not None:
            self._label[~covered] = 0  # a model says nothing outside its region
        self.model_masks.append([np.packbits(self._label == channel) for channel in range(1, self.num_labels)])
        self.model_covers.append(None if covered is None else np.packbits(covered))
        for part in _chunks(self.num_voxels):
            label = self._label[part]
            for channel in range(1, self.num_labels):
                self.votes[channel - 1, part] += label == channel
        return np.bincount(self._label, minlength=self.num_labels)

    def _check_sums(self, part: slice, weight: float, tolerance: float, npz: Path | str) -> None:
        # every earlier model already summed to 1, so a deviation of the running total is this model's
        expected = self.total_weight if self.weight_map is None else self.weight_map[part]
        deviation = float(np.abs(self.sum[:, part].sum(axis=0) - expected).max()) / weight
        if deviation > tolerance:
            raise FusionInputError(f"{npz}: probabilities do not sum to 1 over the "
                                   f"{self.num_labels} channels (off by up to {deviation:.3g})")

    def release_model_buffers(self) -> None:
        self._running_max = self._label = None

    def release_sums(self) -> None:
        self.sum = self.votes = self.weight_map = self.cover_count = None
        self.model_masks = self.model_covers = None

    def _unpacked(self, packed: np.ndarray) -> np.ndarray:
        return np.unpackbits(packed, count=self.num_voxels).view(bool)

    def agreement_scores(self, segmentation: np.ndarray, entropy: np.ndarray
                         ) -> tuple[AgreementScores, dict[int, AgreementScores]]:
        """The agreement scores (:mod:`nnunetv2_gtv.ensemble.agreement`) of every foreground label pooled, and of
        each label, for the flat fused ``segmentation`` (after its component rule) and the entropy map."""
        covers = [None if c is None else self._unpacked(c) for c in self.model_covers]
        cover = self.num_models if self.cover_count is None else self.cover_count
        per_label = {}
        for label in range(1, self.num_labels):
            masks = [self._unpacked(m[label - 1]) for m in self.model_masks]
            per_label[label] = self._scores(masks, covers, self.votes[label - 1], cover, segmentation == label,
                                            entropy, [label])
        if self.num_labels == 2:
            return per_label[1], per_label
        pooled = [np.logical_or.reduce([self._unpacked(m) for m in model]) for model in self.model_masks]
        case = self._scores(pooled, covers, self.votes.sum(axis=0, dtype=np.int64), cover, segmentation > 0, entropy,
                            list(range(1, self.num_labels)))
        return case, per_label

    def _scores(self, masks: list[np.ndarray], covers: list[np.ndarray | None], votes: np.ndarray,
                cover: np.ndarray | int, fused: np.ndarray, entropy: np.ndarray, channels: list[int]
                ) -> AgreementScores:
        inside = total = 0.0
        for part in _chunks(self.num_voxels):
            probability = self._mean(self.sum[channels, part].sum(axis=0), part).astype(np.float64)
            total += float(probability.sum())
            inside += float(probability[fused[part]].sum())
        mean_dice, lowest_dice = pairwise_dice(masks, covers)
        return AgreementScores(mean_dice, lowest_dice, vote_agreement(votes, cover), mean_inside(entropy, fused),
                               soft_dice(inside, total, int(np.count_nonzero(fused))))

    def _weight(self, part: slice) -> np.ndarray | float:
        return self.total_weight if self.weight_map is None else self.weight_map[part]

    def fused_labels(self) -> np.ndarray:
        """Argmax of the summed (= of the mean) probabilities; background where no model covers a voxel."""
        labels = np.zeros(self.num_voxels, dtype=np.uint8 if self.num_labels <= 256 else np.uint16)
        for part in _chunks(self.num_voxels):
            best = self.sum[0, part].copy()
            for channel in range(1, self.num_labels):
                _update_argmax(best, labels[part], self.sum[channel, part], channel)
        return labels

    def _mean(self, values: np.ndarray, part: slice) -> np.ndarray:
        weight = self._weight(part)
        if np.isscalar(weight):
            return values / np.float32(weight)
        return np.divide(values, weight, out=np.zeros(values.shape, np.float32), where=weight > 0)

    def mean_foreground_probability(self) -> np.ndarray:
        out = np.empty(self.num_voxels, dtype=np.float32)
        for part in _chunks(self.num_voxels):
            out[part] = self._mean(self.sum[1:, part].sum(axis=0), part)
        return out

    def mean_probability_entropy(self) -> np.ndarray:
        out = np.empty(self.num_voxels, dtype=np.float32)
        for part in _chunks(self.num_voxels):
            mean = self._mean(self.sum[:, part], part)
            out[part] = -xlogy(mean, mean).sum(axis=0)
        return out

    def vote_entropy(self) -> np.ndarray:
        """Eq. 6: -sum_n f_n ln f_n over the label-vote frequencies f_n = votes_n / N (natural log); N is the
        number of models that cover the voxel (0 entropy where none does)."""
        if self.cover_count is not None:
            return self._vote_entropy_with_regions()
        n = self.num_models
        counts = np.arange(n + 1)
        table = -xlogy(counts / n, counts / n)  # term of one label for each possible vote count
        out = np.empty(self.num_voxels, dtype=np.float32)
        for part in _chunks(self.num_voxels):
            votes = self.votes[:, part]
            entropy = table[n - votes.sum(axis=0, dtype=np.int64)]
            for row in votes:
                entropy += table[row]
            out[part] = entropy
        return out

    def _vote_entropy_with_regions(self) -> np.ndarray:
        out = np.empty(self.num_voxels, dtype=np.float32)
        for part in _chunks(self.num_voxels):
            covering = self.cover_count[part].astype(np.float64)
            votes = self.votes[:, part].astype(np.float64)
            counts = np.concatenate([(covering - votes.sum(axis=0))[None], votes])
            frequencies = np.divide(counts, covering, out=np.zeros_like(counts), where=covering > 0)
            out[part] = -xlogy(frequencies, frequencies).sum(axis=0)
        return out


def _label_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a boolean (z, y, x) mask; None when it is empty."""
    found = ndimage.find_objects(mask.astype(np.uint8))
    return found[0] if found else None


def filter_components(labels: np.ndarray, connectivity: int, rules: Mapping[int, ComponentRule],
                      voxel_ml: float) -> dict[int, int]:
    """Apply each label's connected-component rule to that label's own mask in ``labels`` (z, y, x), in place;
    removed voxels become background. Returns the number of components removed per label."""
    structure = ndimage.generate_binary_structure(3, CONNECTIVITY_RANK[connectivity])
    removed = {}
    for label, rule in rules.items():
        removed[label] = 0
        if rule.rule == "all":
            continue
        mask = labels == label
        box = _label_box(mask)  # label inside the label's bounding box only: a GTV is a tiny part of a CT
        if box is None:
            continue
        components, count = ndimage.label(mask[box], structure=structure)
        sizes = np.bincount(components.ravel())[1:]
        if rule.rule == "largest":
            keep = np.array([np.argmax(sizes) + 1])
        else:
            keep = np.flatnonzero(sizes * voxel_ml > rule.min_component_ml) + 1
        if len(keep) == count:
            continue
        kept = np.zeros(count + 1, dtype=bool)
        kept[0] = True
        kept[keep] = True
        labels[box][~kept[components]] = 0
        removed[label] = int(count - len(keep))
    return removed


def fuse_case(case: str, npz_files: Sequence[str | os.PathLike | None], output_folder: str | os.PathLike,
              dataset: DatasetInfo, settings: FusionSettings = FusionSettings()) -> CaseResult:
    """Fuse one case from N models and write its segmentation and uncertainty maps.

    ``npz_files`` holds one nnU-Net ``<case>.npz`` per model (its ``<case>.pkl`` beside it), None where a
    model lacks the case. An npz that gtv-predict wrote also records the box the model predicted in; fusion
    treats it as gtv-predict does (``FusionSettings.outside_region``). Outputs go to ``output_folder`` on the
    original image grid, written by the reader/writer class of ``dataset`` with the first model's properties,
    each file atomically.
    """
    try:
        return _fuse_case(case, [None if f is None else Path(f) for f in npz_files], Path(output_folder), dataset,
                          settings)
    except FusionInputError as err:
        raise FusionInputError(f"case {case}: {err}") from err


def _fuse_case(case: str, npz_files: list[Path | None], output_folder: Path, dataset: DatasetInfo,
               settings: FusionSettings) -> CaseResult:
    present = [(i, f) for i, f in enumerate(npz_files) if f is not None]
    if not present:
        raise FusionInputError(f"none of the {len(npz_files)} models has this case")
    weights = settings.model_weights(len(npz_files))
    properties, shape = _check_models(present, dataset)
    if len(present) < 2:
        warnings.warn(f"case {case}: only one model; uncertainty needs N >= 2, so the vote entropy is all zeros "
                      "and VVC is undefined (written as empty)", SingleModelWarning, stacklevel=3)
    accumulator = _Accumulator(shape[0], shape[1:], len(present))
    counts: list[np.ndarray | None] = [None] * len(npz_files)
    regions: list[Ranges | None] = [None] * len(npz_files)
    for i, npz in present:
        regions[i] = read_region(npz) if settings.outside_region == "abstain" else None
        counts[i] = accumulator.add(npz, weights[i], settings.sum_tolerance, regions[i])
    return _write_fused(case, accumulator, counts, regions, properties, shape, output_folder, dataset, settings)


def fuse_probability_maps(case: str, maps: Iterable[np.ndarray | ModelMap], model_names: Sequence[str],
                          properties: dict, output_folder: str | os.PathLike, dataset: DatasetInfo,
                          settings: FusionSettings = FusionSettings()) -> CaseResult:
    """``fuse_case`` for probability maps held in memory, one per name in ``model_names``.

    Each map is (C, z, y, x) float on the original image grid described by ``properties`` (nnU-Net's, as for
    ``fuse_case``), or a ``ModelMap`` that also names the box the model predicted in; ``maps`` may be a
    generator, so that only one model's map exists at a time.
    """
    try:
        return _fuse_maps(case, maps, list(model_names), properties, Path(output_folder), dataset, settings)
    except FusionInputError as err:
        raise FusionInputError(f"case {case}: {err}") from err


def _fuse_maps(case: str, maps: Iterable[np.ndarray | ModelMap], names: list[str], properties: dict,
               output_folder: Path, dataset: DatasetInfo, settings: FusionSettings) -> CaseResult:
    if not names:
        raise FusionInputError("no models given")
    weights = settings.model_weights(len(names))
    image_shape = tuple(int(properties["shape_before_cropping"][i]) for i in dataset.transpose_backward)
    shape = (dataset.num_labels, *image_shape)
    if len(names) < 2:
        warnings.warn(f"case {case}: only one model; uncertainty needs N >= 2, so the vote entropy is all zeros "
                      "and VVC is undefined (written as empty)", SingleModelWarning, stacklevel=3)
    accumulator = _Accumulator(shape[0], image_shape, len(names))
    counts: list[np.ndarray | None] = []
    regions: list[Ranges | None] = []
    for name, item in zip(names, maps, strict=True):
        model_map = item if isinstance(item, ModelMap) else ModelMap(item)
        if tuple(model_map.probabilities.shape) != shape:
            raise FusionInputError(f"{name}: probabilities of shape {tuple(model_map.probabilities.shape)}, "
                                   f"expected {shape}")
        regions.append(model_map.region if settings.outside_region == "abstain" else None)
        counts.append(accumulator.add_stream(ArrayStream(model_map.probabilities, name), weights[len(counts)],
                                             settings.sum_tolerance, regions[-1]))
        del item, model_map  # the generator may now make the next map without this one alive
    return _write_fused(case, accumulator, counts, regions, properties, shape, output_folder, dataset, settings)


VVC_MIN_SHARE = 0.5  # a model's volume enters a label's VVC when its region holds at least this share of the label


def _vvc_models(mask: np.ndarray, regions: Sequence[Ranges | None], present: Sequence[int]) -> list[int]:
    """The models (indices) whose region holds at least VVC_MIN_SHARE of a fused label's voxels: a model that did
    not look at most of the label would count as disagreeing. All present models when the label is empty or fewer
    than two qualify."""
    total = int(np.count_nonzero(mask))
    if total == 0:
        return list(present)
    holding = [i for i in present if regions[i] is None or np.count_nonzero(
        mask[tuple(slice(max(0, lo), max(0, hi)) for lo, hi in regions[i])]) >= VVC_MIN_SHARE * total]
    return holding if len(holding) >= 2 else list(present)


def _label_result(label: int, name: str, counts: Sequence[np.ndarray | None], regions: Sequence[Ranges | None],
                  segmentation: np.ndarray, removed: int, voxel_ml: float, settings: FusionSettings,
                  scores: AgreementScores) -> LabelResult:
    present = [i for i, c in enumerate(counts) if c is not None]
    volumes = tuple(None if c is None else int(c[label]) * voxel_ml for c in counts)
    mask = segmentation == label
    chosen = _vvc_models(mask, regions, present)
    vvc = volume_variation_coefficient([volumes[i] for i in chosen])
    return LabelResult(label, name, volumes, int(np.count_nonzero(mask)) * voxel_ml, vvc,
                       tuple(i + 1 for i in chosen), removed, bool(vvc > settings.vvc_threshold), scores)


def _write_fused(case: str, accumulator: _Accumulator, counts: list[np.ndarray | None],
                 regions: list[Ranges | None], properties: dict, shape: tuple[int, ...], output_folder: Path,
                 dataset: DatasetInfo, settings: FusionSettings) -> CaseResult:
    """Fused segmentation, uncertainty map(s) and the case's numbers, from the models added to ``accumulator``."""
    accumulator.release_model_buffers()
    voxel_ml = float(np.prod(properties["spacing"])) / 1000.0
    segmentation = accumulator.fused_labels().reshape(shape[1:])
    seg_file, entropy_file, *probability_file = output_files(case, output_folder, dataset.file_ending, settings)
    output_folder.mkdir(parents=True, exist_ok=True)

    def write(array: np.ndarray, target: Path) -> None:
        write_image(array.reshape(shape[1:]), target, dataset.file_ending, properties, dataset.reader_writer)

    if probability_file:
        write(accumulator.mean_foreground_probability(), probability_file[0])
    if settings.entropy == "mean_probability":
        entropy = accumulator.mean_probability_entropy()
    else:
        entropy = accumulator.vote_entropy()
    removed = filter_components(segmentation, settings.connectivity, settings.component_rules(shape[0]), voxel_ml)
    case_scores, label_scores = accumulator.agreement_scores(segmentation.reshape(-1), entropy)
    accumulator.release_sums()
    write(entropy, entropy_file)
    del entropy

    write(segmentation, seg_file)
    labels = tuple(_label_result(label, dataset.name_of(label), counts, regions, segmentation, removed[label],
                                 voxel_ml, settings, label_scores[label]) for label in range(1, shape[0]))
    present = [i for i, c in enumerate(counts) if c is not None]
    volumes = tuple(None if c is None else int(c[1:].sum()) * voxel_ml for c in counts)
    chosen = _vvc_models(segmentation > 0, regions, present)
    vvc = volume_variation_coefficient([volumes[i] for i in chosen])
    return CaseResult(
        case=case,
        n_models=len(present),
        model_volumes_ml=volumes,
        fused_volume_ml=int(np.count_nonzero(segmentation)) * voxel_ml,
        vvc=vvc,
        components_removed=sum(removed.values()),
        # flagged by a label's own VVC: pooled over labels, a model that did not look at a node would disagree
        review=bool(any(result.review for result in labels) or not any(volumes[i] for i in present)),
        missing_models=tuple(i + 1 for i, c in enumerate(counts) if c is None),
        outputs=(seg_file, entropy_file, *probability_file),
        labels=labels,
        scores=case_scores,
    )
