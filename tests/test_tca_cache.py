"""TCA on --generate graphs: the compacted KV cache (op, ONNX lowering, pass, decode quality)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.export import Dim

import tokopt
from tokopt.optimizer.compile import plan_passes
from tokopt.optimizer.ops import OPSET, onnx_translation_table
from tokopt.optimizer.pass_manager import PassManager, resolve
from tokopt.optimizer.ops.tca import QUERY_BLOCK, TCA_CACHE, compact_size, tca_cache_reference, tca_reference

from .conftest import REFERENCE_LM, _tiny

FS, WS, SINKS, OBS = [0.1, 0.3], [4, 8], 2, 3


def _case(s, c, m, pad=0, seed=0):
    """q for s new tokens, a cache of c entries at sorted positions below m - s, plus the new
    keys; attention_mask [2, m] with ``pad`` left-padded positions in the first row."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, s, 16, generator=g)
    k, v = (torch.randn(2, 2, c + s, 16, generator=g) for _ in range(2))
    index = torch.randperm(m - s, generator=g)[:c].sort().values.expand(2, 2, c).contiguous()
    am = torch.ones(2, m, dtype=torch.long)
    am[0, :pad] = 0
    return q, k, v, index, am


def test_prefill_attends_as_the_op_and_keeps_each_heads_core_tokens():
    """Into an empty cache the attention is tca_attention's; the cache keeps compact_size
    entries per head, in context order: the sinks, the head's window, then its best scores."""
    n = 60
    q, k, v, index, am = _case(n, 0, n, pad=3)
    out, kk, vv, ii = tca_cache_reference(q, k, v, index, am, 0.25, FS, WS, SINKS, OBS)
    mask = (am[:, None, None, :] > 0) & torch.ones(n, n, dtype=torch.bool).tril()
    ref = tca_reference(q, k, v, mask, 0.25, True, FS, WS, SINKS, OBS)
    assert (out - ref)[:, :, 3:].abs().max() < 1e-6        # padded queries have no contract
    keep = compact_size(n, n, FS, WS, SINKS)
    assert keep == SINKS + 8 + math.ceil(0.3 * n) and ii.shape == (2, 2, keep)
    for h, w in enumerate(WS):
        got = set(ii[1, h].tolist())
        assert set(range(SINKS)) | set(range(n - w, n)) <= got and (ii[1, h].diff() > 0).all()
        # the left-padded row pins its first real tokens, and drops its padding
        got = set(ii[0, h].tolist())
        assert set(range(3, 3 + SINKS)) <= got and not got & {0, 1, 2}
    assert torch.equal(kk, k.gather(2, ii[..., None].expand(-1, -1, -1, 16)))
    assert torch.equal(vv, v.gather(2, ii[..., None].expand(-1, -1, -1, 16)))
    # a cache that already fits is kept whole: one decode step appends its token
    q1, k1, v1, idx1, am1 = _case(1, 20, 200)
    _, kk1, _, ii1 = tca_cache_reference(q1, k1, v1, idx1, am1, 0.25, FS, WS, SINKS, OBS)
    assert torch.equal(ii1[..., :-1], idx1) and int(ii1[0, 0, -1]) == 199 and torch.equal(kk1, k1)


def test_onnx_lowering_matches_reference(tmp_path):
    """Standard ONNX in ONNX Runtime: prefill, decode steps on a full and on a compacting cache,
    chunks of new tokens below and above QUERY_BLOCK, padding; attention and the kept cache equal
    the reference. Structural: an If sends up to QUERY_BLOCK queries through one selection for
    all heads, more through one per head."""
    import onnx
    import onnxruntime as ort

    class Op(torch.nn.Module):
        def forward(self, q, k, v, index, am):
            return TCA_CACHE.op(q, k, v, index, am, 0.25, FS, WS, SINKS, OBS)

    ex = _case(5, 7, 12)
    dyn = ({0: Dim.AUTO, 2: Dim.AUTO},) * 4 + ({0: Dim.AUTO, 1: Dim.AUTO},)
    ep = torch.export.export(Op(), ex, dynamic_shapes=dyn, strict=False)
    torch.onnx.export(ep, dynamo=True, opset_version=OPSET, optimize=False, input_names=["q", "k", "v", "index", "am"],
                      custom_translation_table=onnx_translation_table()).save(str(tmp_path / "c.onnx"))
    branch = next(n for n in onnx.load(str(tmp_path / "c.onnx")).graph.node if n.op_type == "If")
    few, per_head = ([n.op_type for n in a.g.node] for a in branch.attribute)
    assert few.count("TopK") == 1 and per_head.count("TopK") == 2 * len(FS) and len(few) < len(per_head) / 3
    sess = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    assert QUERY_BLOCK == 32
    for s, c, m in ((60, 0, 60), (1, 30, 59), (1, 59, 61), (3, 20, 58), (32, 20, 80), (40, 20, 80)):
        args = _case(s, c, m, pad=3, seed=s + c)
        ref = tca_cache_reference(*args, 0.25, FS, WS, SINKS, OBS)
        got = sess.run(None, dict(zip(["q", "k", "v", "index", "am"], (a.numpy() for a in args))))
        assert [g.shape for g in got] == [tuple(r.shape) for r in ref]
        assert np.abs(got[0] - ref[0].numpy()).max() < 1e-5
        assert all(np.array_equal(g, r.numpy()) for g, r in zip(got[1:], ref[1:]))


