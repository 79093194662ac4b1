"""Pieces the Triton attention kernels share."""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["online_softmax_step"]


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc):
    """One block of an online softmax: scores ``s`` [rows, keys] and values ``v`` folded into the
    running max ``m_i``, normaliser ``l_i`` and weighted sum ``acc``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)       # rows with nothing visible yet
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
