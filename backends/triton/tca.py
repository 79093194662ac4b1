"""Triton kernel for ``tokopt::tca_attention``: block-gathered attention over each head's core tokens.

The selection (scores, TopK: small) stays in torch, shared with the reference
(``optimizer.ops.tca.select_keys``). The kernel runs one program per (block of queries, batch x query
head) and keeps one online softmax over (1) the head's selected keys, fetched block by block
through their indices and masked to those outside the query's window, and (2) the keys of the
query block's local windows; it normalises once at the end, so the result is the reference's.
Runs on a CUDA GPU, and on the CPU under ``TRITON_INTERPRET=1`` (set before triton is imported),
which is how the tests check it here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...optimizer.ops.tca import select_keys, valid_keys
from .common import online_softmax_step

__all__ = ["tca_attention_triton"]


@triton.jit
def _tca_kernel(Q, K, V, IDX, CNT, VALID, OUT,
                s_qb, s_qh, s_qn, s_kb, s_kn, s_vb, s_vn, s_ib, s_valb, s_ob, s_oh, s_on,
                H, NQ, NK, M, WINDOW, scale,
                CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                D: tl.constexpr, DV: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd, dv = tl.arange(0, D), tl.arange(0, DV)
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + dd[None, :], mask=rows[:, None] < NQ, other=0.0)
    qpos = rows + (NK - NQ)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)

    # (1) selected keys (sinks first), outside each query's window
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inside = cols < M
        kidx = tl.load(IDX + b * s_ib + cols, mask=inside, other=0)
        keep = tl.load(CNT + b * s_ib + cols, mask=inside, other=0) != 0
        k = tl.load(K + b * s_kb + kidx[:, None] * s_kn + dd[None, :])
        v = tl.load(V + b * s_vb + kidx[:, None] * s_vn + dv[None, :])
        gap = qpos[:, None] - kidx[None, :]
        if CAUSAL:
            far = gap >= WINDOW
        else:
            far = (gap >= WINDOW) | (gap <= -WINDOW)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(far & keep[None, :] & inside[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)

    # (2) the local windows of this block of queries
    first = pid_m * BLOCK_M + (NK - NQ) - WINDOW + 1
    if CAUSAL:
        last = pid_m * BLOCK_M + BLOCK_M - 1 + (NK - NQ)
    else:
        last = pid_m * BLOCK_M + BLOCK_M - 1 + (NK - NQ) + WINDOW - 1
    for start in range(first, last + 1, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inside = (cols >= 0) & (cols < NK)
        ok = tl.load(VALID + b * s_valb + cols, mask=inside, other=0) != 0
        k = tl.load(K + b * s_kb + cols[:, None] * s_kn + dd[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(V + b * s_vb + cols[:, None] * s_vn + dv[None, :], mask=inside[:, None], other=0.0)
        diff = qpos[:, None] - cols[None, :]
        if CAUSAL:
            band = (diff >= 0) & (diff < WINDOW)
        else:
            band = (diff < WINDOW) & (diff > -WINDOW)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(band & ok[None, :] & inside[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)

    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(OUT + b * s_ob + h * s_oh + rows[:, None] * s_on + dv[None, :], out.to(OUT.dtype.element_ty),
             mask=rows[:, None] < NQ)


def tca_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, causal: bool, budgets: list[float], windows: list[int], sinks: int,
                         obs: int, block_m: int = 16, block_n: int = 16) -> torch.Tensor:
    """Same contract as ``tca_reference``; one launch per KV head (its own budget and window).
    Head dims must be powers of two (Triton's block shapes)."""
    b, h, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hkv
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(b, h, nq, dv, dtype=q.dtype, device=q.device)
    valid = valid_keys(mask, b, nk, q.device).to(torch.int8).contiguous()
    for i in range(hkv):
        qi, ki, vi = q[:, i * g:(i + 1) * g], k[:, i:i + 1], v[:, i:i + 1]
        idx, count, _ = select_keys(qi, ki, valid.bool(), scale, causal, [budgets[i]], sinks, windows[i], obs)
        idx, count = idx[:, 0].contiguous(), count[:, 0].to(torch.int8).contiguous()   # [B, M]
        oi = out[:, i * g:(i + 1) * g]
        grid = (triton.cdiv(nq, block_m), b * g)
        torch.library.wrap_triton(_tca_kernel)[grid](
            qi, ki, vi, idx, count, valid, oi,
            qi.stride(0), qi.stride(1), qi.stride(2), ki.stride(0), ki.stride(2), vi.stride(0),
            vi.stride(2), idx.stride(0), valid.stride(0), oi.stride(0), oi.stride(1), oi.stride(2),
            g, nq, nk, idx.shape[1], windows[i], scale,
            CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, D=d, DV=dv)
    return out
