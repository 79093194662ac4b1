"""``tokopt::linear_w8a8``: a linear layer on int8 weights and statically quantized activations.

    linear_w8a8(x[..., K], weight[K, N] i8, w_scale[N], x_scale[], x_zero[] u8, bias?[N]) -> [..., N]
        x_q = clamp(round(x / x_scale) + x_zero, 0, 255)          (uint8, one scale per tensor)
        y   = ((x_q - x_zero) x_scale) @ (weight w_scale) + bias

(the weight stored input-major, as ``MatMul`` reads it: ONNX Runtime fuses a weight
``DequantizeLinear`` only when its input is an initializer)

Weights are symmetric per output channel, activations asymmetric per tensor with a scale and
zero point calibrated once (static), unsigned: the form both runtimes run on integer kernels.
The hand lowering is that form in QDQ (``QuantizeLinear``/``DequantizeLinear`` on x, a
per-channel ``DequantizeLinear`` on the int8 weights, ``MatMul``): ONNX Runtime fuses it into
``MatMulIntegerToFloat`` (u8 x s8, its VNNI kernel on x86), OpenVINO into ``FakeQuantize`` and an
int8 GEMM; the decomposed reference would be float arithmetic neither recognises.
"""
from __future__ import annotations

import torch
from onnxscript import opset23 as op

from .registry import define_op, round_values

__all__ = ["LINEAR_W8A8", "outlier_rows", "quantize_activation_range", "row_factors", "scale_rows"]

SIGNED_ZERO = 128   # the uint8 zero point that makes a grid read as signed int8


def quantize_activation_range(low: float, high: float) -> tuple[float, int]:
    """(scale, zero point) of the uint8 grid over [low, high], zero exactly representable.

    The zero point is never 128: OpenVINO reads a grid of [-128, 127] steps as signed int8
    (its low-precision rule: low / high = -128 / 127), and its CPU plugin runs int8 x int8 on a
    slower kernel than uint8 x int8 where there is no AMX. 127 or 129 instead, the step widened
    to cover both ends (at most 1/127 coarser)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / 255, 1e-12)
    zero = int(min(255, max(0, round(-low / scale))))
    if zero != SIGNED_ZERO:
        return scale, zero
    return min((max(-low / z, high / (255 - z), 1e-12), z) for z in (SIGNED_ZERO - 1, SIGNED_ZERO + 1))


def _linear_w8a8(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor,
                 x_zero: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    zero = x_zero.to(x.dtype)
    xq = torch.clamp(round_values(x / x_scale) + zero, 0, 255)
    y = ((xq - zero) * x_scale) @ (weight.to(x.dtype) * w_scale)
    return y if bias is None else y + bias


def _linear_w8a8_fake(x, weight, w_scale, x_scale, x_zero, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


def _linear_w8a8_onnx(x, weight, w_scale, x_scale, x_zero, bias=None):
    xd = op.DequantizeLinear(op.QuantizeLinear(x, x_scale, x_zero), x_scale, x_zero)
    w = op.DequantizeLinear(weight, w_scale, axis=1)                                    # [K, N], per column
    y = op.MatMul(xd, w)
    return y if bias is None else op.Add(y, bias)


LINEAR_W8A8 = define_op("tokopt::linear_w8a8", _linear_w8a8, _linear_w8a8_fake, onnx=_linear_w8a8_onnx,
                        tags=("quant",), exact=False)


# Token-adaptive W8A8 (rsq's outlier_tokens): plain functions a rewrite calls and export traces
# into ATen ops (two reductions and two multiplies) around one linear_w8a8.

def outlier_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, min(k, N)] indices of the tokens of ``x`` [B, N, width] with the largest max |x|
    (calibration: the tokens left out of the tight grid)."""
    peak = torch.maximum(x.amax(-1), -x.amin(-1))
    return peak.topk(torch.sym_min(k, peak.shape[1]), dim=1).indices


def row_factors(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """[..., 1]: per token, how far past the grid [low, high] its values reach (1 for a token
    inside it): dividing the token by it puts it on the grid, its own scale = factor x the grid's."""
    sides = ([x.amax(-1, keepdim=True) / high] if high > 0 else []) + \
        ([x.amin(-1, keepdim=True) / low] if low < 0 else [])
    if not sides:  # a grid of one point (zero): nothing to scale onto it
        return x.new_ones(*x.shape[:-1], 1)
    reach = sides[0] if len(sides) == 1 else torch.maximum(*sides)
    return reach.clamp_min(1.0)


def scale_rows(y: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y * factors if bias is None else y * factors + bias
