"""token_prune: exact at keep=1, token counts as scheduled at several lengths, restore keeps
shapes, padding never outranks real tokens, the scoring op and its ONNX lowering agree, bad
options are refused by name, and the bundle runs in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

import tokopt
from tokopt.optimizer.compile import plan_passes
from tokopt.optimizer.errors import UsageError
from tokopt.optimizer.pass_manager import PassManager, resolve
from tokopt.backends.onnxruntime import for_onnx
from tokopt.optimizer.ops import TOKEN_SCORES, onnx_translation_table
from tokopt.passes.token_prune import TokenPruneOptions, _keep_indices, kept_length, merged_length

from .conftest import feed_for


def _run(prog, spec):
    return PassManager(resolve(plan_passes(spec)), verify=True).run(prog)


@pytest.fixture(scope="module")
def bert(model_dir):
    return PassManager(resolve(plan_passes())).run(tokopt.capture(model_dir("bert")))


@pytest.fixture(scope="module")
def llama(model_dir):
    return PassManager(resolve(plan_passes())).run(tokopt.capture(model_dir("llama")))


def test_keep_one_is_identity(bert):
    out = _run(bert, "token_prune:keep=1.0")
    assert out.history[-1]["modified"] is False
    feed = feed_for("bert", 2, 21)
    assert torch.equal(out.run(feed)["last_hidden_state"], bert.run(feed)["last_hidden_state"])


@pytest.fixture(scope="module")
def scheduled(bert, llama, minilm_dir):
    # MiniLM's second cut gathers the [B, 1, K, K] mask the first cut made (its length must read
    # as K, not an expression of it, or the second cut is refused)
    minilm = PassManager(resolve(plan_passes())).run(tokopt.capture(minilm_dir))
    return (_run(bert, "token_prune:keep=0.5,layers=0"), _run(llama, "token_prune:schedule=0.7@0/0.5@1"),
            _run(minilm, "token_prune:schedule=0.7@0/0.5@1,score=head_weighted"))


def test_the_default_score_follows_causality(scheduled):
    """score=auto (the default): the first token's row in an encoder, the last one's in a causal LM
    (whose first token attends only to itself), as the stats and the graph's score nodes say."""
    one, two, _ = scheduled
    for program, score in ((one, "cls"), (two, "last")):
        assert program.history[-1]["stats"]["score"] == score
        assert {n.args[5] for n in program.graph.nodes if TOKEN_SCORES.matches(n)} == {score}


@pytest.mark.parametrize("n", [9, 16, 33, 70])
def test_token_counts_follow_schedule(scheduled, n):
    one, two, encoder_two = scheduled
    ids = torch.randint(10, 256, (3, n))
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert one.run(feed)["last_hidden_state"].shape[1] == kept_length(n, 0.5)
    assert two.run(feed)["logits"].shape[1] == kept_length(kept_length(n, 0.7), 0.5)
    feed["token_type_ids"] = torch.zeros_like(ids)
    assert encoder_two.run(feed)["last_hidden_state"].shape[1] == kept_length(kept_length(n, 0.7), 0.5)
    assert one.history[-1]["stats"]["token_layer_fraction"] == pytest.approx(0.75)


