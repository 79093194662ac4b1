"""Triton kernels for tokopt ops, looked up by op name.

Imported on demand: importing triton is slow, and ``TRITON_INTERPRET=1`` (which runs the kernels
on the CPU, as the tests here do) must be set before it is imported.
"""
from __future__ import annotations

import importlib

__all__ = ["KERNELS", "kernel"]

KERNELS = {"tokopt::tca_attention": "tca:tca_attention_triton",
           "tokopt::still_attention": "still:still_attention_triton",
           "tokopt::matmul_nbits": "nbits:matmul_nbits_triton"}


def kernel(op_name: str):
    """The Triton implementation of ``op_name`` (same arguments as the op's reference)."""
    module, fn = KERNELS[op_name].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), fn)
