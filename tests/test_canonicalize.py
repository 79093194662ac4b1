"""canonicalize: every spelling -> tokopt.attention, exact, idempotent; and the op contract."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import tokopt
from tokopt.optimizer.ops import ATTENTION, onnx_translation_table
from tokopt.optimizer.patterns import SDPA, SOFTMAX
from tokopt.passes.canonicalize import CanonicalizePass

from .conftest import EXPECT, FAMILIES, feed_for
from .helpers import prove_pass

TOL = 1e-5  # fp32; the op's reference is SDPA itself, so only summation order differs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_canonicalize(model_dir, family, attn):
    prog = tokopt.capture(model_dir(family), attn_implementation=attn)
    spelled = SDPA if attn == "sdpa" else SOFTMAX[0]
    out = prove_pass(prog, CanonicalizePass(), target=ATTENTION.overload, before=0, after=2,
                     tolerance=TOL, feed=feed_for(family, 3, 29))
    assert out.count(spelled) == 0
    stats = out.history[-1]["stats"]
    assert stats["attention_canonicalized"] == 2 and stats[attn] == 2
    assert stats["gqa_folded"] == (2 if EXPECT[family][0] < 4 else 0)
    assert all(b.spelling == "canonical" and b.causal is EXPECT[family][1] for b in out.attention)
    # GQA is folded: the op sees k with the model's own kv-head count
    node = next(n for n in out.graph.nodes if ATTENTION.matches(n))
    assert node.args[1].meta["val"].shape[1] == EXPECT[family][0]


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
def test_attention_op_reference_and_onnx(tmp_path, kv, mask_kind):
    """The op equals SDPA on repeated k/v, and its ONNX lowering (standard Attention) equals both."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 11, 8, generator=g) for h in (4, kv, kv))
    mask = {"none": None, "causal": None,
            "bool": torch.rand(2, 1, 11, 11, generator=g) > 0.3,
            "float": torch.randn(2, 1, 11, 11, generator=g)}[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True
    causal = mask_kind == "causal"
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4 // kv, 1), v.repeat_interleave(4 // kv, 1),
                                         attn_mask=mask, is_causal=causal, scale=0.3)
    got = ATTENTION.op(q, k, v, mask, 0.3, causal)
    assert torch.allclose(got, ref, atol=1e-6)

    class M(torch.nn.Module):
        def forward(self, q, k, v, m):
            return ATTENTION.op(q, k, v, m, 0.3, causal)

    class NoMask(torch.nn.Module):
        def forward(self, q, k, v):
            return ATTENTION.op(q, k, v, None, 0.3, causal)

    args = (q, k, v) + ((mask,) if mask is not None else ())
    seq = {0: Dim.AUTO, 2: Dim.AUTO}
    shapes = (seq, seq, seq) + (({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},) if mask is not None else ())
    ep = torch.export.export(M() if mask is not None else NoMask(), args, dynamic_shapes=shapes)
    torch.onnx.export(ep, dynamo=True, opset_version=23, optimize=False,
                      custom_translation_table=onnx_translation_table()).save(str(tmp_path / "a.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    assert [n.op_type for n in __import__("onnx").load(str(tmp_path / "a.onnx")).graph.node].count("Attention") == 1
    # run at a new length: the lowering is shape-generic
    q2, k2, v2 = (torch.randn(3, h, 17, 8, generator=g) for h in (4, kv, kv))
    m2 = None if mask is None else (torch.rand(3, 1, 17, 17, generator=g) > 0.3 if mask.dtype == torch.bool
                                     else torch.randn(3, 1, 17, 17, generator=g))
    if m2 is not None and m2.dtype == torch.bool:
        m2[..., 0] = True
    feeds = [q2, k2, v2] + ([m2] if m2 is not None else [])
    out = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), feeds)})[0]
    np.testing.assert_allclose(out, ATTENTION.op(q2, k2, v2, m2, 0.3, causal).numpy(), atol=2e-6)


