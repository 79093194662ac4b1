"""`tokopt export BUNDLE --to genai`: a generation bundle as a folder onnxruntime-genai loads.

Proof: numerically, the exported graph's prefill logits at the last position equal the bundle's
(1e-5: the same graph but for a gather), and, where onnxruntime-genai is installed, its
generator decodes the same greedy tokens as the bundle's runner; structurally, the export has
no ``logits_index`` input and gives every prompt position's logits (genai reads [B, S, V] at the
prefill), and its config names the graph's inputs and outputs.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

import tokopt
from tokopt.backends import genai
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
    names = {i.name for i in sess.get_inputs()}
    return sess.run(["logits"], {k: v for k, v in feed.items() if k in names})[0]


def test_export_is_the_bundles_graph_with_every_positions_logits(bundle, tmp_path):
    out = tokopt.export(bundle, tmp_path / "g", to="genai")
    config = json.loads((out / "genai_config.json").read_text())["model"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs, outputs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    assert "logits_index" not in inputs
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