@pytest.fixture(scope="module")
def tiny_llama():
    model = _tiny("llama").eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.slow
def test_compacted_cache_holds_the_original_keys(tiny_llama):
    """Structural: the graph reads and writes past/present_index_i, and after a prefill of L
    tokens each layer holds sinks + window + ceil(budget x L) entries. Numerical: every kept
    entry is the key and value the same attention without compaction caches at the position
    its index names."""
    captured = tokopt.capture(tiny_llama, generate=True)
    prog = PassManager(resolve(plan_passes("tca:uniform=0.1,window=8,select=step"))).run(captured)
    assert prog.cache.index and "past_index_1" in prog.input_names and "present_index_1" in prog.output_names
    stats = prog.history[-1]["stats"]
    assert stats["kv_cache_bytes"]["1024"]["compacted"] < 0.15 * stats["kv_cache_bytes"]["1024"]["full"]
    from tokopt.optimizer.generation import example_feed
    feed = example_feed(prog.cache, 2, 100, 0, seed=3)
    got = prog.run(feed)
    uncompacted = PassManager(resolve(plan_passes("tca:uniform=0.1,window=8,compact=false"))).run(captured)
    full = uncompacted.run({k: v for k, v in feed.items() if k in captured.input_names})
    keep = 4 + 8 + math.ceil(0.1 * 100)
    for i in range(2):
        idx = got[f"present_index_{i}"]
        assert idx.shape == (2, 2, keep)
        for kv in ("key", "value"):
            want = full[f"present_{kv}_{i}"].gather(2, idx[..., None].expand(-1, -1, -1, 16))
            assert torch.equal(got[f"present_{kv}_{i}"], want)


@pytest.mark.slow
def test_padded_batch_within_the_window_decodes_as_transformers(tmp_path, tiny_llama):
    """Left-padded rows through prefill and decode steps with a compacting cache (the index
    keeps padding masked): greedy tokens equal transformers' while every key fits the window."""
    res = tokopt.compile(tiny_llama, out=tmp_path / "g", generate=True, passes="tca:uniform=0.1,window=48,select=step",
                         measure=False)
    ids = np.random.default_rng(7).integers(10, 256, (2, 12))
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    got = tokopt.load(res.bundle).generate(input_ids=ids, attention_mask=mask, max_new_tokens=20)
    with torch.no_grad():
        ref = tiny_llama.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=20,
                                  do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(got, ref)


@pytest.mark.slow
def test_decode_quality_and_cache_on_the_reference_lm(tmp_path, monkeypatch):
    """Trained weights, held-out code: with calibrated budgets, the compacted cache holds at most
    half the full one, and the perplexity of 128 tokens decoded one step at a time after a
    384-token prompt stays within 2% of dense decoding, with the cache chosen at every step and
    once after the prefill."""
    from transformers import AutoTokenizer

    from tokopt.optimizer.data import calibration_batches
    from tokopt.calibration.lm_eval import decode_perplexity
    monkeypatch.setenv("TOKOPT_CACHE_DIR", str(tmp_path / "cache"))
    captured = tokopt.capture(REFERENCE_LM, generate=True)
    captured.calib = str(REFERENCE_LM / "heldout.txt")
    prog = PassManager(resolve(plan_passes("tca:calib_len=512,calib_windows=2,eval_windows=0,windows=32/64/128,select=step")
                               )).run(captured)
    kv = prog.history[-1]["stats"]["kv_cache_bytes"]
    assert all(v["compacted"] <= 0.5 * v["full"] for v in kv.values())
    tok = AutoTokenizer.from_pretrained(REFERENCE_LM, local_files_only=True)
    windows = [b["input_ids"] for b in calibration_batches(REFERENCE_LM / "heldout.txt", tok, seq_len=512,
                                                           batch_size=1, max_batches=4, progress=False)][2:]

    def stepper(program):
        run = program.runner()
        return lambda feed: {k: v.numpy() for k, v in run({k: torch.as_tensor(np.asarray(v))
                                                           for k, v in feed.items()}).items()}
    dense = decode_perplexity(stepper(captured), captured.cache, windows, 384)
    tca = decode_perplexity(stepper(prog), prog.cache, windows, 384)
    assert tca < 1.02 * dense
    # chosen once after the prefill (the calibration read from the cache): as close to dense
    once = PassManager(resolve(plan_passes("tca:calib_len=512,calib_windows=2,eval_windows=0,windows=32/64/128,"
                                           "select=prefill"))).run(captured)
    assert once.history[-1]["stats"]["calibration_cached"]
    assert decode_perplexity(stepper(once), once.cache, windows, 384) < 1.02 * dense

