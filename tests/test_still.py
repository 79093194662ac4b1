"""STILL: the hybrid op (reference and ONNX lowering), the distilled pass, and its refusals."""
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
from tokopt.passes.still import exact_keys
from tokopt.optimizer.ops.still import STILL, still_reference

from .conftest import REFERENCE_LM

H, HKV, D, HIDDEN = 4, 2, 16, 32


def _inputs(b, n, causal, seed=0, pad=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, hh, n, D, generator=g) for hh in (H, HKV, HKV))
    x = torch.randn(b, n, HIDDEN, generator=g)
    mask = torch.ones(b, 1, n, n, dtype=torch.bool)
    if causal:
        mask &= torch.ones(n, n, dtype=torch.bool).tril()
    if pad:
        mask[0, ..., n - pad:] = False  # right padding in the first row
    return q, k, v, x, mask


def _params(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(H * D, HIDDEN, generator=g) / 8, torch.randn(H, D, generator=g),
            torch.randn(H, D, D, generator=g) / 4, torch.randn(H, D, generator=g), torch.randn(H, D, D, generator=g) / 4,
            torch.randn(H, generator=g))


@pytest.mark.parametrize("causal,b,n,chunk", [(True, 2, 37, 8), (True, 1, 1, 8), (True, 2, 64, 16),
                                              (False, 2, 37, 8), (False, 1, 100, 16)])
