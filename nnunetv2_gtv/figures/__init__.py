"""Pictures of the package, with one home for orienting and rendering slices.

``slices``: display axes, radiological views, crops and slice rendering; ``regions``: the sampling-regions
picture (gtv-regions); ``overlay``: gtv-evaluate's per-case overlays; ``evaluation_plots``: the plots of gtv-evaluate, gtv-compare and
the benchmarks (error rate per level, VVC, box plots, learning curve); ``review``: the review page (gtv-review).
"""
