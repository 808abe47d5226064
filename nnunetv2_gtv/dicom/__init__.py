"""DICOM for gtv-predict: CT series in (``series``), RT Structure Set (``rtstruct``) and Segmentation (``seg``)
out, both written from a mask on the series' grid (``outputs``); ``synthetic`` writes test series."""
