"""The post-processing file: each label's connected-component rule, chosen on cross-validation.

``gtv-postprocessing`` writes it (see :mod:`nnunetv2_gtv.evaluation.postprocessing`); ``gtv-predict`` reads it from
``$nnUNet_results/<dataset>/gtv_postprocessing.json`` when present, and both fusing commands take it with
``--postprocessing FILE``. Format (JSON)::

    {"format": "nnunetv2_gtv.postprocessing/1", "connectivity": 6,
     "labels": {"1": {"name": "GTVp", "rule": "largest"}, "2": {"name": "GTVnd", "rule": "all"}},
     "chosen_on": {...what it was chosen on, and the Dice of every candidate...}}

``rule`` is ``largest``, ``all`` or ``min_volume`` (with ``min_component_ml``); a label that the file does not list
keeps every component. An optional ``"review": {"score": "pairwise_dice_mean", "threshold": 0.82, ...}`` is the
review flag calibrated on the same cases (:func:`nnunetv2_gtv.evaluation.review_scores.calibrate_review`): the
score that ranked their failures best, and the value that flags the riskiest quarter of them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from nnunetv2_gtv.ensemble.fusion import CONNECTIVITY_RANK, ComponentRule
from nnunetv2_gtv.ensemble.review_ranking import ReviewSelection
from nnunetv2_gtv.io.atomic import write_text

POSTPROCESSING_FILE = "gtv_postprocessing.json"
FORMAT = "nnunetv2_gtv.postprocessing/1"


@dataclass(frozen=True)
class PostprocessingChoice:
    """Rules per foreground label, the connectivity they were chosen with, and the record of the choice."""

    connectivity: int
    rules: dict[int, ComponentRule]
    names: dict[int, str] = field(default_factory=dict)
    chosen_on: dict = field(default_factory=dict)
    review: dict | None = None

    def review_selection(self, path: str | os.PathLike) -> ReviewSelection | None:
        """The calibrated review flag of this file (``path``, named in the summary), or None without one."""
        if self.review is None:
            return None
        return ReviewSelection(self.review["score"], threshold=float(self.review["threshold"]), source=str(path))

    def to_json(self) -> dict:
        labels = {}
        for label, rule in sorted(self.rules.items()):
            entry = {"name": self.names.get(label, f"label_{label}"), "rule": rule.rule}
            if rule.rule == "min_volume":
                entry["min_component_ml"] = rule.min_component_ml
            labels[str(label)] = entry
        document = {"format": FORMAT, "connectivity": self.connectivity, "labels": labels, "chosen_on": self.chosen_on}
        return document | ({"review": self.review} if self.review is not None else {})


def read_postprocessing(path: str | os.PathLike) -> PostprocessingChoice:
    """Read a post-processing file; ValueError naming the file and the problem."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the post-processing file ({err})") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{path}: not a post-processing file of gtv-postprocessing (format {FORMAT})")
    connectivity = document.get("connectivity")
    if connectivity not in CONNECTIVITY_RANK:
        raise ValueError(f"{path}: connectivity must be one of {sorted(CONNECTIVITY_RANK)}, got {connectivity!r}")
    rules, names = {}, {}
    try:
        for key, entry in dict(document.get("labels") or {}).items():
            label = int(key)
            if label < 1:
                raise ValueError(f"label {label} is not a foreground label")
            rules[label] = ComponentRule(entry["rule"], float(entry.get("min_component_ml", 0.0)))
            names[label] = str(entry.get("name", f"label_{label}"))
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: unusable label rule ({err})") from err
    choice = PostprocessingChoice(connectivity, rules, names, dict(document.get("chosen_on") or {}),
                                  document.get("review"))
    try:
        choice.review_selection(path)
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: unusable review flag ({err})") from err
    return choice


def write_postprocessing(choice: PostprocessingChoice, path: str | os.PathLike) -> Path:
    """Write ``choice`` to ``path`` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(json.dumps(choice.to_json(), indent=2) + "\n", path)
