"""What a label of ``dataset.json`` is in DICOM: its RT ROI interpreted type, SEG category and type codes, colour.

Chosen from the label's name, as radiotherapy structure names are written (TG-263 style: ``GTVp``, ``GTVnd``,
``PTV70``, ``Parotid_L``, ``SpinalCord``, ``Brainstem``); case, underscores and spaces do not matter:

- a tumour (``GTV...``, or a name with ``tumor`` / ``tumour``): interpreted type GTV, SEG "Morphologically
  Abnormal Structure" / "Neoplasm" (SNOMED CT);
- ``PTV...`` / ``CTV...``: PTV / CTV, SEG "Spatial and Relational Concept" / "Planning (Clinical) target volume";
- an organ at risk of the head and neck listed in ``ORGANS``: ORGAN, SEG "Anatomical Structure" / the organ's code
  (the side stays in the name: ``Parotid_L``);
- anything else: interpreted type left empty (DICOM's "not given"), SEG "Tissue" / "Tissue".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

from nnunetv2_gtv.label_colours import label_colour

# normalised name fragment -> SNOMED CT code of the organ
ORGANS = {
    "brainstem": codes.SCT.BrainStem, "spinalcord": codes.SCT.SpinalCord, "parotid": codes.SCT.ParotidGland,
    "submandibular": codes.SCT.SubmandibularGland, "mandible": codes.SCT.Mandible, "larynx": codes.SCT.Larynx,
    "esophagus": codes.SCT.Esophagus, "oesophagus": codes.SCT.Esophagus, "opticnerve": codes.SCT.OpticNerve,
    "opticchiasm": codes.SCT.OpticChiasm, "chiasm": codes.SCT.OpticChiasm, "oralcavity": codes.SCT.OralCavity,
    "pituitary": codes.SCT.Pituitary, "thyroid": codes.SCT.Thyroid, "temporallobe": codes.SCT.TemporalLobe,
    "lens": codes.SCT.Lens, "eye": codes.SCT.Eye, "lymphnode": codes.SCT.LymphNode,
}


@dataclass(frozen=True)
class LabelCoding:
    """How one label is written: ``interpreted_type`` (RTROIInterpretedType, "" = not given), SEG codes, colour."""

    name: str
    interpreted_type: str
    category: Code
    type: Code
    colour: tuple[int, int, int]


def _normalised(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def label_coding(name: str, label: int) -> LabelCoding:
    """The DICOM description of foreground label ``label`` named ``name``."""
    key, colour = _normalised(name), label_colour(label)
    if key.startswith("gtv") or "tumor" in key or "tumour" in key:
        return LabelCoding(name, "GTV", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm, colour)
    for prefix, interpreted, code in (("ptv", "PTV", codes.SCT.PlanningTargetVolume),
                                      ("ctv", "CTV", codes.SCT.ClinicalTargetVolume)):
        if key.startswith(prefix):
            return LabelCoding(name, interpreted, codes.SCT.SpatialAndRelationalConcept, code, colour)
    for fragment, code in ORGANS.items():
        if fragment in key:
            return LabelCoding(name, "ORGAN", codes.SCT.AnatomicalStructure, code, colour)
    return LabelCoding(name, "", codes.SCT.Tissue, codes.SCT.Tissue, colour)
