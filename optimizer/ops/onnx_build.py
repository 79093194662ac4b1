"""Small builders for hand-written onnxscript lowerings (shape slices, int constants, ranges)."""
from __future__ import annotations

from onnxscript import opset23 as op

__all__ = ["ints", "arange", "dim", "is_bool"]


def ints(*x):
    """A constant int64 vector."""
    return op.Constant(value_ints=list(x))


def arange(n):
    """0 .. n-1 for a 1-element shape tensor (or a scalar constant) ``n``."""
    return op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1))


def dim(x, axis: int):
    """Axis ``axis`` of ``x``'s shape, as a 1-element tensor."""
    return op.Shape(x, start=axis, end=axis + 1)


def is_bool(x) -> bool:
    """Whether traced value ``x`` is a bool tensor (a keep-mask rather than an additive one)."""
    return x.dtype is not None and x.dtype.name == "BOOL"
