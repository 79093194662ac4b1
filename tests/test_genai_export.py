"""`tokopt export BUNDLE --to genai`: a generation bundle as a folder onnxruntime-genai loads.

Proof: numerically, the exported graph's prefill logits at the last position equal the bundle's
(1e-5: the same graph but for a gather), and, where onnxruntime-genai is installed, its
generator decodes the same greedy tokens as the bundle's runner; structurally, the export has
no ``logits_index`` input and gives every prompt position's logits (genai reads [B, S, V] at the
prefill), reads the mask genai feeds where the bundle reads each row's length, and its config
names the graph's inputs and outputs.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

import tokopt
from tokopt.backends import genai
from tokopt.backends.lengths import graph_feed
from tokopt.cli import main
from tokopt.optimizer.errors import UsageError

from .conftest import _tiny


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    model = _tiny("llama").eval()
    model.generation_config.eos_token_id = None
    return tokopt.compile(model, out=tmp_path_factory.mktemp("genai") / "b", generate=True, measure=False).bundle


def _prefill(path, ids, extra=None):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), **(extra or {})}
    for i in sess.get_inputs():
        if i.name.startswith("past_"):
            feed[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
    return sess.run(["logits"], graph_feed(feed, {i.name for i in sess.get_inputs()}))[0]


def test_export_is_the_bundles_graph_with_every_positions_logits(bundle, tmp_path):
    out = tokopt.export(bundle, tmp_path / "g", to="genai")
    config = json.loads((out / "genai_config.json").read_text())["model"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs, outputs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    assert "logits_index" not in inputs
    # the bundle reads each row's length, the export the mask genai feeds (and computes them from it)
    assert "seqlens_k" in [i.name for i in ort.InferenceSession(str(bundle / "model.onnx")).get_inputs()]
    assert "attention_mask" in inputs and "seqlens_k" not in inputs
    dec = config["decoder"]
    assert [n for n in inputs if n.startswith("past_key")] == [dec["inputs"]["past_key_names"] % i
                                                             for i in range(dec["num_hidden_layers"])]
    assert dec["outputs"]["present_value_names"] % 0 in outputs and config["type"] == "llama"
    ids = np.random.default_rng(0).integers(2, 100, (1, 11))
    every = _prefill(out / "model.onnx", ids)
    assert every.shape[:2] == (1, 11)
    last = _prefill(bundle / "model.onnx", ids, {"logits_index": np.array([10])})
    np.testing.assert_allclose(every[:, -1], last[:, -1], atol=1e-5, rtol=0)

    if genai.missing():
        pytest.skip(f"{genai.missing()}: its generator is not run")
    gen = genai.generator(genai.load(out, None), ids, 11 + 16)
    while not gen.is_done():
        gen.generate_next_token()
    want = tokopt.load(bundle).generate(input_ids=ids, max_new_tokens=16)
    np.testing.assert_array_equal(np.asarray(gen.get_sequence(0)), want[0])


def test_export_refusals(bundle, tmp_path, capsys):
    assert main(["export", str(bundle), "--out", str(tmp_path / "c")]) == 0
    assert main(["export", str(bundle), "--out", str(tmp_path / "c")]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(UsageError, match="exports to genai, not 'tensorrt'"):
        tokopt.export(bundle, tmp_path / "t", to="tensorrt")
    plain = tmp_path / "plain"
    shutil.copytree(bundle, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    (plain / "manifest.json").write_text(json.dumps({**manifest, "generation": None}))
    with pytest.raises(UsageError, match="not a generation bundle"):
        tokopt.export(plain, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_the_peer_runs_a_sliding_window_build_short_of_its_window(tmp_path):
    """genai's runtime refuses a generator whose cache is smaller than a sliding-window build's
    window; the peer's generator then takes the window as its length and its callers stop at the
    tokens asked for (a Gemma 2 with a 64-token window, 12 + 8 tokens)."""
    if genai.missing():
        pytest.skip(genai.missing())
    import transformers as tf
    model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=256, max_position_embeddings=512, sliding_window=64, bos_token_id=0,
        eos_token_id=None, pad_token_id=1))
    model.save_pretrained(tmp_path / "m")
    peer = genai.build(tmp_path / "m", "fp32", tmp_path / "g", None)
    assert not isinstance(peer, str), peer
    ids = np.random.default_rng(0).integers(10, 256, (1, 12))
    gen = genai.generator(peer, ids, 12 + 8)
    for _ in range(8):
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) == 20 and not gen.is_done()   # room to the window, stopped by the caller
    call = genai.step_calls(peer, vocab=256, context=512)({"input_ids": ids[:, :1], "attention_mask": np.ones((1, 13))})
    for _ in range(5):   # steps past a fresh generator's end
        call()


def test_a_sliding_window_bundle_exports_its_window(tmp_path):
    """A Gemma 2 bundle (an 8-token window on layer 0, a windowed cache on the kernel) exports with
    genai's sliding-window config, whose runtime then sizes that layer's cache itself; its
    generator decodes past the window as the bundle's runner does."""
    import transformers as tf
    model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=256, max_position_embeddings=512, sliding_window=8, bos_token_id=0,
        eos_token_id=None, pad_token_id=1)).eval()
    model.generation_config.eos_token_id = None
    bundle = tokopt.compile(model, out=tmp_path / "b", generate=True, measure=False).bundle
    out = tokopt.export(bundle, tmp_path / "g", to="genai")
    window = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["sliding_window"]
    assert (window["window_size"], window["layers"]) == (8, [0])
    if genai.missing():
        pytest.skip(f"{genai.missing()}: its generator is not run")
    ids = np.random.default_rng(3).integers(10, 256, (1, 12))
    gen = genai.generator(genai.load(out, None), ids, 12 + 16)
    while not gen.is_done():
        gen.generate_next_token()
    np.testing.assert_array_equal(np.asarray(gen.get_sequence(0)),
                                  tokopt.load(bundle).generate(input_ids=ids, max_new_tokens=16)[0])
