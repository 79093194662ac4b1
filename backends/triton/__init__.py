"""Triton kernels for tokopt ops, registered with the op registry under the backend name "triton".

The kernel modules are imported when a kernel is first asked for (``ops.kernel(op, "triton")``):
importing triton is slow, and ``TRITON_INTERPRET=1`` (which runs the kernels on the CPU, as the
tests here do) must be set before it is imported.
"""
from __future__ import annotations

from ...optimizer.ops import register_kernel

__all__ = ["BACKEND", "KERNELS"]

BACKEND = "triton"
KERNELS = {"tokopt::tca_attention": "tca:tca_attention_triton",
           "tokopt::still_attention": "still:still_attention_triton",
           "tokopt::matmul_nbits": "nbits:matmul_nbits_triton"}

for _op, _where in KERNELS.items():
    register_kernel(_op, BACKEND, f"{__name__}.{_where}")
