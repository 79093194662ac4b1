"""Triton kernels against their op's torch reference: on the CPU under TRITON_INTERPRET=1 (in a
subprocess, since the variable must be set before triton is imported), on a GPU where one exists."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import torch
    from tokopt.backends.triton import kernel
    from tokopt.passes.tca_op import tca_reference
    from tests.test_tca import _qkvm
    tca = kernel("tokopt::tca_attention")
    worst = 0.0
    for causal, b, h, hkv, nq, nk in [(True, 2, 4, 2, 37, 37), (True, 2, 4, 1, 1, 50), (True, 1, 4, 2, 5, 40),
                                      (False, 2, 4, 2, 37, 37)]:
        q, k, v, mask = _qkvm(b, h, hkv, nq, nk, causal, pad=2)
        for fs, ws in (([1.0] * hkv, [8] * hkv), ([0.3, 0.6][:hkv], [4, 6][:hkv])):
            ref = tca_reference(q, k, v, mask, 0.25, causal, fs, ws, 2, 3)
            worst = max(worst, float((tca(q, k, v, mask, 0.25, causal, fs, ws, 2, 3) - ref).abs().max()))
    print(worst)
""")


NBITS = textwrap.dedent("""
    import torch
    from tokopt.backends.triton import kernel
    from tokopt.passes.quant_op import MATMUL_NBITS, pack
    nbits = kernel("tokopt::matmul_nbits")
    worst = 0.0
    g = torch.Generator().manual_seed(0)
    for bits, m, k, n, bs, bias in [(4, 5, 64, 48, 32, True), (4, 37, 80, 40, 16, False), (8, 3, 48, 33, 16, True)]:
        qw = pack(torch.randint(0, 1 << bits, (n, k), generator=g), bits, bs)
        sc = torch.rand(n, qw.shape[1], generator=g) * 0.1
        b = torch.randn(n, generator=g) if bias else None
        x = torch.randn(2, m, k, generator=g)
        ref = MATMUL_NBITS.reference(x, qw, sc, b, bits, bs, k, n)
        worst = max(worst, float((nbits(x, qw, sc, b, bits, bs, k, n) - ref).abs().max()))
    print(worst)
""")


def _interpreted(script: str) -> float:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT.parent)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


def test_tca_kernel_matches_reference_interpreted():
    """Causal and bidirectional, GQA, left padding, a decode step, full and partial budgets."""
    assert _interpreted(CHECK) < 1e-5


def test_nbits_kernel_matches_reference_interpreted():
    """int4 and int8, with and without bias, K not a multiple of the block (padded), ragged M/N."""
    assert _interpreted(NBITS) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the compiled kernel is checked interpreted")
def test_tca_kernel_on_gpu():
    from tokopt.backends.triton import kernel
    from tokopt.passes.tca_op import tca_reference
    from tests.test_tca import _qkvm
    q, k, v, mask = (t.cuda() for t in _qkvm(1, 8, 2, 2048, 2048, True))
    got = kernel("tokopt::tca_attention")(q, k, v, mask, 0.25, True, [0.1, 0.2], [64, 128], 4, 16)
    ref = tca_reference(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), 0.25, True, [0.1, 0.2], [64, 128], 4, 16)
    assert (got.cpu() - ref).abs().max() < 2e-3  # tf32 dot products


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the compiled kernel is checked interpreted")
def test_nbits_kernel_on_gpu():
    from tokopt.backends.triton import kernel
    from tokopt.passes.quant_op import MATMUL_NBITS, pack
    qw = pack(torch.randint(0, 16, (1024, 2048)), 4, 32)
    sc = torch.rand(1024, 64) * 0.01
    x = torch.randn(64, 2048, dtype=torch.float16)
    ref = MATMUL_NBITS.reference(x.float(), qw, sc, None, 4, 32, 2048, 1024)
    got = kernel("tokopt::matmul_nbits")(x.cuda(), qw.cuda(), sc.cuda(), None, 4, 32, 2048, 1024)
    assert (got.float().cpu() - ref).abs().max() < 2e-2 * ref.abs().max()  # fp16 activations, tf32 dots
