"""Small builders for hand-written onnxscript lowerings (shape slices, int constants, ranges)."""
from __future__ import annotations

from onnxscript import opset23 as op

__all__ = ["ints", "arange", "dim"]


def ints(*x):
    """A constant int64 vector."""
    return op.Constant(value_ints=list(x))


def arange(n):
    """0 .. n-1 for a 1-element shape tensor (or a scalar constant) ``n``."""
    return op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1))


def dim(x, axis: int):
    """Axis ``axis`` of ``x``'s shape, as a 1-element tensor."""
    return op.Shape(x, start=axis, end=axis + 1)