def test_soft_capped_attention_op_and_onnx(tmp_path):
    """softcap c: the scaled scores become tanh(s / c) * c before the mask (Gemma 2), in the
    reference and in the ONNX lowering (Attention's softcap), at a length the export never saw."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 11, 8, generator=g) * 3 for h in (4, 2, 2))
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    capped = (torch.tanh(scores / 2.0) * 2.0).masked_fill(~torch.ones(11, 11, dtype=torch.bool).tril(), float("-inf"))
    want = capped.softmax(-1) @ v.repeat_interleave(2, 1)
    assert torch.allclose(ATTENTION.op(q, k, v, None, 0.3, True, 2.0), want, atol=1e-6)
    assert not torch.allclose(ATTENTION.op(q, k, v, None, 0.3, True), want, atol=1e-2)   # the cap matters here

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return ATTENTION.op(q, k, v, None, 0.3, True, 2.0)

    seq = {0: Dim.AUTO, 2: Dim.AUTO}
    ep = torch.export.export(M(), (q, k, v), dynamic_shapes=(seq, seq, seq))
    torch.onnx.export(ep, dynamo=True, opset_version=23, optimize=False,
                      custom_translation_table=onnx_translation_table()).save(str(tmp_path / "a.onnx"))
    node = next(n for n in __import__("onnx").load(str(tmp_path / "a.onnx")).graph.node if n.op_type == "Attention")
    assert [a.f for a in node.attribute if a.name == "softcap"] == [2.0]
    sess = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    q2, k2, v2 = (torch.randn(3, h, 17, 8, generator=g) * 3 for h in (4, 2, 2))
    out = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), (q2, k2, v2))})[0]
    np.testing.assert_allclose(out, ATTENTION.op(q2, k2, v2, None, 0.3, True, 2.0).numpy(), atol=2e-6)


def test_attention_op_gradients_match_sdpa():
    """The op is differentiable through its reference, so passes can fine-tune graphs holding it."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    mask = torch.rand(2, 1, 7, 7, generator=g) > 0.3
    mask[..., 0] = True
    ATTENTION.op(q, k, v, mask, 0.3, False).square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask,
                                   scale=0.3).square().sum().backward()
    for a, t in zip(got, (q, k, v)):
        assert torch.allclose(a, t.grad, atol=1e-5)


