"""Anatomy-based sampling regions (local = head, middle = head + neck, global = whole image) for one CT case.

The regions are axis-aligned boxes in array coordinates, found on a body mask (threshold, in-plane opening,
largest 3D component, largest 2D piece per slice with holes filled; on an in-plane grid of about 2 mm). Which
array end is superior (and anterior) comes from the image direction, never from the slice order. Walking down
from the superior end:

- **local** (the head) ends ``head_margin_mm`` below the *mandible*: the lowest slice of the bone that runs
  continuously down from the skull in the anterior part of the body (skull, face, mandible; the cervical spine is
  posterior). The nasopharynx lies at the skull base, well above the mandible's lower border, and the parotids end
  near it, so the margin covers both whatever the area profile looks like;
- **middle** (head and neck) ends ``middle_margin_mm`` below the *lung apex*: the first slice below the mandible
  where air inside the body forms two pieces of at least ``lung_mm2`` (left and right lung; pharynx, larynx and
  trachea are one piece) that persist. The larynx lies in the neck, above the thoracic inlet; the margin covers
  larynx contours that reach down to it.

Where the anatomy does not show these (bone or air hidden by the intensity normalisation, or no direction given; no
lung in a scan that ends in the neck), the cross-sectional area profile stands in: the head ends where the area drops
towards the narrowest level below it (the neck), the shoulders begin where it rises well above it. When neither
finds a border, the region falls back to the next larger one (local to middle, middle to the body), which is
always the safe side; every fallback is named in ``CaseRegions.fallbacks`` with its reason in
``CaseRegions.warnings``. Nothing here raises on unusual anatomy.

Modules: ``records`` (boxes, settings, what a case's regions record), ``orientation`` (superior and anterior axes
from the direction), ``body`` (body mask, thresholds from the plans), ``landmarks`` (area profile, mandible, lungs),
``borders`` (where each region ends, and the fallbacks), ``cache`` (regions of preprocessed cases, cached) and
``coverage`` (label coverage and fallbacks for the training log). Everything public is importable from here.
"""
from __future__ import annotations

from nnunetv2_gtv.training.regions.records import (  # noqa: F401
    BODY_THRESHOLD_HU, BONE_THRESHOLD_HU, CACHE_FOLDER, CACHE_FORMAT, REGION_NAMES, Box, CaseRegions, Levels, Log,
    RegionSettings,
)
from nnunetv2_gtv.training.regions.orientation import (  # noqa: F401
    anterior_axis_from_direction, array_axis_orientation, superior_axis_from_direction,
)
from nnunetv2_gtv.training.regions.body import (  # noqa: F401
    air_threshold_from_plans, body_mask, body_mask_from_hu, body_threshold_from_plans, bone_threshold_from_plans,
)
from nnunetv2_gtv.training.regions.landmarks import (  # noqa: F401
    anterior_bone_profile, detect_levels, lung_level, mandible_and_lung_levels, mandible_level, plausible_levels,
    smoothed_profile,
)
from nnunetv2_gtv.training.regions.borders import (  # noqa: F401
    compute_regions, shoulders_below,
)
from nnunetv2_gtv.training.regions.cache import (  # noqa: F401
    load_or_compute_regions, regions_for_dataset,
)
from nnunetv2_gtv.training.regions.coverage import (  # noqa: F401
    fallback_summary, label_coverage_by_label, label_coverage_report, label_fraction_inside,
)
