"""Fusion of several nnU-Net models' probabilities with vote entropy and VVC uncertainty (``gtv-uncertainty``)."""
from nnunetv2_gtv.ensemble.errors import FusionInputError
from nnunetv2_gtv.ensemble.folders import DatasetInfo, PredictionFolder, check_compatible, match_cases, \
    open_prediction_folder
from nnunetv2_gtv.ensemble.fusion import CaseResult, FusionSettings, fuse_case, volume_variation_coefficient

__all__ = ["CaseResult", "DatasetInfo", "FusionInputError", "FusionSettings", "PredictionFolder", "check_compatible",
           "fuse_case", "match_cases", "open_prediction_folder", "volume_variation_coefficient"]
