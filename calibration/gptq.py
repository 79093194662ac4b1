"""Weight quantizers: round-to-nearest and GPTQ, symmetric and block-wise along the input dimension.

    quantize_rtn(W, bits, block_size)          -> QuantizedWeight
    quantize_gptq(W, H, bits, block_size, ...) -> QuantizedWeight

A block of ``block_size`` input columns of one output row shares a scale ``s = 2 max|w| / (2^b - 1)``
(optionally shrunk by a 2.4-norm MSE search, RSQ's ``--w_clip``) and the zero point ``2^(b-1)``:
``w = (code - 2^(b-1)) s`` with unsigned codes in [0, 2^b - 1], the layout ``passes/quant_op``
packs for ONNX Runtime's ``MatMulNBits``.

GPTQ (Frantar et al., 2022) quantizes columns left to right and spreads each column's rounding
error over the columns not yet quantized through the inverse Hessian of the layer's inputs
(``H = sum_t w_t x_t x_t^T``; RSQ weights tokens by importance). Damping is ``damp * mean(diag H)``,
added again and again (up to 50 times, RSQ's ``add_until_fail``) until the Cholesky succeeds.
With ``act_order`` columns go in decreasing ``diag(H)`` and the scales are fixed up front from
the unquantized weights ("static groups"), so the packed layout stays in input order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..optimizer.errors import PassError

__all__ = ["QuantizedWeight", "quantize_rtn", "quantize_gptq", "block_scales"]

CLIP_GRID, CLIP_MAX_SHRINK, CLIP_NORM = 100, 0.8, 2.4


@dataclass
class QuantizedWeight:
    codes: torch.Tensor     # [N, K] uint8, unsigned
    scales: torch.Tensor    # [N, ceil(K/bs)] float32
    bits: int
    block_size: int

    def dequantize(self) -> torch.Tensor:
        k = self.codes.shape[1]
        s = self.scales.repeat_interleave(self.block_size, 1)[:, :k]
        return (self.codes.float() - (1 << (self.bits - 1))) * s


def _q(w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    zp = 1 << (bits - 1)
    return torch.clamp(torch.round(w / s) + zp, 0, (1 << bits) - 1)


def _scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    return (2 * amax / ((1 << bits) - 1)).clamp_min(1e-12)


def _group_scale(w: torch.Tensor, bits: int, clip: bool) -> torch.Tensor:
    """[N] scale for the columns ``w`` [N, g] of one block."""
    amax = w.abs().amax(1)
    best = _scale(amax, bits)
    if not clip:
        return best
    zp = 1 << (bits - 1)
    err = torch.full_like(amax, float("inf"))
    t = torch.empty_like(w)
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        s = _scale(amax * (1 - i / CLIP_GRID), bits)[:, None]
        # in place, and |e|^2.4 as exp(2.4 log|e|): torch's pow with a fractional exponent is not
        # vectorized (10x the time of the search; a 14336-wide layer's blocks took minutes)
        torch.div(w, s, out=t).round_().clamp_(-zp, zp - 1).mul_(s).sub_(w).abs_()
        e = t.log_().mul_(CLIP_NORM).exp_().sum(1)
        better = e < err
        err, best = torch.where(better, e, err), torch.where(better, s[:, 0], best)
    return best


def block_scales(w: torch.Tensor, bits: int, block_size: int, clip: bool) -> torch.Tensor:
    n, k = w.shape
    return torch.stack([_group_scale(w[:, j:j + block_size], bits, clip) for j in range(0, k, block_size)], 1)


def quantize_rtn(w: torch.Tensor, bits: int, block_size: int, clip: bool = False) -> QuantizedWeight:
    w = w.float()
    scales = block_scales(w, bits, block_size, clip)
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for i in range(0, w.shape[0], 4096):   # by slices of rows: an LM head's temporaries are 4 copies of it
        s = scales[i:i + 4096].repeat_interleave(block_size, 1)[:, :w.shape[1]]
        codes[i:i + 4096] = _q(w[i:i + 4096], s, bits)
    return QuantizedWeight(codes, scales, bits, block_size)


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """The upper Cholesky factor of the damped ``h``'s inverse. ``h`` is damped in place and
    each intermediate freed as the next is made: two k x k matrices beside ``h`` at once (a
    14336-wide MLP input's are 0.8 GB each)."""
    diagonal = h.diagonal().clone()
    step = damp * diagonal.mean().clamp_min(1e-12)
    for attempt in range(1, 51):
        h.diagonal().copy_(diagonal + attempt * step)
        l, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inv = torch.cholesky_inverse(l)
            del l
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return u
    raise PassError(f"GPTQ: the Hessian of {name} is not positive definite even with 50x damping "
                    f"({damp} x mean diagonal each); its calibration inputs are degenerate (constant or "
                    "missing). Use more or different calibration data, or quantize it with solver=rtn.")


def quantize_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, block_size: int, *, damp: float = 0.01,
                  act_order: bool = False, clip: bool = False, name: str = "a linear",
                  column_block: int = 128) -> QuantizedWeight:
    # float32 throughout, as GPTQ's and RSQ's own code: float64 doubled the time for the same error
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    n, k = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scales = block_scales(w, bits, block_size, clip) if act_order else None
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    if act_order:
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp, name)
    del h
    codes = torch.zeros(n, k, dtype=torch.uint8)
    if scales is None:
        scales = torch.zeros(n, -(-k // block_size))
    zp = 1 << (bits - 1)
    for i1 in range(0, k, column_block):
        i2 = min(i1 + column_block, k)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1)
        diagonal = hinv.diagonal()[i1:i2].tolist()
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // block_size
            if not act_order and col % block_size == 0:  # a new block: its scale from the updated weights
                rest = w1[:, i:i + block_size]
                if rest.shape[1] < block_size:   # the block runs past this column block
                    rest = torch.cat([rest, w[:, i2:i2 + block_size - rest.shape[1]]], 1)
                scales[:, g] = _group_scale(rest, bits, clip)
            s = scales[:, g]
            q = _q(w1[:, i], s, bits)
            codes[:, col] = q.to(torch.uint8)
            e = (w1[:, i] - (q - zp) * s) / diagonal[i]
            w1[:, i:].addr_(e, hinv[i1 + i, i1 + i:i2], alpha=-1)
            err1[:, i] = e
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)
    return QuantizedWeight(codes, scales, bits, block_size)