def test_aligned_counts_round_up_to_the_tile(bert, tmp_path, model_dir):
    """align=8: tokens are dropped in multiples of 8 (N - ceil(keep * N) rounded down; fewer than 8
    to drop: one dropped), so a length of whole tiles keeps whole tiles, at lengths the export
    never saw; the same in ONNX Runtime. align=0 and align with merge refused."""
    out = _run(bert, "token_prune:keep=0.5,layers=0,align=8")
    for n, want in ((9, 8), (21, 13), (32, 16), (40, 24), (48, 24), (5, 4)):
        ids = torch.randint(10, 256, (2, n))
        got = out.run({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["last_hidden_state"].shape[1]
        assert got == want == kept_length(n, 0.5, 8), n
    res = tokopt.compile(model_dir("bert"), out=tmp_path / "b", passes="token_prune:keep=0.5,layers=0,align=8",
                         measure=False)
    feed = feed_for("bert", 2, 21)
    assert tokopt.load(res.bundle)(**{k: v.numpy() for k, v in feed.items()})["last_hidden_state"].shape == (2, 13, 64)
    # the kept count is computed, yet each view to and from heads (before and after the cut) has a
    # constant shape: -1 for the kept count, 0 for sizes copied from its input (static_reshapes)
    graph = onnx.load(res.bundle / "model.onnx", load_external_data=False).graph
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    outputs = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    heads = [n for n in graph.node if n.op_type == "Reshape" and any((outputs.get(v) or [None])[-1] == 16 for v in
                                                                    (n.input[0], n.output[0]))]
    pruned = [n for n in heads if any("Max" in str(d) for d in outputs[n.output[0]])]
    assert len(heads) == 10 and len(pruned) == 5 and all(n.input[1] in consts for n in heads)
    for bad in ({"align": 0}, {"keep": 0.7, "mode": "merge", "align": 16}):
        with pytest.raises(ValueError, match="align"):
            TokenPruneOptions(**bad)


def test_head_weighted_and_diverse_scores_prune(bert, llama):
    """AS-ViT's head-weighted CLS row (encoders) and the diverse score (causal: from the last row)
    through the pass: counts as scheduled, and they keep different tokens than cls / last."""
    feed = feed_for("bert", 2, 30)
    counts = {}
    for score in ("cls", "head_weighted", "diverse"):
        out = _run(bert, f"token_prune:keep=0.5,layers=0,score={score}").run(feed)["last_hidden_state"]
        counts[score] = out
        assert out.shape == (2, kept_length(30, 0.5), 64)
    assert not torch.allclose(counts["cls"], counts["diverse"])
    ids = torch.randint(10, 256, (2, 25))
    lm = _run(llama, "token_prune:keep=0.5,layers=0,score=diverse")
    assert lm.run({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["logits"].shape[1] == kept_length(25, 0.5)


def test_recovery_on_a_causal_lm(tmp_path, llama):
    """recover= tunes only 1-D parameters towards the unpruned model: the loss falls, the
    weight matrices are untouched, and without data it is refused."""
    prog = llama.copy()
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(10, 256, (1, 256)))  # one window: a clean trend
    prog.calib = str(tmp_path / "ids.npy")
    out = _run(prog, "token_prune:keep=0.5,layers=0,score=last,recover=12,recover_lr=0.01")
    rec = out.history[-1]["stats"]["recovery"]
    assert rec["loss_last"] < rec["loss_first"] and rec["parameters"] == 5 * 64  # 5 RMSNorm weights
    before = {**llama.ep.constants, **llama.ep.state_dict}   # a re-export makes non-persistent buffers state
    moved = [n for n, t in out.ep.state_dict.items() if not torch.equal(t, before[n])]
    assert moved and all(out.ep.state_dict[n].dim() == 1 for n in moved)
    with pytest.raises(UsageError, match="recover= trains on data"):
        _run(llama, "token_prune:keep=0.5,layers=0,score=last,recover=2")


def test_recovery_trains_through_the_fused_tokens_scores(tmp_path, bert):
    """mode=fuse weights the dropped tokens by their scores: recover= back-propagates through
    token_scores (its reference's gradient, checked against finite differences)."""
    prog = bert.copy()
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(10, 256, (1, 256)))
    prog.calib = str(tmp_path / "ids.npy")
    out = _run(prog, "token_prune:keep=0.5,layers=0,mode=fuse,score=head_weighted,recover=4,recover_lr=0.01")
    assert out.history[-1]["stats"]["recovery"]["steps"] == 4
    q, k, o = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, o: TOKEN_SCORES.op(q, k, None, 0.5, False, "head_weighted", o),
                                    (q, k, o))


def test_fuse_appends_one_token_and_respects_padding(bert):
    fused = _run(bert, "token_prune:keep=0.5,layers=0,mode=fuse")
    drop = _run(bert, "token_prune:keep=0.5,layers=0")
    feed = feed_for("bert", 2, 24)  # row 0 has 8 padded positions
    a, b = drop.run(feed)["last_hidden_state"], fused.run(feed)["last_hidden_state"]
    assert b.shape == (2, kept_length(24, 0.5) + 1, 64)
    assert torch.isfinite(b).all()
    assert not torch.allclose(a, b[:, :-1], atol=1e-4)  # later layers attend to the fused token
    restored = _run(bert, "token_prune:keep=0.5,layers=0,mode=fuse,restore=true")
    assert restored.run(feed)["last_hidden_state"].shape == (2, 24, 64)


@pytest.fixture(scope="module")
def merging(bert):
    return (_run(bert, "token_prune:keep=0.7,layers=0,mode=merge"),
            _run(bert, "token_prune:keep=0.7,layers=0,mode=merge,restore=true"))


@pytest.mark.parametrize("n", [12, 17, 40])
def test_merge_lengths_restore_and_padding(merging, n):
    merged, restored = merging
    feed = feed_for("bert", 2, n)
    out = merged.run(feed)["last_hidden_state"]
    assert out.shape == (2, merged_length(n, 0.7), 64) and torch.isfinite(out).all()
    full = restored.run(feed)["last_hidden_state"]
    assert full.shape == (2, n, 64)
    # every original position carries one of the merged tokens' outputs
    rows = {tuple(v.tolist()) for v in out[1].round(decimals=4)}
    assert all(tuple(v.tolist()) in rows for v in full[1].round(decimals=4))


@pytest.mark.slow
def test_merge_carries_sizes_across_layers(bert):
    """A second merge reads each key's size from the first merge's mask (log size) and averages
    by size: token 2 (size 3) merging into token 3 (size 2) gives (3 x2 + 2 x3) / 5, size 5."""
    from tokopt.passes.token_prune import _merge
    x = torch.arange(4, dtype=torch.float32)[None, :, None].repeat(1, 1, 2)      # token i holds i
    k = torch.tensor([[1.0, 0], [0, 1], [1, 1], [1, 1.1]])[None, None]          # token 2 closest to 3
    sizes = torch.tensor([1.0, 1, 3, 2])
    mask = sizes.log()[None, None, None, :].expand(1, 1, 4, 4)
    merged, new_mask, mapping = _merge(x, k, mask, 3, 4)                          # keep 3 of 4
    assert mapping[0, 2] == mapping[0, 3]
    assert merged[0, mapping[0, 3], 0] == pytest.approx((3 * 2 + 2 * 3) / 5)
    assert new_mask[0, 0, 0, mapping[0, 3]].exp() == pytest.approx(5.0)
    assert new_mask[0, 0, 0, mapping[0, 1]].exp() == pytest.approx(1.0)
    two = _run(bert, "token_prune:schedule=0.7@0/0.7@1,mode=merge")
    feed = feed_for("bert", 2, 30)
    out = two.run(feed)["last_hidden_state"]
    one = merged_length(30, 0.7)
    assert out.shape == (2, merged_length(one, 0.7), 64) and torch.isfinite(out).all()


def test_restore_keeps_shape_and_cls(bert):
    pruned = _run(bert, "token_prune:keep=0.5,layers=0")
    restored = _run(bert, "token_prune:keep=0.5,layers=0,restore=true")
    feed = feed_for("bert", 2, 24)
    a, b = pruned.run(feed), restored.run(feed)
    assert b["last_hidden_state"].shape == (2, 24, 64)
    assert torch.allclose(a["last_hidden_state"][:, 0], b["last_hidden_state"][:, 0], atol=1e-6)
    assert torch.allclose(a["pooler_output"], b["pooler_output"], atol=1e-6)


def test_padding_never_outranks_real_tokens():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.8, 0.7]])
    mask = torch.tensor([True, True, True, False, False, False]).view(1, 1, 1, 6)
    idx = _keep_indices(scores, mask, 1, 2, keep_last=False)
    assert idx.tolist() == [[0, 1, 2]]
    assert _keep_indices(scores, None, 1, 2, keep_last=True).tolist() == [[0, 3, 5]]


