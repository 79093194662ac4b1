"""End to end through ONNX Runtime: every family compiles, the bundle matches eager at unseen
shapes, the bundle is self-describing and refuses tampering, and failures leave nothing."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import tokopt
from tokopt.optimizer.errors import BackendError, BundleError, PassError, UsageError
from tokopt.optimizer.pass_manager import PASSES

from .conftest import FAMILIES, MORE_FAMILIES, feed_for

TOL = 1e-4  # fp32 eager vs ORT, through a different attention kernel


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
def test_bundle_matches_eager(tmp_path, model_dir, family):
    res = tokopt.compile(model_dir(family), out=tmp_path / "b", measure=False, verify_each=True)
    run = tokopt.load(res.bundle)
    feed = feed_for(family, 3, 29)
    got = run(**{k: v.numpy() for k, v in feed.items()})
    with torch.no_grad():
        ref = res.program.module(**feed)
    main = "logits" if "logits" in got else "last_hidden_state"
    assert list(got) == res.program.output_names
    assert len(res.program.attention) == 2 and not res.program.rejected
    if "attention_mask" in feed and not feed["attention_mask"].all():  # compare real tokens only
        keep = feed["attention_mask"].bool().numpy()
        err = np.abs(got[main] - ref[main].numpy())[keep].max()
    else:
        err = np.abs(got[main] - ref[main].numpy()).max()
    assert err < TOL, f"{family}: {err}"
    m = res.manifest
    assert m["passes"] == [{"name": "canonicalize", "options": {}}]
    assert m["inputs"][0]["shape"][0] == "batch"
    assert m["outputs"][0]["shape"][0] == "batch"
    assert set(m["files"]) >= {"model.onnx", "report.json"}


def test_eager_spelling_compiles(tmp_path, model_dir):
    res = tokopt.compile(model_dir("llama"), out=tmp_path / "b", attn_implementation="eager", measure=False)
    feed = feed_for("llama", 2, 40)
    got = tokopt.load(res.bundle)(**{k: v.numpy() for k, v in feed.items()})["logits"]
    with torch.no_grad():
        ref = res.program.module(**feed).logits.numpy()
    assert np.abs(got - ref).max() < TOL


def test_onnx_uses_standard_attention(tmp_path, model_dir):
    import onnx
    res = tokopt.compile(model_dir("qwen2"), out=tmp_path / "b", measure=False, generate=False)
    ops = [n.op_type for n in onnx.load(str(res.bundle / "model.onnx")).graph.node]
    assert ops.count("Attention") == 2  # GQA (1 kv head) carried by the op, no repeat in the graph


def test_runner_rejects_bad_inputs(tmp_path, model_dir):
    res = tokopt.compile(model_dir("llama"), out=tmp_path / "b", measure=False, max_seq_len=64, generate=False)
    run = tokopt.load(res.bundle)
    ids = np.zeros((1, 8), dtype=np.int64)
    with pytest.raises(UsageError, match="no input 'input_id'.*Did you mean 'input_ids'"):
        run(input_id=ids, attention_mask=ids)
    with pytest.raises(UsageError, match="'attention_mask' is missing"):
        run(input_ids=ids)
    long = np.zeros((1, 65), dtype=np.int64)
    with pytest.raises(UsageError, match="65 tokens; this bundle accepts 1 to 64"):
        run(input_ids=long, attention_mask=long)


def test_tampered_and_incomplete_bundles(tmp_path, model_dir):
    res = tokopt.compile(model_dir("bert"), out=tmp_path / "b", measure=False)
    good = res.bundle
    bad = tmp_path / "tampered"
    shutil.copytree(good, bad)
    with open(bad / "model.onnx", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(BundleError, match="does not match the sha256"):
        tokopt.load(bad)
    gone = tmp_path / "gone"
    shutil.copytree(good, gone)
    (gone / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing model.onnx"):
        tokopt.load(gone)
    old = tmp_path / "old"
    shutil.copytree(good, old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 99
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format 99"):
        tokopt.load(old)
    with pytest.raises(BundleError, match="no manifest.json"):
        tokopt.load(tmp_path)


def test_existing_out_needs_force(tmp_path, model_dir):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep").write_text("precious")
    with pytest.raises(UsageError, match="already exists"):
        tokopt.compile(model_dir("bert"), out=out, measure=False)
    assert (out / "keep").read_text() == "precious"
    res = tokopt.compile(model_dir("bert"), out=out, measure=False, force=True)
    assert not (out / "keep").exists() and (res.bundle / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp folders left


def test_failed_compile_leaves_nothing(tmp_path, model_dir, monkeypatch):
    from tokopt.backends.onnxruntime import OnnxRuntimeBackend

    def explode(self, program, out_dir, target, precision="auto"):
        (out_dir / "model.onnx").write_bytes(b"half")
        raise BackendError("disk full (simulated)")
    monkeypatch.setattr(OnnxRuntimeBackend, "lower", explode)
    with pytest.raises(BackendError, match="simulated"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "b", measure=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_gpu_provider_is_clear(tmp_path, model_dir):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(BackendError, match="CUDAExecutionProvider.*--target x86-cpu"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "b", target="cuda")
    assert not (tmp_path / "b").exists()
    with pytest.raises(UsageError, match="Did you mean 'x86-cpu'"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "b", target="x86_cpu")


def test_pass_failure_in_compile_is_named(tmp_path, model_dir, monkeypatch):
    from tokopt.passes.canonicalize import CanonicalizePass

    def broken(self, program):
        raise RuntimeError("index out of range")
    monkeypatch.setattr(CanonicalizePass, "call", broken)
    with pytest.raises(PassError, match="pass 'canonicalize' .* RuntimeError: index out of range"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "b", measure=False)
    assert not (tmp_path / "b").exists()
    assert "canonicalize" in PASSES


def test_reshapes_that_keep_their_input_shape_are_dropped():
    """``static_reshapes`` drops a Reshape whose constant shape is its input's own (a 1-D input
    flattened, sizes copied by 0 or repeated), and keeps those that change the shape, read 0 as
    an empty dimension (``allowzero``), or give a graph output; the graph computes the same."""
    import onnx_ir as ir
    import onnxruntime as ort

    from tokopt.backends.onnx_shapes import static_reshapes

    def const(name, values):
        return ir.Value(name=name, const_value=ir.tensor(np.array(values, np.int64), name=name))

    batch = ir.SymbolicDim("batch")
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([batch]))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([batch, 4]))
    z = ir.Value(name="z", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([ir.SymbolicDim("rows"), 4]))
    shapes = [const("flat", [-1]), const("copy", [0, 4]), const("merge", [-1]), const("empty", [0, 4])]
    nodes = [ir.node("Reshape", [x, shapes[0]], name="flat_x"), ir.node("Reshape", [y, shapes[1]], name="copy_y"),
             ir.node("Reshape", [y, shapes[2]], name="merge_y"),
             ir.node("Reshape", [z, shapes[3]], attributes={"allowzero": 1}, name="empty_z"),
             ir.node("Reshape", [x, shapes[0]], name="output_x")]
    total = ir.node("ReduceSum", [nodes[0].outputs[0]], attributes={"keepdims": 0}, name="sum_x")
    doubled = ir.node("Add", [nodes[1].outputs[0], nodes[1].outputs[0]], name="add_y")
    outs = [total.outputs[0], doubled.outputs[0], nodes[2].outputs[0], nodes[3].outputs[0], nodes[4].outputs[0]]
    for i, o in enumerate(outs):
        o.name = f"out{i}"
    graph = ir.Graph([x, y, z], outs, nodes=[*nodes, total, doubled], initializers=shapes, opset_imports={"": 23})
    model = ir.Model(graph, ir_version=10)

    def run(m):
        s = ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(None, {"x": np.arange(5, dtype=np.float32), "y": np.arange(12, dtype=np.float32).reshape(3, 4),
                            "z": np.zeros((0, 4), np.float32)})
    want = run(model)
    assert static_reshapes(model) == 2
    assert sorted(n.name for n in model.graph if n.op_type == "Reshape") == ["empty_z", "merge_y", "output_x"]
    for a, b in zip(run(model), want):
        np.testing.assert_array_equal(a, b)
