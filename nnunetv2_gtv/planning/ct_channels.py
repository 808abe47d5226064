"""The CT channels of a dataset: which ``channel_names`` count as CT, and each channel's Hounsfield window.

A dataset may hold several co-registered CTs per case (SegRap2023: a plain and a contrast-enhanced CT), one channel
each, ``<case>_0000``, ``<case>_0001``, ... as nnU-Net names them. Every channel must be a CT in HU: its name in
``dataset.json`` has a word ending in "ct" (``CT``, ``CT_contrast``, ``CECT``, ``plain ct``). Each channel is
clipped to its own window before z-scoring: the paper's [-200, 700] HU unless ``dataset.json`` holds
``"ct_windows_hu": {"<channel>": [low, high], ...}`` (written by ``gtv-dataset --ct-window``). The sampling
regions are found on channel 0.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

from nnunetv2_gtv.planning.plans_check import GTVPlansError

CT_WINDOW_HU = (-200.0, 700.0)  # the paper's window (section 3.1)
CT_WINDOWS_KEY = "ct_windows_hu"  # dataset.json: {"<channel>": [low, high]} in HU, per channel
REGION_CHANNEL = 0  # the CT channel the sampling regions are found on


def is_ct_name(name: str) -> bool:
    """``CT``, ``CT_contrast``, ``ncct``, ``contrast CT``: a word of the name ends in "ct"."""
    return any(word.endswith("ct") for word in re.split(r"[^a-z0-9]+", str(name).lower()) if word)


def channel_names(dataset_json: Mapping, source: str) -> list[str]:
    """The channel names in channel order; GTVPlansError (naming ``source``) unless they are CTs numbered 0..C-1."""
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    keys = sorted(channels, key=lambda key: int(key) if str(key).isdigit() else -1)
    if not channels or [str(k) for k in keys] != [str(i) for i in range(len(channels))]:
        raise GTVPlansError(f"{source}: channel_names must number the channels 0, 1, ... (got {dict(channels)})")
    names = [str(channels[key]) for key in keys]
    not_ct = [f"{i}: '{name}'" for i, name in enumerate(names) if not is_ct_name(name)]
    if not_ct:
        raise GTVPlansError(
            f"{source}: channel {', '.join(not_ct)} is not named as a CT; nnUNetPlannerGTV25D is for CT in Hounsfield "
            "units, one or more co-registered CTs per case (name each channel CT, CT_contrast, ...)")
    return names


def check_window(window: Sequence[float], where: str) -> tuple[float, float]:
    """``[low, high]`` in HU as two finite floats with low < high; GTVPlansError naming ``where`` otherwise."""
    try:
        low, high = (float(value) for value in window)
    except (TypeError, ValueError):
        raise GTVPlansError(f"{where}: a CT window is [low, high] in HU, got {window!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise GTVPlansError(f"{where}: a CT window needs finite low < high (HU), got [{low}, {high}]")
    return low, high


def ct_windows(dataset_json: Mapping, source: str) -> list[tuple[float, float]]:
    """One (low, high) HU window per channel: ``dataset_json[CT_WINDOWS_KEY]``'s, else the paper's."""
    names = channel_names(dataset_json, source)
    given = dataset_json.get(CT_WINDOWS_KEY, {})
    if not isinstance(given, Mapping):
        raise GTVPlansError(f"{source}: {CT_WINDOWS_KEY} must map channel numbers to [low, high], got {given!r}")
    unknown = sorted(set(map(str, given)) - {str(i) for i in range(len(names))})
    if unknown:
        raise GTVPlansError(f"{source}: {CT_WINDOWS_KEY} names channels {unknown}, but the dataset has channels "
                            f"0..{len(names) - 1} ({', '.join(names)})")
    windows = {str(key): value for key, value in given.items()}
    return [check_window(windows[str(i)], f"{source}: {CT_WINDOWS_KEY} channel {i}") if str(i) in windows
            else CT_WINDOW_HU for i in range(len(names))]
