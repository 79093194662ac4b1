"""TCA choosing the cache once after the prefill (``tca:select=prefill``): the op, its ONNX
lowerings, the pass, the runner's compaction, the bundle on GroupQueryAttention."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch.export import Dim

import tokopt
from tokopt.backends.onnxruntime import decode_step
from tokopt.optimizer.compile import plan_passes
from tokopt.optimizer.errors import UsageError
from tokopt.optimizer.generation import LOGITS_INDEX, generate_ids
from tokopt.optimizer.ops import OPSET, TCA_KEEP, TCA_KEEP_PACKED, onnx_translation_table
from tokopt.optimizer.ops.gqa import rotate
from tokopt.optimizer.ops.tca import compact_size
from tokopt.optimizer.ops.tca_keep import tca_keep_packed_reference, tca_keep_reference
from tokopt.optimizer.pass_manager import PassManager, resolve

from .conftest import _tiny

WS, SINKS, OBS = [4, 8], 2, 3
SIZE_FS, SIZE_WS = [0.1, 0.3, 0.05, 0.5], [4, 8, 16, 4]   # two layers' heads: the size rule is the largest


def _case(s, past, pad=0, right=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 4, s, 16, generator=g), torch.randn(2, 2, past + s, 16, generator=g)
    am = torch.ones(2, past + s, dtype=torch.long)
    if right:
        am[0, past + s - pad:] = 0
    else:
        am[0, :pad] = 0
    return q, k, am


def _export(module, example, dynamic, names, path):
    ep = torch.export.export(module, example, dynamic_shapes=dynamic, strict=False)
    torch.onnx.export(ep, dynamo=True, opset_version=OPSET, optimize=False, input_names=names,
                      custom_translation_table=onnx_translation_table()).save(str(path))
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _keep(*args):
    return tca_keep_reference(*args, 0.25, WS, SINKS, OBS, SIZE_FS, SIZE_WS)


def test_keep_is_each_heads_sinks_window_and_best_keys():
    """A prefill keeps compact_size entries (the largest head's size rule of every layer) per
    head, in context order: the row's first valid keys, its last window, then the best scores;
    padding only where a row has fewer valid keys than that, and the same count in every head.
    A call after a cache keeps nothing."""
    n = 60
    keep = compact_size(n, n, SIZE_FS, SIZE_WS, SINKS)
    assert keep == SINKS + 4 + 30 > SINKS + 8 + 18   # the other layer's head sets the size
    for right in (False, True):
        q, k, am = _case(n, 0, pad=3, right=right)
        sel = _keep(q, k, am)
        assert sel.shape == (2, 2, keep) and (sel.diff(dim=-1) > 0).all()
        valid = [torch.nonzero(am[b]).flatten().tolist() for b in range(2)]
        for b in range(2):
            for h, w in enumerate(WS):
                got = set(sel[b, h].tolist())
                assert set(valid[b][:SINKS]) | set(valid[b][-w:]) <= got and got <= set(valid[b])
    q, k, am = _case(24, 0, pad=14, right=True)           # 10 valid keys < keep (20): all of them, padding after
    sel = _keep(q, k, am)
    assert sel.shape == (2, 2, 20) and (am[0][sel[0]].sum(-1) == 10).all() and (am[0][sel[0, :, :10]] == 1).all()
    assert _keep(*_case(1, 40)).shape == (2, 2, 0)
    assert _keep(*_case(5, 40)).shape == (2, 2, 0)   # several tokens after a cache (drafts): no prefill


def test_onnx_lowerings_match_the_references(tmp_path):
    """Standard ONNX in ONNX Runtime, both forms: the op on the model's rotated q and keys, and
    the packed form that reads the projection, rotates its observation queries at position_ids
    and slices the kernel's cache buffer. Prefill (left and right padding) and a decode step.
    Structural: each is one If, the packed form's decode branch a single Identity of an empty
    tensor made outside it (from position_ids alone, so the layers share it)."""
    class Keep(torch.nn.Module):
        def forward(self, q, k, am):
            return TCA_KEEP.op(q, k, am, 0.25, WS, SINKS, OBS, SIZE_FS, SIZE_WS)

    sess = _export(Keep(), _case(5, 0), ({0: Dim.AUTO, 2: Dim.AUTO}, {0: Dim.AUTO, 2: Dim.AUTO},
                                         {0: Dim.AUTO, 1: Dim.AUTO}), ["q", "k", "am"], tmp_path / "k.onnx")
    for s, past, pad, right in ((60, 0, 3, False), (60, 0, 7, True), (1, 40, 0, False), (200, 0, 50, True),
                                (5, 40, 0, False)):
        args = _case(s, past, pad, right, seed=s)
        got = sess.run(None, dict(zip(["q", "k", "am"], (a.numpy() for a in args))))[0]
        np.testing.assert_array_equal(got, _keep(*args).numpy())

    cos = torch.randn(128, 4)
    sin = torch.randn(128, 4)

    class Packed(torch.nn.Module):
        def forward(self, qkv, present_k, am, pos):
            return TCA_KEEP_PACKED.op(qkv, present_k, am, pos, cos, sin, 4, 2, 0.25, WS, SINKS, OBS,
                                      SIZE_FS, SIZE_WS)

    def packed_case(s, cap, pad, past=0):
        g = torch.Generator().manual_seed(s)
        qkv, present = torch.randn(2, s, 8 * 16, generator=g), torch.randn(2, 2, cap, 16, generator=g)
        am = torch.ones(2, past + s, dtype=torch.long)
        if pad:
            am[0, s - pad:] = 0
        return qkv, present, am, (torch.arange(s) + 3).expand(2, s).contiguous()

    sess = _export(Packed(), packed_case(6, 9, 0), ({0: Dim.AUTO, 1: Dim.AUTO}, {0: Dim.AUTO, 2: Dim.AUTO},
                                                    {0: Dim.AUTO, 1: Dim.AUTO}, {0: Dim.AUTO, 1: Dim.AUTO}),
                   ["qkv", "k", "am", "pos"], tmp_path / "p.onnx")
    for s, cap, pad, past in ((70, 90, 5, 0), (1, 90, 0, 40), (4, 90, 0, 40)):
        qkv, present, am, pos = packed_case(s, cap, pad, past)
        want = tca_keep_packed_reference(qkv, present, am, pos, cos, sin, 4, 2, 0.25, WS, SINKS, OBS,
                                         SIZE_FS, SIZE_WS)
        got = sess.run(None, {"qkv": qkv.numpy(), "k": present.numpy(), "am": am.numpy(), "pos": pos.numpy()})[0]
        np.testing.assert_array_equal(got, want.numpy())
        assert got.shape[-1] == (0 if past else compact_size(s, s, SIZE_FS, SIZE_WS, SINKS))
        if not past:   # the packed form is the op on the rotated q and the buffer's first T entries
            q = rotate(qkv[..., :64].reshape(2, s, 4, 16).transpose(1, 2), cos[pos], sin[pos])
            np.testing.assert_array_equal(want.numpy(), _keep(q, present[:, :, :s], am).numpy())
    for node in onnx.load(str(tmp_path / "p.onnx")).graph.node:
        if node.op_type == "If":
            branches = {a.name: [n.op_type for n in a.g.node] for a in node.attribute}
            assert branches["else_branch"] == ["Identity"] and "TopK" in branches["then_branch"]


def test_select_is_checked():
    with pytest.raises(UsageError, match="select='once' must be"):
        resolve(plan_passes("tca:uniform=0.1,select=once"))


@pytest.fixture(scope="module")
def tiny_llama():
    model = _tiny("llama").eval()
    model.generation_config.eos_token_id = None
    return model


def test_bundle_decodes_on_the_kernel_as_the_program(tmp_path, tiny_llama):
    """Structural: the pass adds keep_i outputs and leaves the attention dense; the bundle runs
    every layer on GroupQueryAttention, rotating at position_ids, with the cache in bound
    buffers. Numerical: greedy tokens and logits of the bundle (right-padded rows, the cache
    compacted in its buffers) equal the program's run through the feed loop (left-padded, the
    cache compacted between calls), for a batch with a padded row; after the prefill the runner
    holds the kept entries only."""
    captured = tokopt.capture(tiny_llama, generate=True)
    spec = "tca:uniform=0.1,window=8,select=prefill"
    prog = PassManager(resolve(plan_passes(spec))).run(captured)
    assert prog.cache.keeps and prog.output_names[-2:] == ["keep_0", "keep_1"]
    assert {b.spelling for b in prog.attention} == {"canonical"}
    res = tokopt.compile(tiny_llama, out=tmp_path / "b", generate=True, passes=spec, measure=False)
    manifest = json.loads((res.bundle / "manifest.json").read_text())
    assert manifest["generation"]["shared_buffer"] and manifest["generation"]["cache"]["keeps"]
    model = onnx.load(str(res.bundle / "model.onnx"))
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.input[9] == "position_ids" for n in gqa)
    assert not [n for n in model.graph.node if n.op_type == "TopK"]   # the selection sits in the If only
    # the kernel's lengths are inputs; the prefill's selection reads the mask itself, so the graph keeps it
    inputs = [i.name for i in model.graph.input]
    assert {"seqlens_k", "total_sequence_length", "attention_mask"} <= set(inputs)
    assert manifest["lowering"]["lengths_inputs"] == 2 and "ReduceSum" not in {n.op_type for n in model.graph.node}

    ids = np.random.default_rng(3).integers(10, 256, (2, 90))
    mask = np.ones_like(ids)
    mask[0, :13] = 0
    run = prog.runner()

    def step(feed):
        return {k: v.numpy() for k, v in run({k: torch.as_tensor(np.asarray(v)) for k, v in feed.items()}).items()}
    want_logits, got_logits = [], []
    want = generate_ids(step, prog.cache, ids, mask, max_new_tokens=12, on_logits=want_logits.append)
    bundle = _Opened(tokopt.load(res.bundle))
    got = generate_ids(bundle, bundle.runner.cache_spec(), ids, mask, max_new_tokens=12,
                       on_logits=got_logits.append)
    np.testing.assert_array_equal(got, want)
    assert max(float(np.abs(a - b).max()) for a, b in zip(want_logits, got_logits)) < 1e-4
    assert bundle.opened.compaction.shrink == 90 - (4 + 8 + 9)   # sinks + window + ceil(0.1 x 90) kept
    # a row shorter than what is kept (10 tokens, 16 kept entries): all of it stays, padding beside it
    short = ids[:, :40].copy()
    mask = np.ones_like(short)
    mask[0, :30] = 0
    want = generate_ids(step, prog.cache, short, mask, max_new_tokens=12)
    np.testing.assert_array_equal(generate_ids(bundle, bundle.runner.cache_spec(), short, mask, max_new_tokens=12),
                                  want)
    assert bundle.opened.compaction.shrink == 40 - 16 and list(bundle.opened.compaction.dropped) == [0, 24]
    # prompt lookup: a step several tokens wide after the compacted prefill selects nothing again,
    # and a rejected draft's entries are cut off (feed loop) or overwritten (bound buffers)
    row = np.tile(ids[1, :30], 3)[None]
    plain = generate_ids(step, prog.cache, row, max_new_tokens=24)
    np.testing.assert_array_equal(generate_ids(step, prog.cache, row, max_new_tokens=24, prompt_lookup=6), plain)
    np.testing.assert_array_equal(generate_ids(bundle, bundle.runner.cache_spec(), row, max_new_tokens=24,
                                               prompt_lookup=6), plain)
    assert bundle.opened.compaction.shrink > 0
    # one greedy row steps in the decoding's own loop (BoundDecoding.greedy) on the compacted cache
    np.testing.assert_array_equal(generate_ids(bundle, bundle.runner.cache_spec(), row, max_new_tokens=24), plain)
    shrink = bundle.opened.compaction.shrink
    assert shrink > 0 and bundle.opened.wide_len == 90 - shrink + 23
    # the report times a decode step after a prefill of its context, on the entries that prefill keeps
    session = bundle.runner.session
    feed = {"input_ids": np.array([[7]]), "attention_mask": np.ones((1, 91), dtype=np.int64),
            "position_ids": np.array([[90]]), LOGITS_INDEX: np.array([0])}
    timed, call = decode_step(session, manifest, {i.name for i in session.get_inputs()}, feed)
    assert call().shape == (1,) and timed.compaction.shrink == 90 - (4 + 8 + 9)


class _Opened:
    """A runner whose decoding the test keeps, to look at its cache after generation."""

    def __init__(self, runner):
        self.runner, self.opened = runner, None

    def decoding(self, batch, capacity, drafts=False):
        self.opened = self.runner.decoding(batch, capacity, drafts)
        return self.opened
