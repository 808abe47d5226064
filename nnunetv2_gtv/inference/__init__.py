"""gtv-predict: one preprocessing per CT, every model of the ensemble in memory, gtv-uncertainty's fusion."""
from nnunetv2_gtv.inference.inputs import InputCase, InputError, find_cases
from nnunetv2_gtv.inference.models import LoadedModel, ModelError, ModelSpec, check_shared_preprocessing, \
    load_model, resolve_models
from nnunetv2_gtv.inference.pipeline import RunOptions, RunReport, predict_cases
from nnunetv2_gtv.inference.predictor import EnsemblePredictor
from nnunetv2_gtv.inference.settings import InferenceSettings, parse_tile

__all__ = ["EnsemblePredictor", "InferenceSettings", "InputCase", "InputError", "LoadedModel", "ModelError",
           "ModelSpec", "RunOptions", "RunReport", "check_shared_preprocessing", "find_cases", "load_model",
           "parse_tile", "predict_cases", "resolve_models"]
