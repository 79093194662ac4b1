"""Triton kernel for ``tokopt::matmul_nbits``: a dequantize-in-the-loop GEMM (w4a16 / w8a16).

Each program computes a ``BLOCK_M x BLOCK_N`` tile of ``x @ W^T``. It walks K one quantization
block at a time (``BLOCK_K`` = the op's block size), loads that block's packed bytes for its
``BLOCK_N`` output rows, unpacks the nibbles (low first), subtracts the zero point ``2^(bits-1)``,
scales them by the block's scale and multiplies in the activations' precision with float32
accumulation: the weights cross memory once, at 4 or 8 bits. Same arguments and packed layout as
the op (``optimizer/ops/nbits.py``), so a bundle's constants feed it unchanged. Runs on a CUDA GPU,
and on the CPU under ``TRITON_INTERPRET=1`` (set before triton is imported), as the tests do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["matmul_nbits_triton"]


@triton.jit
def _nbits_kernel(X, QW, S, BIAS, OUT, M, N, K, s_xm, s_qn, s_sn, s_om,
                  BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    per_byte: tl.constexpr = 8 // BITS
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for blk in range(0, tl.cdiv(K, BLOCK_K)):
        cols = blk * BLOCK_K + rk
        x = tl.load(X + rm[:, None] * s_xm + cols[None, :], mask=(rm[:, None] < M) & (cols[None, :] < K), other=0.0)
        # byte of column c within row n: c // per_byte; nibble: c % per_byte
        byte = tl.load(QW + rn[:, None] * s_qn + (cols[None, :] // per_byte), mask=rn[:, None] < N, other=0)
        if BITS == 4:
            code = (byte >> ((cols[None, :] % 2) * 4).to(tl.uint8)) & 15
        else:
            code = byte
        scale = tl.load(S + rn * s_sn + blk, mask=rn < N, other=0.0)
        w = (code.to(tl.float32) - (1 << (BITS - 1))) * scale[:, None]                   # [BLOCK_N, BLOCK_K]
        acc += tl.dot(x.to(tl.float32), tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(OUT + rm[:, None] * s_om + rn[None, :], acc.to(OUT.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul_nbits_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                        bits: int, block_size: int, in_features: int, out_features: int,
                        block_m: int = 16, block_n: int = 32) -> torch.Tensor:
    """Same contract as the op's reference. ``block_size`` is the kernel's K step (a power of
    two >= 16, as the op requires)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    m = x2.shape[0]
    qw = qweight.reshape(out_features, -1).contiguous()
    sc = scales.contiguous()
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(out_features, block_n))
    torch.library.wrap_triton(_nbits_kernel)[grid](
        x2, qw, sc, bias if bias is not None else sc, out, m, out_features, in_features,
        x2.stride(0), qw.stride(0), sc.stride(0), out.stride(0),
        BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_size)
    return out.reshape(*lead, out_features)
