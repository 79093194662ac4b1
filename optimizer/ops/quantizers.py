"""EdgeQAT's quantizers as ops: per-token activation bit widths, and the token split behind them.

    act_quant(x, low?[B,N], s_hi, z_hi, s_lo, z_lo, bits_hi, bits_lo, signed, token_dim) -> x
        fake-quantizes x at ``bits_hi``, the tokens marked in ``low`` at ``bits_lo``; each width
        has its own learned scale and integer zero point (LSQ-style, one per tensor):
        ``x_q = (clamp(round(x/s) + z, Qn, Qp) - z) s``, QuantizeLinear's arithmetic
    token_quant(x, low?[B,N], bits_hi, bits_lo, token_dim) -> x
        the same split with dynamic symmetric scales, one per token (per token and head for
        q/k/v): ``s_t = max|x_t| / Qp`` computed at run time, nothing learned
    weight_quant(w, s, bits) -> w            symmetric per-tensor weight fake-quantization
    low_tokens(q[B,H,N,d], k[B,Hkv,N,d], scale, fraction) -> bool [B,N]
        EdgeQAT's importance: the ``floor(fraction N)`` tokens whose queries, summed over heads,
        give the first token the lowest pre-softmax logit are "low"

The references are written with straight-through rounding and LSQ's gradient scale, so the
same ops train (``optimizer.ops.differentiable``) and deploy. The quantizers' hand lowering is
``QuantizeLinear`` / ``DequantizeLinear`` (int8; the low width clips to its range first, so its
codes fit 4 bits) with ``Where`` picking per token: the QDQ form runtimes turn into integer
kernels (OpenVINO's FakeQuantize, ORT's QDQ fusions), which the decomposed rounding arithmetic
would hide from them. ONNX Runtime on this CPU runs these per-token pairs as they are: the
accuracy contract of a mixed-precision kernel, not a faster one. The split is exported from its
decomposed reference (MatMul, ReduceSum, TopK, ScatterElements).
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from onnxscript import opset23 as op

from .registry import define_op, differentiable, round_values

__all__ = ["ACT_QUANT", "TOKEN_QUANT", "WEIGHT_QUANT", "LOW_TOKENS", "qrange"]


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


# Forward values are exactly those of the plain expressions (a + (b - b.detach()) adds an exact
# zero), so the reference computes bit for bit what QuantizeLinear / DequantizeLinear compute.
def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return round_values(x.detach()) + (x - x.detach())


def _grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    return s.detach() + (s * g - (s * g).detach())


def _fake(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear: ``(clamp(round(x/s) + z, Qn, Qp) - z) s``."""
    qn, qp = qrange(bits, signed)
    s = _grad_scale(s, 1.0 / math.sqrt(max(x.numel(), 1) * qp)).abs()
    zi = _round_ste(z)
    return (torch.clamp(_round_ste(x / s) + zi, qn, qp) - zi) * s


def _act_quant(x: torch.Tensor, low: torch.Tensor | None, s_hi: torch.Tensor, z_hi: torch.Tensor,
               s_lo: torch.Tensor, z_lo: torch.Tensor, bits_hi: int, bits_lo: int, signed: bool,
               token_dim: int) -> torch.Tensor:
    hi = _fake(x, s_hi, z_hi, bits_hi, signed)
    if low is None:
        return hi
    shape = [1] * x.dim()
    shape[0], shape[token_dim] = low.shape[0], low.shape[1]
    return torch.where(low.reshape(shape), _fake(x, s_lo, z_lo, bits_lo, signed), hi)


def _act_quant_fake(x, low, s_hi, z_hi, s_lo, z_lo, bits_hi, bits_lo, signed, token_dim):
    return torch.empty_like(x)


def _qdq(x, s, z, bits: int, signed: bool, clip: bool):
    qn, qp = qrange(bits, signed)
    # int8 throughout (an unsigned grid shifted by 128): ONNX Runtime's QDQ rewrites at session
    # start mishandle graphs that mix int8 and uint8 pairs
    zt = op.Cast(op.Sub(op.Round(z), op.Constant(value_float=0.0 if signed else 128.0)), to=3)
    if clip:  # the low width: keep the codes inside its range before the 8-bit QDQ
        zf = op.Round(z)
        x = op.Clip(x, op.Mul(op.Sub(op.Constant(value_float=float(qn)), zf), s),
                    op.Mul(op.Sub(op.Constant(value_float=float(qp)), zf), s))
    return op.DequantizeLinear(op.QuantizeLinear(x, s, zt), s, zt)