def test_every_token_salient_is_softmax_attention(causal, b, n, chunk):
    """top_k = chunk routes every token to the exact part: the op is SDPA (the 1e-6 in the shared
    normaliser aside), with GQA, padding and a ragged last chunk."""
    q, k, v, x, mask = _inputs(b, n, causal, pad=n // 4)
    ref = attention_reference(q, k, v, mask, 0.25, False)
    got = still_reference(q, k, v, x, *_params(), mask, 0.25, causal, chunk, chunk, 0, True)
    rows = slice(0, n - n // 4) if n // 4 else slice(None)  # padded queries have no contract
    assert (got - ref)[:, :, rows].abs().max() < 1e-4


def test_routing_follows_the_budget():
    """Fewer salient tokens cost more error (untrained feature maps at their initial values), and
    ``exact_keys`` counts what the op attends to exactly."""
    q, k, v, x, mask = _inputs(1, 128, True, seed=3)
    ref = attention_reference(q, k, v, mask, 0.25, False)
    gate, u, w = torch.full((H * D, HIDDEN), 0.0), torch.randn(H, D), torch.eye(D).repeat(H, 1, 1)

    def err(top_k):
        out = still_reference(q, k, v, x, gate, u, w, u, w, None, mask, 0.25, True, top_k, 16, 0, True)
        return float((out - ref).norm() / ref.norm())
    errs = [err(t) for t in (0, 4, 8, 16)]
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-5
    assert exact_keys(128, 16, 4) < exact_keys(128, 16, 8) < exact_keys(128, 16, 16) == 64.5


@pytest.mark.parametrize("causal,top_k,feature,exact_window", [(True, 2, 0, True), (False, 3, 1, True),
                                                               (True, 0, 3, True), (True, 0, 2, False)])
def test_onnx_lowering_matches_reference(tmp_path, causal, top_k, feature, exact_window):
    """Standard ONNX ops in ONNX Runtime (TopK routing, CumSum state, MatMuls, no Attention op),
    at lengths the export never saw; NP-Map, Hedgehog, elu+1 and the window-only baseline."""
    import onnxruntime as ort
    params = _params()

    class Op(torch.nn.Module):
        def forward(self, q, k, v, x, mask):
            fmap = params[1:] if feature < 2 else (None,) * 4 + params[-1:]
            return STILL.op(q, k, v, x, params[0], *fmap, mask, 0.25, causal, top_k, 8, feature, exact_window)

    auto = {0: Dim.AUTO, 2: Dim.AUTO}
    dyn = (auto, auto, auto, {0: Dim.AUTO, 1: Dim.AUTO}, {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO})
    ep = torch.export.export(Op(), _inputs(2, 19, causal), dynamic_shapes=dyn, strict=False)
    path = tmp_path / "still.onnx"
    torch.onnx.export(ep, dynamo=True, opset_version=OPSET, optimize=False, input_names=list("qkvxm"),
                      custom_translation_table=onnx_translation_table()).save(str(path))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Attention" not in ops and "MatMul" in ops
    assert ("TopK" in ops) == bool(top_k) and ("CumSum" in ops) == (causal and feature != 3)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, n in ((1, 37), (2, 5), (1, 100)):
        t = _inputs(b, n, causal, seed=n, pad=0 if causal else n // 3)
        ref = Op()(*t)
        got = sess.run(None, dict(zip("qkvxm", [a.numpy() for a in t])))[0]
        assert np.abs(got - ref.numpy()).max() < 1e-5


def test_training_windows_are_what_the_text_holds():
    """The shipped passages hold 16 windows of 1024 tokens: the default 16 + 4 trains on the 12
    before the 4 held out (not refused); a text with nothing left to train on is refused by name."""
    from tokopt.passes.still import StillOptions, StillPass
    captured = tokopt.capture(REFERENCE_LM)
    train, held, _ = StillPass(StillOptions())._data(captured, 1024)
    assert (len(train), len(held)) == (12, 4) and all(w.shape == (1, 1024) for w in train + held)
    assert not any(torch.equal(a, b) for a in train for b in held)
    with pytest.raises(UsageError, match="eval_windows=16 held out and at least batch=2"):
        StillPass(StillOptions(eval_windows=16))._data(captured, 1024)


@pytest.mark.slow
def test_exact_routing_leaves_the_model_unchanged(tmp_path, model_dir):
    """Structural and numerical: every attention replaced, and with every token salient the
    compiled bundle's logits equal the original model's (float tolerance)."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir("llama")).eval()
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(10, 256, (8, 64)))
    res = tokopt.compile(model_dir("llama"), out=tmp_path / "b", calib=ids, measure=False,
                         passes="still:feature=none,top_k=16,chunk=16,steps=0,lora_steps=0,seq_len=64,"
                                "train_windows=4,eval_windows=2")
    assert res.program.count(STILL.overload) == 2 and res.program.count("tokopt.attention.default") == 0
    feed = {"input_ids": np.random.default_rng(1).integers(10, 256, (2, 45))}
    feed["attention_mask"] = np.ones_like(feed["input_ids"])
    with torch.no_grad():
        ref = model(torch.from_numpy(feed["input_ids"])).logits.numpy()
    got = tokopt.load(res.bundle)(**feed)["logits"]
    assert np.abs(got - ref).max() < 1e-4
    assert "Attention" not in {n.op_type for n in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.node}


@pytest.mark.slow
def test_bidirectional_encoder(tmp_path, model_dir):
    """An encoder (BERT, padded batch) takes the bidirectional form; stage 1 trains, no LoRA."""
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(10, 256, (8, 64)))
    res = tokopt.compile(model_dir("bert"), out=tmp_path / "b", calib=ids, measure=False,
                         passes="still:layers=0/1,chunk=8,top_k=2,steps=40,seq_len=64,train_windows=4,eval_windows=0")
    stats = res.report["passes"][-1]["stats"]
    assert res.program.count(STILL.overload) == 2 and stats["converted_layers"] == [0, 1]
    assert all(s["loss_last"] < s["loss_first"] for s in stats["stages"]["stage1"].values())
    assert "stage2" not in stats["stages"]
    feed = {"input_ids": np.random.default_rng(2).integers(10, 256, (2, 40)), "attention_mask": np.ones((2, 40), int)}
    feed["attention_mask"][0, 30:] = 0
    assert np.isfinite(tokopt.load(res.bundle)(**feed)["last_hidden_state"]).all()


@pytest.mark.slow
def test_distilled_on_the_reference_lm(tmp_path, monkeypatch):
    """Trained weights, real held-out code, at 512 tokens: the middle two layers become STILL,
    attention transfer cuts each layer's error, LoRA is merged where it pays, perplexity stays
    within 10% of the original with these short CPU settings (the benchmark's full settings:
    README), the per-stage losses ship in still.json, and a second compile reads the cache."""
    monkeypatch.setenv("TOKOPT_CACHE_DIR", str(tmp_path / "cache"))
    spec = "still:steps=60,lora_steps=6,train_windows=4,eval_windows=2,seq_len=512"
    res = tokopt.compile(REFERENCE_LM, out=tmp_path / "b", passes=spec, calib=REFERENCE_LM / "heldout.txt",
                         measure=False)
    stats = res.report["passes"][-1]["stats"]
    assert stats["converted_layers"] == [1, 2] and stats["dense_layers"] == [0, 3] and stats["cached"] is False
    assert res.program.count(STILL.overload) == 2
    assert all(s["loss_last"] < 0.5 * s["loss_first"] for s in stats["stages"]["stage1"].values())
    assert stats["perplexity_still"] < 1.10 * stats["perplexity_original"]
    assert stats["perplexity_still"] == min(stats["perplexity_stage1"], stats["perplexity_stage2"])
    assert stats["exact_keys_per_query"] < 0.45 * stats["dense_keys_per_query"]
    assert 0 <= stats["passkey_still"] <= 1 and stats["passkey_logprob_still"] < 0
    shipped = json.loads((tmp_path / "b" / "still.json").read_text())
    assert set(shipped["stages"]) == {"stage1", "stage2"}
    from tokopt.optimizer.compile import plan_passes
    from tokopt.optimizer.pass_manager import PassManager, resolve
    captured = tokopt.capture(REFERENCE_LM)
    captured.calib = str(REFERENCE_LM / "heldout.txt")
    again = PassManager(resolve(plan_passes(spec.replace("eval_windows=2", "eval_windows=0")))).run(captured)
    assert again.history[-1]["stats"]["cached"] is True
    trained = [n for n in again.ep.state_dict if n.startswith("tokopt_still")]
    assert trained and all(torch.equal(again.ep.state_dict[n], res.program.ep.state_dict[n]) for n in trained)


@pytest.mark.slow
def test_bad_requests(tmp_path, model_dir):
    lm = model_dir("llama")
    for spec, msg in (("still:top_k=-1", r"top_k=-1 must be in \[0, chunk=64\]"),
                      ("still:top_k=65", r"top_k=65 must be in"), ("still:feature=relu", "feature='relu'"),
                      ("still:layers=5", "layer 5 is past the model's depth"),
                      ("still", "still distils its feature maps and gates on data"),
                      ("still:steps=0", "distillation needs data")):
        with pytest.raises(UsageError, match=msg):
            tokopt.compile(lm, out=tmp_path / "a", passes=spec)
    with pytest.raises(UsageError, match="--generate"):
        tokopt.compile(lm, out=tmp_path / "a", passes="still", generate=True)
    with pytest.raises(UsageError, match="still needs recognised attention blocks"):
        tokopt.compile(torch.nn.Sequential(torch.nn.Linear(8, 8)), example_inputs=(torch.randn(2, 8),),
                       out=tmp_path / "a", passes="still")
    assert not (tmp_path / "a").exists()
