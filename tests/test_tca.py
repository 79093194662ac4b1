"""TCA-Attention: the op (reference and ONNX lowering), the calibrated pass, and its refusals."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch.export import Dim

import tokopt
from tokopt.optimizer.errors import UsageError
from tokopt.optimizer.ops import OPSET, attention_reference, onnx_translation_table
from tokopt.optimizer.ops.tca import TCA, TCA_CACHE, tca_reference

from .conftest import REFERENCE_LM, _tiny, onnx_ops


def _qkvm(b, h, hkv, nq, nk, causal, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, s, 16, generator=g) for n, s in ((h, nq), (hkv, nk), (hkv, nk)))
    mask = torch.ones(b, 1, nq, nk, dtype=torch.bool)
    if causal:
        mask &= torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    mask[0, ..., :pad] = False  # left padding in the first row
    return q, k, v, mask


@pytest.mark.parametrize("causal,b,h,hkv,nq,nk,w", [
    (True, 2, 4, 2, 37, 37, 8), (True, 2, 4, 1, 1, 50, 8), (True, 2, 4, 2, 5, 40, 8), (False, 2, 4, 2, 37, 37, 8),
    (False, 1, 2, 2, 3, 3, 8), (True, 1, 2, 1, 100, 100, 45), (False, 1, 2, 1, 100, 100, 45)])
def test_full_budget_is_dense_attention(causal, b, h, hkv, nq, nk, w):
    """Budget 1 keeps every key: equal to SDPA (float32 rounding), with GQA, padding, a decode
    step (one query at the end of the keys), queries past the end of their windows, and windows
    wider than the query blocks of the window part."""
    q, k, v, mask = _qkvm(b, h, hkv, nq, nk, causal, pad=2)
    ref = attention_reference(q, k, v, mask, 0.25, False)
    got = tca_reference(q, k, v, mask, 0.25, causal, [1.0] * hkv, [w] * hkv, 4, 4)
    rows = slice(max(0, 2 - (nk - nq)), None)  # padded queries have no contract
    assert (got - ref)[:, :, rows].abs().max() < 1e-5


def test_small_budgets_keep_fewer_keys_and_cost_error():
    q, k, v, mask = _qkvm(1, 4, 2, 64, 64, True)
    ref = attention_reference(q, k, v, mask, 0.25, False)
    errs = [float((tca_reference(q, k, v, mask, 0.25, True, [f, f], [8, 8], 2, 4) - ref).norm() / ref.norm())
            for f in (0.0, 0.25, 0.5, 1.0)]
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-6


@pytest.mark.parametrize("causal", [True, False])
def test_onnx_lowering_matches_reference(tmp_path, causal):
    """Standard ONNX ops in ONNX Runtime, per-head budgets and windows, at shapes the export
    never saw (longer, shorter, a decode step)."""
    import onnxruntime as ort

    class Op(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return TCA.op(q, k, v, mask, 0.25, causal, [0.3, 0.6], [4, 40], 2, 3)

    ex = _qkvm(2, 4, 2, 9, 9, causal)
    dyn = ({0: Dim.AUTO, 2: Dim.AUTO}, {0: Dim.AUTO, 2: Dim.AUTO}, {0: Dim.AUTO, 2: Dim.AUTO},
           {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO})
    ep = torch.export.export(Op(), ex, dynamic_shapes=dyn, strict=False)
    torch.onnx.export(ep, dynamo=True, opset_version=OPSET, optimize=False, input_names=["q", "k", "v", "mask"],
                      custom_translation_table=onnx_translation_table()).save(str(tmp_path / "tca.onnx"))
    ops = set(onnx_ops(onnx.load(str(tmp_path / "tca.onnx")).graph))
    assert {"If", "TopK", "GatherElements", "Softmax", "MatMul"} <= ops and "Attention" not in ops
    sess = ort.InferenceSession(str(tmp_path / "tca.onnx"), providers=["CPUExecutionProvider"])
    for b, nq, nk in ((1, 37, 37), (3, 1, 20), (2, 5, 23), (1, 90, 90), (2, 20, 20)):   # QUERY_BLOCK = 32
        if not causal and nq != nk:
            continue
        q, k, v, mask = _qkvm(b, 4, 2, nq, nk, causal, pad=2, seed=nq)
        ref = tca_reference(q, k, v, mask, 0.25, causal, [0.3, 0.6], [4, 40], 2, 3)
        got = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "mask": mask.numpy()})[0]
        assert np.abs(got - ref.numpy()).max() < 1e-5


@pytest.mark.slow
def test_uniform_pass_replaces_every_attention(tmp_path, model_dir):
    res = tokopt.compile(model_dir("llama"), out=tmp_path / "b", passes="tca:uniform=0.25,window=4", measure=False,
                         generate=False)
    assert res.program.count(TCA.overload) == 2 and res.program.count("tokopt.attention.default") == 0
    assert res.report["passes"][-1]["stats"]["sparse_layers"] == [0, 1]
    table = json.loads((tmp_path / "b" / "budgets.json").read_text())
    assert [(r["layer"], r["window"], r["budget"]) for r in table["heads"]] == [(0, 4, 0.25)] * 2 + [(1, 4, 0.25)] * 2
    # the ONNX graph holds the selection, not ONNX's dense Attention op
    graph = onnx.load(str(tmp_path / "b" / "model.onnx")).graph
    assert "Attention" not in onnx_ops(graph)
    # per layer an If: up to QUERY_BLOCK queries one selection for all heads, else per KV head
    # two TopK (its selection, and its rows' sinks in order)
    branches = [[onnx_ops(a.g) for a in n.attribute] for n in graph.node if n.op_type == "If"]
    assert [(few.count("TopK"), per_head.count("TopK")) for few, per_head in branches] == [(1, 4)] * 2
    from tokopt.optimizer.compile import plan_passes
    from tokopt.optimizer.pass_manager import PassManager, resolve
    dense = PassManager(resolve(plan_passes("tca:uniform=1"))).run(tokopt.capture(model_dir("llama")))
    assert dense.count(TCA.overload) == 0 and dense.history[-1]["stats"]["dense_layers"] == [0, 1]


@pytest.mark.slow
def test_generation_within_the_window_is_exact(tmp_path):
    """On a --generate graph the decode step runs the op too, on a compacting cache; while every
    key lies in the window, tokens equal transformers' greedy decoding."""
    model = _tiny("llama").eval()
    model.generation_config.eos_token_id = None
    res = tokopt.compile(model, out=tmp_path / "g", generate=True, passes="tca:uniform=0.1,window=48,select=step",
                         measure=False)
    assert res.program.count(TCA_CACHE.overload) == 2 and res.program.count(TCA.overload) == 0
    ids = np.random.default_rng(5).integers(10, 256, (1, 9))
    got = tokopt.load(res.bundle).generate(input_ids=ids, max_new_tokens=30)
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(ids), max_new_tokens=30, do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(got, ref)


