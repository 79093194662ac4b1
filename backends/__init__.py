"""Backends; importing this package registers them (and the kernels they bring for tokopt ops)."""
from . import inductor, onnxruntime, openvino, tensorrt, triton  # noqa: F401

__all__ = ["inductor", "onnxruntime", "openvino", "tensorrt", "triton"]