SCORES = ("cls", "last", "mean", "debiased", "head_weighted@cls", "diverse@last")


def _score_oracle(score, q, k, o, mask, causal, kv):
    """The full attention map, rows chosen afterwards."""
    kk = k.repeat_interleave(4 // kv, 1)
    logits = q @ kk.transpose(-2, -1) * 0.3
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    if causal:
        logits = logits.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    probs = logits.softmax(-1)
    if score == "debiased":  # from the full map: per KV-head group, over the rows that see a key
        seen = (logits > -1e30) & (torch.arange(10) > 0)
        rest = probs * (torch.arange(10) > 0)
        rel = rest / rest.sum(-1, keepdim=True).clamp_min(1e-30) * seen.sum(-1, keepdim=True)
        return (rel.reshape(2, kv, -1, 10).sum(2) / seen.reshape(2, kv, -1, 10).sum(2).clamp_min(1)).mean(1)
    if score == "head_weighted@cls":  # AS-ViT: the CLS row, each head weighted per token by its output norm
        w = o.norm(dim=-1)
        return (probs[:, :, 0] * w / w.sum(1, keepdim=True)).sum(1)
    if score == "diverse@last":  # importance minus 0.5 x cosine to the closest token ranked above
        imp = probs[:, :, -1].mean(1)
        unit = torch.nn.functional.normalize(kk.mean(1), dim=-1)
        red = torch.tensor([[max([0.0] + [float(unit[b, j] @ unit[b, i]) for i in range(10) if imp[b, i] > imp[b, j]])
                             for j in range(10)] for b in range(2)])
        return imp / imp.max(-1, keepdim=True).values - 0.5 * red
    rows = {"cls": probs[:, :, :1], "last": probs[:, :, -1:], "mean": probs}[score]
    return rows.mean(dim=(1, 2))


@pytest.mark.parametrize("kv,mask_kind", [(4, "bool"), (2, "float"), (1, "none"), (2, "causal")])
def test_score_op_reference_and_onnx(tmp_path, kv, mask_kind):
    """Every score against an oracle over the full attention map (1e-5), then all of them in one
    exported graph in ONNX Runtime at shapes the export never saw, against the reference: the
    op's hand lowering (nothing is decomposed before export)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 10, 8, generator=g), torch.randn(2, kv, 10, 8, generator=g)
    o = torch.randn(2, 4, 10, 8, generator=g)   # per-head outputs: head_weighted reads them
    mask = {"bool": torch.rand(2, 1, 10, 10, generator=g) > 0.2, "float": torch.randn(2, 1, 10, 10, generator=g),
            "none": None, "causal": None}[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True
    causal = mask_kind == "causal"

    def scores(q, k, m, o):
        return tuple(TOKEN_SCORES.op(q, k, m, 0.3, causal, s, *((o,) if s.startswith("head_weighted") else ()))
                     for s in SCORES)
    for score, got in zip(SCORES, scores(q, k, mask, o)):
        assert torch.allclose(got, _score_oracle(score, q, k, o, mask, causal, kv), atol=1e-5), score

    class M(torch.nn.Module):
        def forward(self, q, k, m, o):
            return scores(q, k, m, o)

    class NoMask(torch.nn.Module):
        def forward(self, q, k, o):
            return scores(q, k, None, o)

    seq = {0: Dim.AUTO, 2: Dim.AUTO}
    args, shapes = ((q, k, mask, o), (seq, seq, {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}, seq)) if mask is not None \
        else ((q, k, o), (seq, seq, seq))
    exported = torch.export.export(M() if mask is not None else NoMask(), args, dynamic_shapes=shapes)
    ep = for_onnx(exported)
    assert ep is exported
    torch.onnx.export(ep, dynamo=True, opset_version=23, optimize=False,
                      custom_translation_table=onnx_translation_table()).save(str(tmp_path / "s.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    q2, k2, o2 = (torch.randn(3, h, 13, 8, generator=g) for h in (4, kv, 4))
    m2 = None if mask is None else (torch.ones(3, 1, 13, 13, dtype=torch.bool) if mask.dtype == torch.bool
                                     else torch.randn(3, 1, 13, 13, generator=g))
    feeds = [q2, k2] + ([m2] if m2 is not None else []) + [o2]
    outs = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), feeds)})
    assert len(outs) == len(SCORES)
    for score, out, want in zip(SCORES, outs, scores(q2, k2, m2, o2)):
        np.testing.assert_allclose(out, want.numpy(), atol=1e-5, err_msg=score)


def test_debiased_score_removes_the_causal_position_trend():
    """Uniform causal attention: 'mean' favours early tokens (more rows see them, with fewer
    keys each); 'debiased' scores every non-sink token alike."""
    q, k = torch.zeros(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    mean = TOKEN_SCORES.op(q, k, None, 0.3, True, "mean")[0]
    debiased = TOKEN_SCORES.op(q, k, None, 0.3, True, "debiased")[0]
    assert (mean[1:-1] > mean[2:]).all()
    assert torch.allclose(debiased[1:], torch.ones(11), atol=1e-5) and debiased[0] == 0


@pytest.mark.parametrize("spec,message", [
    ("token_prune:keep=1.5", "keep=1.5 must be in (0, 1]"),
    ("token_prune:layers=7", "layer 7 is past the model's depth"),
    ("token_prune:mode=merge,keep=0.5", "mode=merge needs keep > 0.5"),
    ("token_prune:mode=squash", "mode='squash' is unknown"),
    ("token_prune:score=salience", "score='salience' is unknown"),
    ("token_prune:schedule=0.5@1/0.7@0", "must be distinct and increasing"),
])
def test_bad_options(bert, spec, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _run(bert, spec)


@pytest.mark.parametrize("spec,message", [
    ("token_prune:score=cls", "score=cls needs a bidirectional model"),
    ("token_prune:score=last,restore=true", "restore=true is for encoders"),
    ("token_prune:score=last,mode=fuse", "mode=fuse is for encoders"),
    ("token_prune:score=last,mode=merge,keep=0.7", "mode=merge is for encoders"),
])
def test_causal_refusals(llama, spec, message):
    with pytest.raises(UsageError, match=message):
        _run(llama, spec)


def test_layers_sharing_one_module_are_refused_by_name():
    """ALBERT runs one layer's module for every layer: a cut after layer 1 is refused, saying so."""
    import transformers as tf
    from tokopt.optimizer.errors import PassError
    torch.manual_seed(0)
    model = tf.AlbertModel(tf.AlbertConfig(embedding_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, vocab_size=256)).eval()
    program = tokopt.capture(model, {"input_ids": torch.randint(3, 256, (2, 16))})
    with pytest.raises(PassError, match="runs one layer's module 2 times"):
        _run(program, "token_prune:keep=0.7,layers=1")


@pytest.mark.parametrize("mode,keep,length", [
    ("fuse", 0.5, lambda n: kept_length(n, 0.5) + 1),
    ("merge", 0.7, lambda n: merged_length(n, 0.7)),
])
@pytest.mark.slow
def test_encoder_modes_run_in_onnxruntime(tmp_path, model_dir, mode, keep, length):
    res = tokopt.compile(model_dir("bert"), out=tmp_path / "b", measure=False,
                         passes=f"token_prune:keep={keep},layers=0,mode={mode}")
    feed = feed_for("bert", 3, 27)
    got = tokopt.load(res.bundle)(**{k: v.numpy() for k, v in feed.items()})["last_hidden_state"]
    assert got.shape == (3, length(27), 64)
    assert np.abs(got - res.program.run(feed)["last_hidden_state"].numpy()).max() < 1e-4


@pytest.mark.slow
def test_pruned_bundle_runs_in_onnxruntime(tmp_path, model_dir):
    res = tokopt.compile(model_dir("llama"), out=tmp_path / "b", passes="token_prune:keep=0.5,layers=0,score=last",
                         measure=False)
    feed = feed_for("llama", 3, 31)
    got = tokopt.load(res.bundle)(**{k: v.numpy() for k, v in feed.items()})["logits"]
    want = res.program.run(feed)["logits"].numpy()
    assert got.shape == (3, kept_length(31, 0.5), 256)
    assert np.abs(got - want).max() < 1e-4
    assert not any(r.reason for r in res.program.rejected), res.program.rejected
    # kept tokens are picked by row GatherNDs over a flattened batch, not GatherElements over an
    # index as large as the hidden states (OpenVINO runs the latter on a reference kernel)
    ops = [n.op_type for n in onnx.load(str(res.bundle / "model.onnx"), load_external_data=False).graph.node]
    assert "GatherElements" not in ops and "GatherND" in ops and "TopK" in ops


@pytest.mark.slow
def test_quality_on_minilm_real_text(tmp_path, minilm_dir):
    """Trained weights, the shipped passages: what pruning half the tokens after layer 1 costs."""
    res = tokopt.compile(minilm_dir, out=tmp_path / "b", passes="token_prune:keep=0.5,layers=1,score=cls",
                         bench_runs=0, bench_len=128, threads=1)   # quality only
    q = res.report["quality"]
    assert q["tokens_kept"] == pytest.approx(0.5, abs=0.02)
    assert 0.85 < q["embedding_cosine"] < 0.999  # measured 0.92: a real, visible cost



@pytest.mark.slow
def test_restore_through_two_cuts(bert, model_dir):
    """Every position gets back the representation it had just before the cut that dropped it:
    kept through both cuts, the pruned graph's own output (in order); dropped at the first, the
    original model's output of layer 0 (transformers); dropped at the second (after the last
    layer of this 2-layer model), the once-pruned graph's output (in order). Shape as the
    input's, pooled output exact."""
    from transformers import AutoModel
    once = _run(bert, "token_prune:keep=0.7,layers=0")
    pruned = _run(bert, "token_prune:schedule=0.7@0/0.5@1")
    restored = _run(bert, "token_prune:schedule=0.7@0/0.5@1,restore=true")
    n = 24
    feed = feed_for("bert", 2, n)
    a, b = pruned.run(feed), restored.run(feed)
    assert b["last_hidden_state"].shape == (2, n, 64)
    assert torch.allclose(a["pooler_output"], b["pooler_output"], atol=1e-6)
    with torch.no_grad():
        layer0 = AutoModel.from_pretrained(model_dir("bert"), attn_implementation="eager")(
            **feed, output_hidden_states=True).hidden_states[1]
    k1 = kept_length(n, 0.7)
    k2 = kept_length(k1, 0.5)
    mid = once.run(feed)["last_hidden_state"]

    def found_in_order(full, rows):
        """Positions of ``full`` holding ``rows``, each once, in order."""
        where = ((full[:, None] - rows[None]).abs().amax(-1) < 1e-5).nonzero()
        assert len(where) == len(rows) and (where[:, 1] == torch.arange(len(rows))).all()
        assert (where[:, 0].diff() > 0).all()
        return set(where[:, 0].tolist())

    for row in range(2):
        full = b["last_hidden_state"][row]
        kept, survived = found_in_order(full, a["last_hidden_state"][row]), found_in_order(full, mid[row])
        first = set(((full - layer0[row]).abs().amax(-1) < 1e-4).nonzero()[:, 0].tolist())
        assert len(kept) == k2 and kept < survived and len(first) == n - k1 and first | survived == set(range(n))
    # a cut after the last layer (the output itself is gathered), and merging twice
    for spec in ("keep=0.5,layers=1", "schedule=0.7@0/0.7@1,mode=merge"):
        assert _run(bert, f"token_prune:{spec},restore=true").run(feed)["last_hidden_state"].shape == (2, n, 64)


@pytest.mark.parametrize("head", ["BertForTokenClassification", "BertForQuestionAnswering"])
def test_token_level_heads_need_restore(tmp_path, capsys, head):
    """A head that predicts per token (tags, answer spans) reads every position: without
    restore the pass is refused by output name (and `tokopt inspect` says so); with it the head
    runs on the restored last layer, so its outputs keep the input's length at any length, and a
    cut after the last layer gives every position back exactly (transformers, 1e-5)."""
    import transformers as tf
    from tokopt.cli import main
    cfg = tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=256, num_labels=2 if "Question" in head else 5)
    torch.manual_seed(0)
    model = getattr(tf, head)(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    names = ["start_logits", "end_logits"] if "Question" in head else ["logits"]
    prog = PassManager(resolve(plan_passes())).run(tokopt.capture(tmp_path / "m"))
    with pytest.raises(UsageError, match=f"output '{names[0]}' has a value per input token.*restore=true"):
        _run(prog, "token_prune:keep=0.5,layers=0")
    assert main(["inspect", str(tmp_path / "m")]) == 0
    assert f"per-token outputs {', '.join(names)}: token_prune needs restore=true" in capsys.readouterr().out
    pruned, exact = _run(prog, "token_prune:keep=0.5,layers=0,restore=true"), _run(prog, "token_prune:keep=0.5,layers=1,restore=true")
    for n in (9, 16):
        ids = torch.randint(5, 250, (2, n))
        feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            ref = model(**feed)
        got, same = pruned.run(feed), exact.run(feed)
        for name in names:
            assert got[name].shape == ref[name].shape
            torch.testing.assert_close(same[name], ref[name], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_vision_transformer_with_a_fixed_token_count(tmp_path, model_dir):
    """A ViT's token count is fixed by its image size (17 here: 16 patches + CLS), so later shapes
    spell it as a literal; the pass rewrites those. Token counts per mode, keep=1 exact, restore
    gives the input's count back, and the bundle runs in ONNX Runtime. A model whose token count
    equals its head count is refused (the axis could not be told apart), and so is calibrating
    on images (no image set ships)."""
    import transformers as tf
    vit = PassManager(resolve(plan_passes())).run(tokopt.capture(model_dir("vit")))
    x = {"pixel_values": torch.randn(3, 3, 32, 32)}
    for spec, tokens in (("keep=0.5,layers=0", kept_length(17, 0.5)), ("keep=0.5,layers=0,mode=fuse", 10),
                         ("keep=0.7,layers=0,mode=merge", merged_length(17, 0.7)),
                         ("schedule=0.7@0/0.5@1,restore=true", 17)):
        out = _run(vit, f"token_prune:{spec}").run(x)
        assert out["last_hidden_state"].shape == (3, tokens, 64) and out["pooler_output"].shape == (3, 64)
    assert torch.equal(_run(vit, "token_prune:keep=1.0").run(x)["last_hidden_state"], vit.run(x)["last_hidden_state"])
    res = tokopt.compile(model_dir("vit"), out=tmp_path / "b", passes="token_prune:keep=0.5,layers=0", measure=False)
    got = tokopt.load(res.bundle)(pixel_values=x["pixel_values"].numpy())
    assert got["last_hidden_state"].shape == (3, 9, 64)
    tf.ViTModel(tf.ViTConfig(hidden_size=68, intermediate_size=64, num_hidden_layers=2, num_attention_heads=17,
                             image_size=32, patch_size=8)).save_pretrained(tmp_path / "clash")
    with pytest.raises(UsageError, match="token count is fixed at 17, which is also its number of heads"):
        tokopt.compile(tmp_path / "clash", out=tmp_path / "c", passes="token_prune:keep=0.5,layers=0")
    for spec in ("token_prune:keep=0.5,layers=0,recover=2", "tca", "rsq"):  # nothing to calibrate images on
        with pytest.raises(UsageError, match=f"{spec.split(':')[0]} calibrates on token sequences; this model "
                                             "takes pixel_values"):
            _run(vit, spec)


def test_local_attention_scores_tie_as_onnx_breaks_ties(tmp_path):
    """ModernBERT's layer 1 attends through an 8-token window: its first row scores every key
    outside it exactly 0, so which of them the cut keeps is a tie. The program breaks ties
    towards earlier positions, as ONNX's TopK does, and the bundle reproduces it (it was refused:
    torch's topk kept other tied tokens than ONNX Runtime's)."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.ModernBertModel(tf.ModernBertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                                   num_attention_heads=4, vocab_size=256, pad_token_id=0,
                                                   max_position_embeddings=512, local_attention=8,
                                                   global_attn_every_n_layers=2)).eval()
    model.save_pretrained(tmp_path / "m")
    res = tokopt.compile(tmp_path / "m", out=tmp_path / "b", passes="token_prune:keep=0.5,layers=1", measure=False)
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    out = tokopt.load(res.bundle)(input_ids=ids.numpy(), attention_mask=np.ones((1, 24), np.int64))
    assert out["last_hidden_state"].shape == (1, 12, 64)
    scores = torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0]])
    assert _keep_indices(scores, None, 1, 2, False).tolist() == [[0, 1, 2, 5]]   # the earlier zeros
