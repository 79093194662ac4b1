"""Backends; importing this package registers them."""
from . import onnxruntime, tensorrt  # noqa: F401

__all__ = ["onnxruntime", "tensorrt"]
