"""Evaluation of fused GTV segmentations (``gtv-evaluate``).

``metrics``: Dice, ASSD, HD95, RVE; ``uncertainty_analysis``: error rate per entropy level and VVC correlation;
``folders``: reading the input folders; ``pipeline``: the per-case loop; ``report`` and ``plots``: the outputs
(per-case overlays: ``nnunetv2_gtv.figures.overlay``).
"""
