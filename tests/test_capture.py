"""Capture of every family, both attention spellings, and every source kind."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import tokopt
from tokopt.optimizer.errors import CaptureError, UnsupportedModelError, UsageError

from .conftest import EXPECT, FAMILIES, _tiny

pytestmark = pytest.mark.fresh_capture   # what capture makes and costs, every time


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_index(model_dir, family, attn):
    prog = tokopt.capture(model_dir(family), attn_implementation=attn)
    kv, causal, rope, fused, task = EXPECT[family]
    assert prog.task == task
    assert not prog.rejected
    assert [b.layer for b in prog.attention] == [0, 1]
    for b in prog.attention:
        assert b.spelling == attn
        assert (b.heads, b.kv_heads, b.head_dim) == (4, kv, 16)
        assert b.causal is causal and b.rope is rope and b.fused_qkv is fused
        assert b.q_proj and b.k_proj and b.v_proj and b.o_proj, b
        assert b.scale == pytest.approx(0.25)
    if family == "vit":
        assert prog.dynamic_axes == {"pixel_values": {0: "batch"}}
    else:
        assert prog.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}
        assert prog.seq_range == (1, 512)


def test_projection_names_are_the_models_own(model_dir):
    prog = tokopt.capture(model_dir("llama"))
    b = prog.attention[1]
    assert b.module == "model.layers.1.self_attn"
    assert b.q_proj == "model.layers.1.self_attn.q_proj.weight"
    assert b.o_proj == "model.layers.1.self_attn.o_proj.weight"
    assert prog.module.get_parameter(b.k_proj).shape == (32, 64)  # 2 kv heads x 16


def test_module_source_dict_and_tuple():
    model = _tiny("bert")
    ids = torch.randint(0, 256, (2, 12))
    by_dict = tokopt.capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    by_tuple = tokopt.capture(model, (ids,))
    assert by_dict.input_names == ["input_ids", "attention_mask"] and by_tuple.input_names == ["input_ids"]
    assert by_dict.output_names[0] == "last_hidden_state"
    assert len(by_dict.attention) == 2


def test_pt2_source(tmp_path, model_dir):
    prog = tokopt.capture(model_dir("gpt2"))
    path = tmp_path / "gpt2.pt2"
    torch.export.save(prog.ep, path)
    again = tokopt.capture(path)
    assert again.input_names == prog.input_names
    assert len(again.attention) == 2 and again.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}
    ids = torch.randint(0, 256, (3, 21))
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert torch.allclose(again.run(feed)["output"], prog.run(feed)["logits"], atol=1e-6)


def test_pt2_with_export_asserts_compiles(tmp_path, model_dir):
    """A saved BERT holds aten._assert_tensor_metadata nodes (its mask's dtype casts), which a
    .pt2 loads without a value: canonicalize and the lowering take it (they refused it)."""
    prog = tokopt.capture(model_dir("bert"))
    path = tmp_path / "bert.pt2"
    torch.export.save(prog.ep, path)
    loaded = tokopt.capture(path)
    assert any(n.target == torch.ops.aten._assert_tensor_metadata.default for n in loaded.graph.nodes)
    res = tokopt.compile(path, out=tmp_path / "b", measure=False)
    feed = {"input_ids": torch.randint(10, 256, (2, 19)), "attention_mask": torch.ones(2, 19, dtype=torch.int64)}
    got = tokopt.load(res.bundle)(**{k: v.numpy() for k, v in feed.items()})
    want = res.program.run(feed)   # a .pt2 keeps no output names: output_0, ...
    assert got["output_0"].shape == (2, 19, 64) and np.abs(got["output_0"] - want["output_0"].numpy()).max() < 1e-5
    assert np.abs(want["output_0"].numpy() - prog.run(feed)["last_hidden_state"].numpy()).max() < 1e-5


def test_callable_source(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\nfrom tests.conftest import _tiny\n"
        "def build():\n    ids = torch.randint(0, 256, (2, 9))\n"
        "    return _tiny('llama'), {'input_ids': ids}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prog = tokopt.capture("my_models:build")
    assert len(prog.attention) == 2 and prog.output_names == ["logits"]
    sys.modules.pop("my_models", None)


class _OddAttention(torch.nn.Module):
    """Softmax over the query axis: looks like attention, is not; must be refused with a reason."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(16, 16)

    def forward(self, x):
        q = self.q(x).view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        p = torch.softmax(q @ q.transpose(-2, -1), dim=2)
        return (p @ q).transpose(1, 2).reshape(x.shape)


def test_unrecognised_attention_reports_reason():
    prog = tokopt.capture(_OddAttention(), (torch.randn(2, 5, 16),))
    assert prog.attention == []
    assert len(prog.rejected) == 1 and "softmax over dim 2" in prog.rejected[0].reason


def test_bad_sources(tmp_path, model_dir):
    with pytest.raises(CaptureError, match="does not exist"):
        tokopt.capture(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptureError, match="no config.json"):
        tokopt.capture(tmp_path / "empty")
    with pytest.raises(UsageError, match="example_inputs"):
        tokopt.capture(_tiny("bert"))
    with pytest.raises(UsageError, match="max_position_embeddings"):
        tokopt.capture(model_dir("llama"), max_seq_len=4096)


def test_unknown_architecture(tmp_path, model_dir):
    import json
    import shutil
    bad = tmp_path / "weird"
    shutil.copytree(model_dir("bert"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "frobnicator", ["FrobnicatorModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="config.json"):
        tokopt.capture(bad)


def test_input_named_like_a_builtin(tmp_path):
    """nn.Sequential's argument is called ``input``; copying the graph renames the placeholder
    (FX avoids shadowing builtins) and the signature follows, so passes and the bundle work."""
    import numpy as np
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    res = tokopt.compile(model, example_inputs=(torch.randn(2, 8),), out=tmp_path / "b", measure=False)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    got = tokopt.load(res.bundle)(input=x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(next(iter(got.values())) - ref).max() < 1e-5


def test_a_one_sequence_example_keeps_batch_and_sequence_dynamic(tmp_path):
    """The most common example from the Python API, one sequence of one batch row: torch.export
    would fix size-1 dimensions; the bundle still runs at any batch and length."""
    model = _tiny("llama")
    ids = torch.randint(10, 256, (1, 9))
    res = tokopt.compile(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, out=tmp_path / "b",
                         measure=False)
    assert [i["shape"] for i in res.manifest["inputs"]] == [["batch", "sequence"]] * 2
    run = tokopt.load(res.bundle)
    for batch, length in ((2, 9), (3, 1), (1, 40)):
        x = torch.randint(10, 256, (batch, length))
        got = run(input_ids=x.numpy(), attention_mask=np.ones((batch, length), np.int64))["logits"]
        with torch.no_grad():
            want = model(input_ids=x).logits.numpy()
        assert np.abs(got - want).max() < 1e-4


def test_a_class_without_sdpa_loads_its_own_attention(tmp_path):
    """MPNet (all-mpnet-base-v2's class) has no SDPA attention, and transformers refuses to load it
    with one: the folder is loaded eager, says so in the manifest, and compiles exactly."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.MPNetModel(tf.MPNetConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=256)).eval()
    model.save_pretrained(tmp_path / "m")
    res = tokopt.compile(tmp_path / "m", out=tmp_path / "b", measure=False)
    assert res.manifest["source"]["attn_implementation"] == "eager"
    ids = torch.randint(3, 256, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    got = tokopt.load(res.bundle)(input_ids=ids.numpy(), attention_mask=mask.numpy())["last_hidden_state"]
    np.testing.assert_allclose(got[0], ref[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1, :9], ref[1, :9], atol=1e-4, rtol=0)   # padding's rows are not compared


def test_dynamic_rope_is_refused_by_name(tmp_path):
    """Dynamic NTK RoPE recomputes its frequencies from the data: refused, saying why."""
    import transformers as tf
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                               num_attention_heads=4, vocab_size=256, max_position_embeddings=64,
                                               rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                                "factor": 2.0}))
    with pytest.raises(UnsupportedModelError, match="RoPE scaling is 'dynamic'"):
        tokopt.capture(model.eval(), generate=True)
