"""classifier_training: train timm image classifiers with Accelerate, ship a verified ONNX."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("classifier-training")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
