"""Errors raised for unusable ensemble inputs."""
from nnunetv2_gtv.errors import CaseError


class FusionInputError(CaseError):
    """An input folder or file cannot be fused; the message names the folder/file and the case."""


class SingleModelWarning(UserWarning):
    """A case is fused from one model only: no uncertainty can be measured."""
