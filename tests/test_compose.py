"""Passes compose: every ordered pair of the six passes either compiles into a graph that runs in
ONNX Runtime at a length the export never saw, or is refused when the plan is made (before the
model is read) with a reason that names both passes. Config-built models (random weights:
plumbing), fast options; the calibrating passes read a file of token ids."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tokopt
from tokopt.backends.onnxruntime import export_onnx, make_session
from tokopt.optimizer.compile import plan_passes
from tokopt.optimizer.errors import CaptureError, UsageError
from tokopt.optimizer.pass_manager import PassManager, plan
from tokopt.optimizer.report import verification_feeds

from .conftest import REFERENCE_LM, feed_for

PASSES = ("canonicalize", "token_prune", "tca", "still", "rsq", "edgeqat")
FAST = {  # options that keep a cell to seconds
    "canonicalize": "",
    "token_prune": "keep=0.5,layers=0",
    "tca": "calib_len=128,windows=8/16,calib_windows=1,eval_windows=1,sinks=2,obs=4",
    "still": "steps=2,lora_steps=2,seq_len=64,chunk=16,train_windows=2,eval_windows=1,batch=1",
    "rsq": "samples=2,seq_len=64,eval_windows=1",
    "edgeqat": "steps=2,batch=1,seq_len=32,eval_windows=1",
}
CAUSAL = {"token_prune": "score=last"}   # a causal model's first token sees only itself
REFUSED = {  # unordered pair -> what the refusal says
    frozenset({"tca", "still"}): "both replace the attention of the same layers",
    frozenset({"rsq", "edgeqat"}): "both quantize the weights",
    frozenset({"token_prune", "edgeqat"}): "edgeqat needs every position's output",
}
REORDERED = {("tca", "token_prune"), ("still", "token_prune"), ("rsq", "token_prune"), ("rsq", "still"),
             ("edgeqat", "still")}
PAIRS = [(a, b) for a in PASSES for b in PASSES if a != b]


def spec(name: str, causal: bool) -> str:
    opts = ",".join(o for o in (FAST[name], CAUSAL.get(name, "") if causal else "") if o)
    return f"{name}:{opts}" if opts else name


@pytest.mark.parametrize("a,b", PAIRS)
def test_the_plan_refuses_or_orders_each_pair_before_the_model_is_read(a, b, tmp_path):
    """Against a model path that does not exist: a pair the planner refuses fails on the plan
    (naming both passes), any other fails only on the missing model; the planner's order puts
    token_prune first and a pass that trains float weights before one that quantizes them."""
    started = time.perf_counter()
    why = REFUSED.get(frozenset({a, b}))
    with pytest.raises(UsageError if why else CaptureError) as err:
        tokopt.compile(tmp_path / "no-such-model", out=tmp_path / "b", passes=f"{a},{b}")
    assert time.perf_counter() - started < 5
    if why:
        assert why in str(err.value) and a in str(err.value) and b in str(err.value)
        return
    the_plan = plan(plan_passes(f"{a},{b}"))
    order = [p.name for p in the_plan.passes]
    assert order[0] == "canonicalize" and set(order) == {"canonicalize", a, b}
    assert bool(the_plan.notes) == ((a, b) in REORDERED)
    if "canonicalize" not in (a, b):
        assert (order.index(b) < order.index(a)) == ((a, b) in REORDERED)


def test_disjoint_layers_let_tca_and_still_share_a_model(tmp_path):
    the_plan = plan(plan_passes("tca:layers=0,still:layers=1"))
    assert [p.name for p in the_plan.passes] == ["canonicalize", "tca", "still"]
    with pytest.raises(UsageError, match="both replace the attention of layers 1"):
        plan(plan_passes("tca:layers=0/1,still:layers=1"))


def test_generate_graphs_refuse_prefill_only_passes_at_plan_time():
    for name in ("token_prune", "still", "edgeqat"):
        with pytest.raises(UsageError, match=f"{name} cannot run on a --generate graph"):
            plan(plan_passes(name), generate=True)
    assert [p.name for p in plan(plan_passes("tca,rsq"), generate=True).passes] == ["canonicalize", "tca", "rsq"]


# -- every composing pair, run -----------------------------------------------------------------

_RUNS: dict = {}   # (family, passes so far) -> program: cells that share a first pass share its run
_RAN: set = set()  # programs already run in ONNX Runtime: a reordered pair is its twin's very program


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(10, 256, 40_000).astype(np.int64))
    return path


def _run_plan(family: str, model_dir, ids_file, a: str, b: str):
    causal = family == "llama"
    passes = plan(plan_passes(f"{spec(a, causal)},{spec(b, causal)}")).passes
    key = (family,)
    if key not in _RUNS:
        captured = tokopt.capture(model_dir(family))
        captured.calib = str(ids_file)
        _RUNS[key] = captured
    program = _RUNS[key]
    for p in passes:
        key += (p.name,)
        if key not in _RUNS:
            _RUNS[key] = PassManager([p]).run(program)
        program = _RUNS[key]
    return program


def _runs_in_onnxruntime(program, family: str, tmp_path: Path) -> None:
    if id(program) in _RAN:
        return
    _RAN.add(id(program))
    path = tmp_path / "model.onnx"
    export_onnx(program, path, fusions=False, check_feeds=verification_feeds(program))  # checks (3, 23) too
    session = make_session(path, ["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in feed_for(family, 2, 31).items()}
    got = dict(zip(program.output_names, session.run(None, feed)))
    ref = program.run({k: torch.from_numpy(v) for k, v in feed.items()})
    main = program.output_names[0]
    assert got[main].shape == tuple(ref[main].shape) and np.isfinite(got[main]).all()


# canonicalize runs first in every plan, so a pair with it is the other pass alone, which that
# pass's own tests compile; these are the pairs of the five rewriting passes the plan accepts.
RUN_PAIRS = [p for p in PAIRS if "canonicalize" not in p and frozenset(p) not in REFUSED]


@pytest.mark.slow
@pytest.mark.parametrize("a,b", RUN_PAIRS)
def test_causal_lm_pair_compiles_and_runs(a, b, model_dir, ids_file, tmp_path):
    program = _run_plan("llama", model_dir, ids_file, a, b)
    names = [h["name"] for h in program.history]
    assert set(names) == {"canonicalize", a, b}
    spellings = {blk.spelling for blk in program.attention}
    if "tca" in names:
        assert "tca_attention" in spellings
    if "still" in names:
        assert "still_attention" in spellings
    if {"rsq", "edgeqat"} & set(names):
        assert program.count("tokopt.matmul_nbits.default") > 0
    _runs_in_onnxruntime(program, "llama", tmp_path)


ENCODER_PASSES = ("token_prune", "tca", "rsq")


@pytest.mark.slow
@pytest.mark.parametrize("a,b", [(a, b) for a in ENCODER_PASSES for b in ENCODER_PASSES if a != b])
def test_encoder_pair_compiles_and_runs(a, b, model_dir, ids_file, tmp_path):
    program = _run_plan("bert", model_dir, ids_file, a, b)
    assert {h["name"] for h in program.history} == {"canonicalize", a, b}
    _runs_in_onnxruntime(program, "bert", tmp_path)


@pytest.mark.slow
def test_tca_then_rsq_on_the_reference_lm(tmp_path):
    """The stack the composition issue opened with (rsq read the attention index tca had left
    stale): calibrated TCA, then RSQ calibrating its importance on TCA's own attention."""
    res = tokopt.compile(REFERENCE_LM, out=tmp_path / "b", passes="tca:calib_windows=1,eval_windows=1,"
                         "rsq:samples=4,seq_len=256,eval_windows=1", measure=False, generate=False)
    stats = {h["name"]: h["stats"] for h in res.program.history}
    assert stats["tca"]["sparse_layers"] and stats["rsq"]["linears"] == 4 * 7
    assert {b.spelling for b in res.program.attention} >= {"tca_attention"}
    # rsq quantized the sparse graph and measured it on held-out text: a few points of perplexity
    assert stats["rsq"]["perplexity_quantized"] < 1.3 * stats["rsq"]["perplexity_fp32"]
    ids = np.random.default_rng(1).integers(10, 4096, (2, 300))
    out = tokopt.load(res.bundle)(input_ids=ids, attention_mask=np.ones_like(ids))
    assert out["logits"].shape == (2, 300, 4096) and np.isfinite(out["logits"]).all()


def test_calibration_caches_know_the_passes_before(model_dir, ids_file):
    """rsq after token_prune calibrates on the pruned activations: the cache entry rsq alone wrote
    for the same weights, data and options is not reused (it was, before the key held the
    passes that shaped the graph)."""
    captured = tokopt.capture(model_dir("llama"))
    captured.calib = str(ids_file)
    rsq = "rsq:samples=3,seq_len=64,eval_windows=1"   # options no other test calibrates with
    alone = PassManager(plan(plan_passes(rsq)).passes).run(captured)
    again = PassManager(plan(plan_passes(rsq)).passes).run(captured)
    pruned = PassManager(plan(plan_passes(f"{spec('token_prune', True)},{rsq}")).passes).run(captured)
    assert again.history[-1]["stats"]["cached"] and not pruned.history[-1]["stats"]["cached"]
    assert alone.history[-1]["stats"]["mean_relative_error"] != pruned.history[-1]["stats"]["mean_relative_error"]