@pytest.mark.slow
def test_calibrated_on_the_reference_lm(tmp_path, monkeypatch):
    """Trained weights, real held-out code: calibrated per-head (window, budget) pairs use far
    fewer keys than dense at a perplexity within 2%; the budgets ship in the bundle; a second
    compile reads the calibration from the cache."""
    monkeypatch.setenv("TOKOPT_CACHE_DIR", str(tmp_path / "cache"))
    spec = "tca:calib_len=512,calib_windows=2,eval_windows=2,windows=32/64/128"
    res = tokopt.compile(REFERENCE_LM, out=tmp_path / "b", passes=spec, calib=REFERENCE_LM / "heldout.txt", generate=False,
                         measure=False)
    stats = res.report["passes"][-1]["stats"]
    assert stats["calibration_cached"] is False and stats["mean_keys_per_query"] < 0.5 * 512
    assert stats["perplexity_tca"] < 1.02 * stats["perplexity_dense"]
    assert 0 <= stats["passkey_tca"] <= 1 and stats["passkey_logprob_tca"] < 0
    heads = json.loads((tmp_path / "b" / "budgets.json").read_text())["heads"]
    assert len(heads) == 4 * 2 and all(max(r["query_head_errors"]) <= 0.2 for r in heads if r["budget"] < 1)
    from tokopt.optimizer.compile import plan_passes
    from tokopt.optimizer.pass_manager import PassManager, resolve
    captured = tokopt.capture(REFERENCE_LM)
    captured.calib = str(REFERENCE_LM / "heldout.txt")
    again = PassManager(resolve(plan_passes(spec.replace("eval_windows=2", "eval_windows=0")))).run(captured)
    assert again.history[-1]["stats"]["calibration_cached"] is True
    assert again.artifacts["budgets.json"]["heads"] == heads


@pytest.mark.slow
def test_bad_requests(tmp_path, model_dir):
    with pytest.raises(UsageError, match="uniform=1.5 must be a budget"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "a", passes="tca:uniform=1.5")
    with pytest.raises(UsageError, match="calib_len=200: calibration windows are not longer than sinks"):
        tokopt.compile(REFERENCE_LM, out=tmp_path / "b", passes="tca:calib_len=200", calib=REFERENCE_LM / "heldout.txt")
    ids = tmp_path / "ids.npy"
    np.save(ids, np.full((2, 600), 99999, dtype=np.int64))
    with pytest.raises(UsageError, match="outside the model's vocabulary"):
        tokopt.compile(REFERENCE_LM, out=tmp_path / "c", passes="tca:calib_len=512", calib=ids)
    with pytest.raises(UsageError, match="calibration needs token ids"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "d", passes="tca")
    assert not any((tmp_path / n).exists() for n in "abcd")


@pytest.mark.slow
def test_calibrates_on_a_generation_graph(tmp_path, monkeypatch):
    """Calibration runs on a --generate graph too (prefills into an empty cache); the budgets
    ship and the bundle still decodes."""
    monkeypatch.setenv("TOKOPT_CACHE_DIR", str(tmp_path / "cache"))
    model = _tiny("llama").eval()
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(10, 256, (2, 128)))
    res = tokopt.compile(model, out=tmp_path / "g", generate=True, calib=ids, measure=False,
                         passes="tca:calib_len=128,calib_windows=2,eval_windows=0,windows=8/16,tolerance=0.5")
    assert len(json.loads((tmp_path / "g" / "budgets.json").read_text())["heads"]) == 4
    out = tokopt.load(res.bundle).generate(input_ids=np.arange(10, 19)[None], max_new_tokens=4)
    assert out.shape == (1, 13)
