"""Triton chunk kernel for ``tokopt::still_attention``.

Routing (local saliency, top-k per chunk) and the linear state (feature maps, the per-chunk sums
of phi(k) v^T and their prefix) stay in torch, shared with the reference (``optimizer.ops.still.route``
and ``linear_state``): they are small or already linear in N. The kernel runs one program per
(chunk, batch x head) and keeps one online softmax over the chunk's local window and the salient
keys of the chunks outside it (fetched through their indices, 16 at a time), then adds the gated
linear part with the shared normaliser, as the reference does. The ``exact_window=False``
baselines run the reference. Runs on a CUDA GPU and, under ``TRITON_INTERPRET=1`` (set before
triton is imported), on the CPU, which is how the tests check it here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...optimizer.ops.still import DEN_EPS, linear_state, route, still_reference
from .common import online_softmax_step

__all__ = ["still_attention_triton"]


@triton.jit
def _still_kernel(QC, KC, VC, VALID, TOP, FQ, SKV, SZ, GC, OUT, H, C, KK, scale,
                  CAUSAL: tl.constexpr, LINEAR: tl.constexpr, L: tl.constexpr, D: tl.constexpr,
                  DV: tl.constexpr, F: tl.constexpr, BLOCK_N: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    rows = tl.arange(0, L)
    dd, dv = tl.arange(0, D), tl.arange(0, DV)
    head = bh * C * L                      # token offset of this (batch, head) in the chunked tensors
    q = tl.load(QC + (head + c * L + rows)[:, None] * D + dd[None, :])
    m_i = tl.full([L], float("-inf"), tl.float32)
    l_i = tl.zeros([L], tl.float32)
    acc = tl.zeros([L, DV], tl.float32)

    # local window: chunk c - 1 and chunk c up to the query (causal); chunks c - 1 .. c + 1
    for off in tl.static_range(-1, 1 if CAUSAL else 2):
        pos = (c + off) * L + rows
        inside = (pos >= 0) & (pos < C * L)
        k = tl.load(KC + (head + pos)[:, None] * D + dd[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(VC + (head + pos)[:, None] * DV + dv[None, :], mask=inside[:, None], other=0.0)
        seen = (tl.load(VALID + b * C * L + pos, mask=inside, other=0) != 0)[None, :]
        if CAUSAL and off == 0:
            seen = seen & (rows[None, :] <= rows[:, None])
        s = tl.where(seen, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)

    # salient keys of the chunks outside the window
    end = (c - 1) * KK if CAUSAL else C * KK
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        src = cols // KK
        live = cols < C * KK
        if CAUSAL:
            live = live & (src <= c - 2)
        else:
            live = live & ((src <= c - 2) | (src >= c + 2))
        idx = tl.load(TOP + bh * C * KK + cols, mask=live, other=0)
        pos = src * L + idx
        k = tl.load(KC + (head + pos)[:, None] * D + dd[None, :], mask=live[:, None], other=0.0)
        v = tl.load(VC + (head + pos)[:, None] * DV + dv[None, :], mask=live[:, None], other=0.0)
        ok = tl.load(VALID + b * C * L + pos, mask=live, other=0) != 0
        s = tl.where((ok & live)[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)

    num, den = acc, l_i
    if LINEAR:
        ff = tl.arange(0, F)
        fq = tl.load(FQ + (head + c * L + rows)[:, None] * F + ff[None, :])
        skv = tl.load(SKV + (bh * C + c) * F * DV + ff[:, None] * DV + dv[None, :])
        sz = tl.load(SZ + (bh * C + c) * F + ff)
        gate = tl.load(GC + (head + c * L + rows)[:, None] * DV + dv[None, :])
        num = num + gate * tl.dot(fq, skv)
        den = den + tl.sum(fq * sz[None, :], 1)
    out = num / (den + DEN_EPS)[:, None]
    tl.store(OUT + (head + c * L + rows)[:, None] * DV + dv[None, :], out.to(OUT.dtype.element_ty))


def still_attention_triton(q, k, v, x, gate_w, fq_u, fq_w, fk_u, fk_w, mix, mask, scale: float, causal: bool,
                           top_k: int, chunk: int, feature: int, exact_window: bool,
                           block_n: int = 16) -> torch.Tensor:
    """Same contract as ``still_reference`` (``exact_window=True``). ``chunk``, head dims and the
    feature dimension must be powers of two (Triton's block shapes)."""
    if not exact_window:   # the baselines without the exact window have no kernel
        return still_reference(q, k, v, x, gate_w, fq_u, fq_w, fk_u, fk_w, mix, mask, scale, causal, top_k, chunk,
                               feature, exact_window)
    bsz, h, n, _ = q.shape
    r = route(q, k, v, x, gate_w, mask, scale, causal, top_k, chunk)
    _, _, c, l, d = r.qc.shape
    dv = r.vc.shape[-1]
    linear = feature != 3
    if linear:
        fq, _, skv, sz = linear_state(r, fq_u, fq_w, fk_u, fk_w, mix, feature)
    else:
        fq = skv = sz = torch.zeros(1, device=q.device)
    kk = r.top.shape[-1]
    top = r.top.to(torch.int32).contiguous() if kk else torch.zeros(1, dtype=torch.int32, device=q.device)
    valid = r.valid[:, 0].to(torch.int8).contiguous()
    out = torch.empty(bsz, h, c, l, dv, dtype=q.dtype, device=q.device)
    torch.library.wrap_triton(_still_kernel)[(c, bsz * h)](
        r.qc.contiguous(), r.kc.contiguous(), r.vc.contiguous(), valid, top, fq.contiguous(), skv.contiguous(),
        sz.contiguous(), r.gc.contiguous(), out, h, c, kk, scale,
        CAUSAL=causal, LINEAR=linear, L=l, D=d, DV=dv, F=fq.shape[-1] if linear else 16, BLOCK_N=block_n)
    return out.reshape(bsz, h, c * l, dv)[:, :, :n]