def _act_quant_onnx(x, low, s_hi, z_hi, s_lo, z_lo, bits_hi: int = 8, bits_lo: int = 4, signed: bool = True,
                    token_dim: int = 1):
    # scalars: QuantizeLinear's per-tensor form
    s_hi, z_hi, s_lo, z_lo = (op.Squeeze(t, op.Constant(value_ints=[0])) for t in (op.Abs(s_hi), z_hi, op.Abs(s_lo), z_lo))
    hi = _qdq(x, s_hi, z_hi, bits_hi, signed, clip=bits_hi < 8)
    if low is None:
        return hi
    axes = [1, 3] if token_dim == 2 else [2]
    return op.Where(op.Unsqueeze(low, op.Constant(value_ints=axes)), _qdq(x, s_lo, z_lo, bits_lo, signed, clip=True), hi)


ACT_QUANT = define_op("tokopt::act_quant", _act_quant, _act_quant_fake, onnx=_act_quant_onnx, tags=("quant",),
                      exact=False)
differentiable("tokopt::act_quant", _act_quant, grads_for=6)


def _per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric, one scale per row of the last axis (a token, or a token's head): max|x| / Qp."""
    qp = (1 << (bits - 1)) - 1
    s = torch.clamp(x.detach().abs().amax(-1, keepdim=True) / qp, min=1e-8)
    return torch.clamp(_round_ste(x / s), -qp, qp) * s


def _token_quant(x: torch.Tensor, low: torch.Tensor | None, bits_hi: int, bits_lo: int,
                 token_dim: int) -> torch.Tensor:
    hi = _per_token(x, bits_hi)
    if low is None:
        return hi
    shape = [1] * x.dim()
    shape[0], shape[token_dim] = low.shape[0], low.shape[1]
    return torch.where(low.reshape(shape), _per_token(x, bits_lo), hi)


def _token_quant_fake(x, low, bits_hi, bits_lo, token_dim):
    return torch.empty_like(x)


def _qdq_rows(x, bits: int):
    """Per-row QuantizeLinear/DequantizeLinear: the rows flattened to one axis of scales."""
    qp = float((1 << (bits - 1)) - 1)
    s = op.Max(op.Div(op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1), op.Constant(value_float=qp)),
               op.Constant(value_float=1e-8))
    shape = op.Shape(x)
    rows = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), op.Shape(x, start=-1), axis=0))
    s1 = op.Reshape(s, op.Constant(value_ints=[-1]))
    q = op.QuantizeLinear(rows, s1, axis=0, output_dtype=3)   # int8, zero point 0
    return op.Reshape(op.DequantizeLinear(q, s1, axis=0), shape)


def _token_quant_onnx(x, low, bits_hi: int = 8, bits_lo: int = 4, token_dim: int = 1):
    hi = _qdq_rows(x, bits_hi)
    if low is None:
        return hi
    axes = [1, 3] if token_dim == 2 else [2]
    return op.Where(op.Unsqueeze(low, op.Constant(value_ints=axes)), _qdq_rows(x, bits_lo), hi)


TOKEN_QUANT = define_op("tokopt::token_quant", _token_quant, _token_quant_fake, onnx=_token_quant_onnx,
                        tags=("quant",), exact=False)
differentiable("tokopt::token_quant", _token_quant, grads_for=2)


def _weight_quant(w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    return _fake(w, s, torch.zeros_like(s), bits, True)


def _weight_quant_fake(w, s, bits):
    return torch.empty_like(w)


WEIGHT_QUANT = define_op("tokopt::weight_quant", _weight_quant, _weight_quant_fake, tags=("quant",))
differentiable("tokopt::weight_quant", _weight_quant, grads_for=2)


def _low_tokens(q: torch.Tensor, k: torch.Tensor, scale: float, fraction: float) -> torch.Tensor:
    b, h, n, d = q.shape
    hkv = k.shape[1]
    first = k[:, :, :1]                                                         # [B,Hkv,1,d]
    score = (q.reshape(b, hkv, -1, d) @ first.transpose(-2, -1)).reshape(b, h, n).sum(1) * scale
    part = Fraction(fraction).limit_denominator(1000)
    count = n * part.numerator // part.denominator                              # floor(fraction N), traceable
    idx = score.float().topk(count, dim=-1, largest=False).indices
    return torch.zeros(b, n, dtype=torch.bool, device=q.device).scatter(1, idx, True)


def _low_tokens_fake(q, k, scale, fraction):
    return q.new_empty((q.shape[0], q.shape[2]), dtype=torch.bool)


# No hand lowering: the decomposed reference is the same TopK and ScatterElements.
LOW_TOKENS = define_op("tokopt::low_tokens", _low_tokens, _low_tokens_fake, tags=("quant",), exact=False)
