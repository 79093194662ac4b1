"""Triton kernels for tokopt ops, registered with the op registry under the backend name "triton".

The kernel modules are imported when a kernel is first asked for (``ops.kernel(op, "triton")``):
importing triton is slow, and ``TRITON_INTERPRET=1`` (which runs the kernels on the CPU, as the
tests here do) must be set before it is imported.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch   # the references' string annotations are read in this module's namespace

from ...optimizer.ops import OPS, kernel, register_kernel

__all__ = ["BACKEND", "KERNELS", "TRACEABLE", "graph_ops", "register_cuda_kernels"]

BACKEND = "triton"
KERNELS = {"tokopt::tca_attention": "tca:tca_attention_triton",
           "tokopt::still_attention": "still:still_attention_triton",
           "tokopt::matmul_nbits": "nbits:matmul_nbits_triton"}

for _op, _where in KERNELS.items():
    register_kernel(_op, BACKEND, f"{__name__}.{_where}")


# kernels whose torch side (selection, routing) sizes nothing by a computed value, so that
# torch.export and Inductor can trace around them (TCA's key budgets are such values)
TRACEABLE = ("tokopt::matmul_nbits",)
_GRAPH_OPS: dict[str, Callable] = {}
_ON_CUDA: set[str] = set()


def graph_ops() -> dict[str, Callable]:
    """tokopt op name -> a ``torch.library.triton_op`` (``tokopt_triton::NAME``, the reference's
    signature) running its kernel, for the ``TRACEABLE`` kernels. torch.export and Inductor trace into
    a triton_op (its launches go through ``wrap_triton``), so AOTInductor compiles the kernel into
    the package with the graph's own code around it."""
    if not _GRAPH_OPS:
        for op in TRACEABLE:
            _GRAPH_OPS[op] = torch.library.triton_op(f"tokopt_triton::{op.split('::')[1]}", mutates_args=())(
                _with_signature(kernel(op, BACKEND), OPS[op].reference))
    return _GRAPH_OPS


def register_cuda_kernels() -> tuple[str, ...]:
    """Make the other kernels their op's CUDA implementation, so that a package calling the op
    (opaque, through AOTInductor's proxy executor) runs the Triton kernel on CUDA tensors; returns
    their op names. Idempotent."""
    ops = tuple(op for op in KERNELS if op not in TRACEABLE)
    for op in set(ops) - _ON_CUDA:
        torch.library.register_kernel(op, "cuda", _with_signature(kernel(op, BACKEND), OPS[op].reference))
        _ON_CUDA.add(op)
    return ops


def _with_signature(fn: Callable, reference: Callable) -> Callable:
    """``fn`` under the reference's annotated signature, which torch.library reads the schema from."""
    @functools.wraps(reference)
    def run(*args, **kwargs):
        return fn(*args, **kwargs)
    return run
