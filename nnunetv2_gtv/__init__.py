"""nnU-Net v2 plugin for the GTV of nasopharyngeal carcinoma on CT (Mei et al., 2.5D CNN + AM + PE)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nnunetv2-gtv")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
