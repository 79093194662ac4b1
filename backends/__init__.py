"""Backends; importing this package registers them (and the kernels they bring for tokopt ops)."""
from . import onnxruntime, tensorrt, triton  # noqa: F401

__all__ = ["onnxruntime", "tensorrt", "triton"]