def test_edits_commit_without_a_re_export(model_dir):
    """canonicalize and weight updates edit a copy of the exported graph itself: the committed
    program shares the weights' tensors (a re-export would have lifted them anew), its nodes keep
    the program's names; a weight of another shape is refused, and the program edited from is
    unchanged. A new node's value is derived on export's fake tensors (symbolic batch and length
    kept); one whose op does not fit its inputs is refused by name. A new weight joins as a buffer,
    and the one it replaces leaves the program: the result is the weight update's, bit for bit."""
    from tokopt.optimizer.errors import PassError
    prog = tokopt.capture(model_dir("llama"))
    out = CanonicalizePass().call(prog).program
    assert all(out.ep.state_dict[k] is v for k, v in prog.ep.state_dict.items())
    assert out.count(SDPA) == 0 and prog.count(SDPA) == 2
    assert {n.name for n in out.graph.nodes if n.op == "placeholder"} == \
        {n.name for n in prog.graph.nodes if n.op == "placeholder"}
    name, weight = next((k, v) for k, v in out.ep.state_dict.items() if v.dim() == 2)
    moved = out.with_tensors({name: weight + 1}, "test")
    assert torch.equal(moved.ep.state_dict[name], weight + 1) and torch.equal(out.ep.state_dict[name], weight)
    assert isinstance(moved.ep.state_dict[name], torch.nn.Parameter)
    with pytest.raises(ValueError, match="not torch.float32"):
        out.with_tensors({name: weight[:1]}, "test")
    edit = out.edit()
    node = next(n for n in edit.graph.nodes if ATTENTION.matches(n))
    with edit.graph.inserting_after(node):
        new = edit.graph.call_function(torch.ops.aten.neg.default, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    negated = edit.commit("an edit")
    got = next(n for n in negated.graph.nodes if n.name == new.name).meta["val"]
    assert str(got.shape) == str(node.meta["val"].shape) and not all(isinstance(d, int) for d in got.shape)

    edit = out.edit()
    node = next(n for n in edit.graph.nodes if ATTENTION.matches(n))
    with edit.graph.inserting_after(node):
        bad = edit.graph.call_function(torch.ops.aten.mm.default, (node, node))   # 4-D: mm takes 2-D
    node.replace_all_uses_with(bad, delete_user_cb=lambda user: user is not bad)
    with pytest.raises(PassError, match=f"without export's metadata.*{bad.name}"):
        edit.commit("an edit")

    edit = out.edit()
    placeholder = next(n for n in edit.graph.nodes if n.op == "placeholder" and edit.tensor(n) is weight)
    doubled = edit.constant("doubled", weight * 2)
    placeholder.replace_all_uses_with(doubled)
    twice = edit.commit("an edit")
    assert name not in twice.ep.state_dict and torch.equal(twice.ep.state_dict["tokopt_doubled"], weight * 2)
    feed = feed_for("llama", 2, 23)
    want = out.with_tensors({name: weight * 2}, "test").run(feed)["logits"]
    assert torch.equal(twice.run(feed)["logits"], want)


def test_relative_position_bias_joins_the_mask(tmp_path):
    """MPNet (all-mpnet-base-v2's class; no SDPA, so eager) adds a relative position bias to its
    scores beside the padding mask: the two terms become the canonical op's one additive mask
    (exact on padded rows), so a cut runs on it and lowers to ONNX Runtime."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.MPNetModel(tf.MPNetConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, vocab_size=256)).eval()
    model.save_pretrained(tmp_path / "m")
    feed = feed_for("bert", 2, 23)
    out = prove_pass(tokopt.capture(tmp_path / "m"), CanonicalizePass(), target=ATTENTION.overload, before=0,
                     after=3, tolerance=TOL, feed=feed)
    assert out.history[-1]["stats"]["eager"] == 3
    mask = next(n for n in out.graph.nodes if ATTENTION.matches(n)).args[3]
    assert mask.target == torch.ops.aten.add.Tensor and mask.meta["val"].shape[1] == 4   # the bias's heads
    res = tokopt.compile(tmp_path / "m", out=tmp_path / "b", passes="token_prune:keep=0.5,layers=0", measure=False)
    got = tokopt.load(res.bundle)(**{k: v.numpy() for k, v in feed.items()})["last_hidden_state"]
    assert got.shape == (2, 12, 64)


def test_a_linear_spelled_out_becomes_linear():
    """Falcon's projections are ``x @ W.T``: canonicalize makes them ``linear`` (exact), the spelling
    rsq quantizes (it found none before)."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.FalconForCausalLM(tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 vocab_size=256, new_decoder_architecture=True, num_kv_heads=2)).eval()
    ids = torch.randint(3, 256, (2, 11))
    prog = tokopt.capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    out = prove_pass(prog, CanonicalizePass(), target=torch.ops.aten.linear.default, before=1, after=9, tolerance=TOL,
                     feed={"input_ids": ids[:, :7], "attention_mask": torch.ones(2, 7, dtype=torch.long)})
    assert out.history[-1]["stats"]["linears"] == 8
    from tokopt.optimizer.compile import plan_passes
    from tokopt.optimizer.pass_manager import PassManager, resolve
    quantized = PassManager(resolve(plan_passes("rsq:bits=4,solver=rtn,importance=none,rotate=off"))).run(prog)
    assert quantized.count("tokopt.matmul_nbits.default") == 9   # and the LM head


def test_gpt2_conv1d_becomes_linear():
    """GPT-2's projections are ``addmm(b, x, W)`` with W stored [in, out] (its Conv1D): canonicalize
    makes them ``linear(x, W.T, b)`` (exact; W.T a new weight, the stored one dropped), the spelling
    rsq quantizes (it found no linear in GPT-2 before)."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256)).eval()
    ids = torch.randint(3, 256, (2, 11))
    prog = tokopt.capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    out = prove_pass(prog, CanonicalizePass(), target=torch.ops.aten.linear.default, before=1, after=9, tolerance=TOL,
                     feed={"input_ids": ids[:, :7], "attention_mask": torch.ones(2, 7, dtype=torch.long)})
    assert out.history[-1]["stats"]["linears"] == 8
    assert not any(n.target in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default) for n in out.graph.nodes)
    weights = out.ep.state_dict
    assert not any(k.endswith("c_attn.weight") for k in weights)   # the stored [in, out] weights left
    stored = model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(next(v for k, v in weights.items() if "h_0_attn_c_attn" in k), stored.detach().t())
    from tokopt.optimizer.compile import plan_passes
    from tokopt.optimizer.pass_manager import PassManager, resolve
    quantized = PassManager(resolve(plan_passes("rsq:bits=4,solver=rtn,importance=none,rotate=off"))).run(prog)
    assert quantized.count("tokopt.matmul_nbits.default") == 9   # and the LM head
