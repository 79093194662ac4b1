"""Backends; importing this package registers them (and the kernels they bring for tokopt ops)."""
from . import onnxruntime, openvino, tensorrt, triton  # noqa: F401

__all__ = ["onnxruntime", "openvino", "tensorrt", "triton"]
