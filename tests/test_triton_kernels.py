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
    import tokopt
    from tokopt.optimizer.ops import kernel
    from tokopt.optimizer.ops.tca import tca_reference
    from tests.test_tca import _qkvm
    tca = kernel("tokopt::tca_attention", "triton")
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
    import tokopt
    from tokopt.optimizer.ops import kernel
    from tokopt.optimizer.ops.nbits import MATMUL_NBITS, pack
    nbits = kernel("tokopt::matmul_nbits", "triton")
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


STILL = textwrap.dedent("""
    import torch
    import tokopt
    from tokopt.optimizer.ops import kernel
    from tokopt.optimizer.ops.still import still_reference
    from tests.test_still import _inputs, _params
    still = kernel("tokopt::still_attention", "triton")
    worst = 0.0
    for causal, b, n, chunk, top_k, feature in [(True, 2, 37, 8, 2, 0), (True, 1, 100, 16, 4, 1),
                                                (False, 2, 37, 8, 3, 0), (True, 1, 5, 8, 0, 3), (False, 1, 70, 16, 2, 2)]:
        q, k, v, x, mask = _inputs(b, n, causal, seed=n, pad=0 if causal else n // 4)
        p = _params()
        fm = p[1:] if feature < 2 else (None,) * 4 + p[-1:]
        ref = still_reference(q, k, v, x, p[0], *fm, mask, 0.25, causal, top_k, chunk, feature, True)
        got = still(q, k, v, x, p[0], *fm, mask, 0.25, causal, top_k, chunk, feature, True)
        rows = slice(0, n - n // 4) if not causal else slice(None)  # padded queries have no contract
        worst = max(worst, float((got - ref)[:, :, rows].abs().max()))
    print(worst)
""")


def _interpreted(script: str) -> float:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT.parent)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tca_kernel_matches_reference_interpreted():
    """Causal and bidirectional, GQA, left padding, a decode step, full and partial budgets."""
    assert _interpreted(CHECK) < 1e-5


def test_still_kernel_matches_reference_interpreted():
    """Causal and bidirectional, GQA, padding, ragged last chunk, NP-Map / Hedgehog / elu+1, no
    salient tokens with no linear part (sliding window), salient keys spanning several blocks."""
    assert _interpreted(STILL) < 1e-5


def test_nbits_kernel_matches_reference_interpreted():
    """int4 and int8, with and without bias, K not a multiple of the block (padded), ragged M/N."""
    assert _interpreted(NBITS) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the compiled kernel is checked interpreted")
def test_tca_kernel_on_gpu():
    import tokopt
    from tokopt.optimizer.ops import kernel
    from tokopt.optimizer.ops.tca import tca_reference
    from tests.test_tca import _qkvm
    q, k, v, mask = (t.cuda() for t in _qkvm(1, 8, 2, 2048, 2048, True))
    got = kernel("tokopt::tca_attention", "triton")(q, k, v, mask, 0.25, True, [0.1, 0.2], [64, 128], 4, 16)
    ref = tca_reference(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), 0.25, True, [0.1, 0.2], [64, 128], 4, 16)
    assert (got.cpu() - ref).abs().max() < 2e-3  # tf32 dot products


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the compiled kernel is checked interpreted")
def test_still_kernel_on_gpu():
    import tokopt
    from tokopt.optimizer.ops import kernel
    from tokopt.optimizer.ops.still import still_reference
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 8, 4096, 32, generator=g), torch.randn(1, 2, 4096, 32, generator=g), \
        torch.randn(1, 2, 4096, 32, generator=g)
    x, gw = torch.randn(1, 4096, 256, generator=g), torch.randn(256, 256, generator=g) / 16
    u, w, mix = torch.randn(8, 32, generator=g), torch.eye(32).repeat(8, 1, 1), torch.randn(8, generator=g)
    args = (None, 32 ** -0.5, True, 4, 64, 0, True)
    ref = still_reference(q, k, v, x, gw, u, w, u, w, mix, *args)
    got = kernel("tokopt::still_attention", "triton")(*(t.cuda() for t in (q, k, v, x, gw, u, w, u, w, mix)), *args)
    assert (got.cpu() - ref).abs().max() < 2e-3  # tf32 dot products


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the compiled kernel is checked interpreted")
def test_nbits_kernel_on_gpu():
    import tokopt
    from tokopt.optimizer.ops import kernel
    from tokopt.optimizer.ops.nbits import MATMUL_NBITS, pack
    qw = pack(torch.randint(0, 16, (1024, 2048)), 4, 32)
    sc = torch.rand(1024, 64) * 0.01
    x = torch.randn(64, 2048, dtype=torch.float16)
    ref = MATMUL_NBITS.reference(x.float(), qw, sc, None, 4, 32, 2048, 1024)
    got = kernel("tokopt::matmul_nbits", "triton")(x.cuda(), qw.cuda(), sc.cuda(), None, 4, 32, 2048, 1024)
    assert (got.float().cpu() - ref).abs().max() < 2e-2 * ref.abs().max()  # fp16 activations, tf32 dots
