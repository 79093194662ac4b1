"""The OpenVINO backend: tokopt's standard ONNX converted to OpenVINO IR, run by OpenVINO's CPU
device at lengths the export never saw; passes' ops convert; what it cannot serve is refused."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import tokopt
from tokopt.optimizer.errors import BackendError, UsageError

from .conftest import REFERENCE_LM, feed_for

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'tokopt[openvino]')")


@pytest.mark.parametrize("family", ["bert", "llama", "vit"])
def test_bundle_matches_eager(family, tmp_path, model_dir):
    """fp32 (asked for): within float tolerance of eager at a batch and length never seen; the
    IR is in the bundle and the runner is the same API as ONNX Runtime's."""
    res = tokopt.compile(model_dir(family), out=tmp_path / "b", backend="openvino", precision="fp32", measure=False)
    # each layer's attention reads a mask (a Llama's carries causality): it keeps a key in every row
    assert res.manifest["lowering"] == {"model": "model.xml", "device": "CPU", "precision": "fp32",
                                        "nan_guards_dropped": 2, "masks_keep_a_key": 2}
    assert {"model.xml", "model.bin"} <= set(res.manifest["files"])
    feed = feed_for(family, 3, 29)
    got = tokopt.load(res.bundle)(**{k: v.numpy() for k, v in feed.items()})
    with torch.no_grad():
        ref = res.program.module(**feed)
    main = "logits" if "logits" in got else "last_hidden_state"
    err = np.abs(got[main] - ref[main].numpy())
    if "attention_mask" in feed and not feed["attention_mask"].all():
        err = err[feed["attention_mask"].bool().numpy()]
    assert err.max() < 1e-4


def test_attention_rows_without_keys_need_no_nan_guard(tmp_path, model_dir):
    """OpenVINO's frontend guards each Attention with Select(IsNaN(y), 0, y); tokopt's IR has none
    for an encoder (a mask row with no key keeps every key instead). A sequence of padding only is
    finite and the other rows are eager's within fp32 tolerance. What the guard removal matches: the
    frontend's Select(IsNaN) after a masked Attention, and nothing in a graph without a mask."""
    import onnx
    import onnx.helper as oh
    from onnx import TensorProto

    from tokopt.backends.openvino import drop_nan_guards
    import openvino as ov
    res = tokopt.compile(model_dir("bert"), out=tmp_path / "b", backend="openvino", precision="fp32", measure=False)
    ops = [op.get_type_name() for op in ov.Core().read_model(str(res.bundle / "model.xml")).get_ordered_ops()]
    assert ops.count("ScaledDotProductAttention") == 2 and "IsNaN" not in ops
    feed = feed_for("bert", 3, 17)
    feed["attention_mask"][1] = 0
    got = tokopt.load(res.bundle)(**{k: v.numpy() for k, v in feed.items()})["last_hidden_state"]
    with torch.no_grad():
        ref = res.program.module(**feed)["last_hidden_state"].numpy()
    assert np.isfinite(got).all()
    keep = feed["attention_mask"].bool().numpy()
    assert np.abs(got - ref)[keep].max() < 1e-4
    for masked in (True, False):
        inputs = [oh.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 2, "s", 8]) for n in "qkv"]
        inputs += [oh.make_tensor_value_info("m", TensorProto.BOOL, ["b", 1, 1, "s"])] if masked else []
        graph = oh.make_graph([oh.make_node("Attention", [i.name for i in inputs], ["y"])], "g", inputs,
                              [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 23)]), tmp_path / "att.onnx")
        model = ov.convert_model(str(tmp_path / "att.onnx"))
        assert [op.get_type_name() for op in model.get_ordered_ops()].count("IsNaN") == masked
        assert drop_nan_guards(model) == masked
        assert "IsNaN" not in [op.get_type_name() for op in model.get_ordered_ops()]


def test_static_shapes_compile_one_model_per_input_shape(tmp_path, model_dir, monkeypatch):
    """--static-shapes (and a device that compiles static shapes only, the NPU): one model per
    input shape, whose outputs are the dynamic model's; a shape seen before reuses its model, the
    oldest beyond STATIC_MODELS is dropped; the report's timing takes the same path and says so."""
    from tokopt.backends import openvino as backend
    from tokopt.optimizer.report import Bench, format_report
    res = tokopt.compile(model_dir("bert"), out=tmp_path / "b", backend="openvino", precision="fp32", measure=False,
                         static_shapes=True)
    assert res.manifest["lowering"]["shapes"] == "static"
    static = tokopt.load(res.bundle)
    dynamic = backend.OpenVinoRunner(res.bundle, res.manifest, static=False)
    monkeypatch.setattr(backend, "STATIC_MODELS", 2)
    for batch, length in [(1, 9), (2, 17), (1, 9), (3, 5)]:
        feed = {k: v.numpy() for k, v in feed_for("bert", batch, length).items()}
        want, got = dynamic(**feed)["last_hidden_state"], static(**feed)["last_hidden_state"]
        assert np.abs(got - want).max() < 1e-5
        compiled = static.models(feed)[0]
        assert [list(i.get_shape()) for i in compiled.inputs][0] == [batch, length]   # static, not [?, ?]
    assert [dict(k)["input_ids"] for k in static.models.models] == [(1, 9), (3, 5)]   # (2, 17) dropped
    assert not dynamic.models.static and dynamic.models({})[0].inputs[0].get_partial_shape().is_dynamic
    assert backend._static({"device": "NPU"}) and not backend._static({"device": "CPU"})
    entries = backend.OpenVinoBackend().latency(tokopt.capture(model_dir("bert")), res.bundle,
                                                backend.get_target("x86-cpu"), Bench(runs=2), [8, 16], None,
                                                res.manifest)
    assert [e["shapes"] for e in entries] == ["static: one model compiled per input shape"] * 2
    assert all(e["tokopt"]["median_ms"] > 0 and e["baseline"]["median_ms"] > 0 for e in entries)
    text = format_report({"source": "bert", "backend": "openvino", "target": "x86-cpu", "latency": entries[0],
                          "size_bytes": {"tokopt": 1}})
    assert text.count("; shapes static)") == 1
    # a causal LM keeps its full-sequence forward: a decode step's new shape would be a compile
    lm = tokopt.compile(model_dir("llama"), out=tmp_path / "lm", backend="openvino", measure=False, static_shapes=True)
    assert "generation" not in lm.manifest and "--static-shapes" in " ".join(lm.report["plan"])


def test_dynamic_runner_specializes_frequent_shapes(tmp_path, model_dir, monkeypatch):
    """A dynamic bundle's runner serves every shape from its dynamic model and compiles a model of
    their own for shapes it is called with SPECIALIZE_AFTER times, in the background; once made,
    calls at those shapes run it (static input shapes) with the dynamic model's outputs; the
    oldest beyond STATIC_MODELS is dropped and counted afresh. Not where asked not to, not for a
    generation bundle or one with more weights than SPECIALIZE_MAX_BYTES; the report times both
    sides specialized and says so; a shape OpenVINO fails to compile stays on the dynamic model
    with a warning. ``specialize`` is refused for a backend without it."""
    from tokopt.backends import openvino as backend
    from tokopt.optimizer.report import Bench, format_report
    res = tokopt.compile(model_dir("bert"), out=tmp_path / "b", backend="openvino", precision="fp32", measure=False)
    run, plain = tokopt.load(res.bundle), tokopt.load(res.bundle, specialize=False)
    monkeypatch.setattr(backend, "STATIC_MODELS", 2)

    def static_shape(feed):
        return [list(i.get_partial_shape()) for i in run.models(feed)[0].inputs][0]
    feeds = {n: {k: v.numpy() for k, v in feed_for("bert", 1, n).items()} for n in (9, 17, 5)}
    for n in (9, 9):
        run(**feeds[n])
    assert not run.models.pending and run.models(feeds[9])[0] is run.models.dynamic[0]   # this was the third call
    run.settle()
    want = plain(**feeds[9])["last_hidden_state"]
    assert np.abs(run(**feeds[9])["last_hidden_state"] - want).max() < 1e-5
    assert static_shape(feeds[9]) == [1, 9]   # its own model now, not [?, ?]
    for n in (17, 17, 17, 5, 5, 5):
        run(**feeds[n])
        run.settle()
    run(**feeds[17]), run(**feeds[5])
    assert [dict(k)["input_ids"] for k in run.models.models] == [(1, 17), (1, 5)]   # (1, 9) dropped
    assert not plain.models.models and plain.models(feeds[9]) is plain.models.dynamic
    assert backend.specializes(res.manifest, res.bundle)
    assert not backend.specializes({**res.manifest, "generation": {"cache": {}}}, res.bundle)
    monkeypatch.setattr(backend, "SPECIALIZE_MAX_BYTES", 1)
    assert not backend.specializes(res.manifest, res.bundle) and not tokopt.load(res.bundle).models.pool
    monkeypatch.setattr(backend, "SPECIALIZE_MAX_BYTES", 2**30)
    entries = backend.OpenVinoBackend().latency(tokopt.capture(model_dir("bert")), res.bundle,
                                                backend.get_target("x86-cpu"), Bench(runs=2), [8], None, res.manifest)
    assert entries[0]["shapes"].startswith("specialized:") and entries[0]["baseline"]["median_ms"] > 0
    text = format_report({"source": "bert", "backend": "openvino", "target": "x86-cpu", "latency": entries[0],
                          "size_bytes": {"tokopt": 1}})
    assert text.count("; shapes specialized)") == 1
    model = backend._read(res.bundle / backend.MODEL_FILE)

    def refusing(shapes):   # a shape OpenVINO cannot compile: its calls stay on the dynamic model
        if shapes is not None:
            raise RuntimeError("no such shape")
        return backend._compile(model, "CPU", "fp32", None)
    models = backend.Compiled(refusing, static=False, specialize=True)
    for _ in range(backend.SPECIALIZE_AFTER):
        models(feeds[9])
    models.settle()
    with pytest.warns(UserWarning, match="could not compile the model for input shapes.*keep the dynamic model"):
        assert models(feeds[9]) is models.dynamic
    assert models(feeds[9]) is models.dynamic and not models.pending and not models.models   # not tried again
    for n in range(1, 300):   # shapes each called once: their counts stay bounded
        models({"input_ids": np.zeros((1, n), np.int64)})
    assert len(models.calls) <= 64 * backend.STATIC_MODELS and not models.pending
    ort = tokopt.compile(model_dir("bert"), out=tmp_path / "o", measure=False)
    with pytest.raises(UsageError, match="specialize: the onnxruntime backend runs one model"):
        tokopt.load(ort.bundle, specialize=True)


@pytest.mark.slow
def test_minilm_in_bf16_and_reference_lm_generation(tmp_path, minilm_dir):
    """Trained weights: MiniLM at the CPU's bf16 (auto here) keeps its embeddings (report, real
    passages); the reference LM's generation bundle decodes greedily like transformers in fp32."""
    res = tokopt.compile(minilm_dir, out=tmp_path / "m", backend="openvino", bench_runs=3, bench_len=64, threads=2)
    assert res.manifest["lowering"]["precision"] in ("bf16", "fp32")
    assert res.report["quality"]["embedding_cosine"] > 0.9995 and res.report["latency"]["precision"]
    from transformers import AutoModelForCausalLM
    lm = tokopt.compile(REFERENCE_LM, out=tmp_path / "g", backend="openvino", precision="fp32", generate=True,
                        measure=False)
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_LM, local_files_only=True).eval()
    model.generation_config.eos_token_id = None
    ids = np.random.default_rng(2).integers(10, 4000, (1, 20))
    with torch.no_grad():
        want = model.generate(torch.from_numpy(ids), max_new_tokens=24, do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(tokopt.load(lm.bundle).generate(input_ids=ids, max_new_tokens=24), want)


def test_passes_ops_convert(tmp_path, model_dir):
    """RSQ's int4 weights (MatMulNBits, which OpenVINO runs on compressed weights) and STILL's
    hybrid attention convert and reproduce the program; TCA is refused by name."""
    res = tokopt.compile(model_dir("llama"), out=tmp_path / "b", backend="openvino", precision="fp32", generate=False,
                         passes="rsq:solver=rtn,importance=none,group_size=16,compute=float", measure=False)
    import openvino as ov
    ops = {op.get_type_name() for op in ov.Core().read_model(str(res.bundle / "model.xml")).get_ops()}
    assert "Convert" in ops   # u4 weights decompressed where they are used
    feed = feed_for("llama", 2, 40)
    got = tokopt.load(res.bundle)(**{k: v.numpy() for k, v in feed.items()})["logits"]
    want = res.program.run(feed)["logits"].numpy()
    assert np.abs(got - want).max() < 1e-3
    # OpenVINO would round these MatMuls' activations to int8 per group on its own (0.056 off on
    # MiniLM's trained weights, 8-bit): the runner turns that off, compute=float means float
    hint = ov.properties.hint.dynamic_quantization_group_size
    assert tokopt.load(res.bundle).models({})[0].get_property(hint) == 0
    with pytest.raises(BackendError, match="cannot take tokopt::tca_attention: its per-KV-head gathers"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "t", backend="openvino", passes="tca:uniform=0.5,window=4",
                       generate=False)
    assert not (tmp_path / "t").exists()


def test_what_openvino_cannot_serve_is_refused(tmp_path, model_dir, monkeypatch):
    with pytest.raises(UsageError, match="bf16 is an OpenVINO precision"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "a", precision="bf16")
    with pytest.raises(UsageError, match="--static-shapes: the onnxruntime backend runs one model.*--backend openvino"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "a", static_shapes=True)
    with pytest.raises(UsageError, match="--static-shapes with --max-drop"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "a", static_shapes=True, max_drop="cosine=0.01")
    with pytest.raises(UsageError, match="--static-shapes with --generate: a generation graph's shapes change"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "a", backend="openvino", static_shapes=True, generate=True)
    with pytest.raises(BackendError, match="not one OpenVINO serves; choose one of x86-cpu, arm64-cpu"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "b", backend="openvino", target="tensorrt")
    import openvino as ov
    if "GPU" not in ov.Core().available_devices:
        with pytest.raises(BackendError, match="needs OpenVINO's GPU device, which this machine does not have"):
            tokopt.compile(model_dir("bert"), out=tmp_path / "c", backend="openvino", target="intel-gpu")
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(UsageError, match="has no bf16"):
            tokopt.compile(model_dir("bert"), out=tmp_path / "d", backend="openvino", precision="bf16")
    monkeypatch.setitem(sys.modules, "openvino", None)   # as if it were not installed
    with pytest.raises(BackendError, match="needs OpenVINO, which is not installed.*tokopt\\[openvino\\]"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "e", backend="openvino")
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_norm_fed_quantizer_scales_stay_fp32(tmp_path, model_dir):
    """W8A8 under bf16: SmoothQuant's per-channel multiply between a LayerNorm and its linears'
    FakeQuantize is marked ``precise`` in the IR (through token_prune's row gather too), so the CPU
    plugin reads the norm's fp32 output without a Reorder to bf16 (the last place one stood before
    each quantized linear); the bundle still reproduces the program."""
    import openvino as ov
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 256, (4, 32)))
    res = tokopt.compile(model_dir("bert"), out=tmp_path / "b", backend="openvino", measure=False,
                         calib=tmp_path / "ids.npy", passes="token_prune:keep=0.5,layers=0,align=4,"
                         "rsq:bits=8,act_bits=8,solver=rtn,importance=none,samples=4,seq_len=32")
    assert res.manifest["lowering"]["fp32_quantizer_inputs"] == 2 * 2   # two norms feed linears, two layers
    model = ov.Core().read_model(str(res.bundle / "model.xml"))
    marked = [op for op in model.get_ops() if "DisablePrecisionConversion_0" in op.get_rt_info()]
    assert len(marked) == 4 and all(op.get_type_name() == "Multiply" for op in marked)
    assert all(i.get_node().get_type_name() == "FakeQuantize" for op in marked for i in op.output(0).get_target_inputs())
    names = {op.get_friendly_name() for op in marked}
    feed = feed_for("bert", 1, 24)
    got = tokopt.load(res.bundle)(**{k: v.numpy() for k, v in feed.items()})["last_hidden_state"]
    want = res.program.run(feed)["last_hidden_state"].numpy()
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert got.shape == want.shape and cos.min() > 0.99
    core = ov.Core()
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16: the marks change nothing at fp32")
    compiled = core.compile_model(model, "CPU", {ov.properties.hint.inference_precision: ov.Type.bf16})
    reorders = [op.get_friendly_name() for op in compiled.get_runtime_model().get_ordered_ops()
                if op.get_rt_info()["layerType"].astype(str) == "Reorder"]
    assert reorders and not [r for r in reorders if any(r.endswith(f"_{n}") for n in names)]


def test_activation_grids_run_on_unsigned_kernels():
    """An activation grid whose zero point would be 128 ([-128, 127] steps) is one OpenVINO reads
    as signed int8, which its CPU plugin runs on a slower int8 x int8 kernel where there is no
    AMX; tokopt's grids never have it: each covers its range, keeps zero exact, is at most 1/127
    coarser than the plain grid (ends within half a step), and reaches OpenVINO's FullyConnected as uint8."""
    import openvino as ov
    from openvino import opset13 as ops

    from tokopt.optimizer.ops.int8 import SIGNED_ZERO, quantize_activation_range
    for low, high in [(-1.0, 127 / 128), (-0.88, 0.873), (-0.897, 0.876), (0.0, 2.0), (-3.0, 0.0), (-1.0, 1.0)]:
        scale, zero = quantize_activation_range(low, high)
        assert zero != SIGNED_ZERO and -zero * scale <= low + scale / 2 and (255 - zero) * scale >= high - scale / 2
        assert scale <= (high - low) / 255 * (1 + 1 / 127) + 1e-12

    def runtime_precision(low, high):
        x = ops.parameter([1, 16, 64], np.float32)
        lo, hi = (ops.constant(np.full((1, 1, 1), v, np.float32)) for v in (low, high))
        w = np.random.default_rng(0).integers(-127, 128, (32, 64)).astype(np.int8)
        wd = ops.multiply(ops.convert(ops.constant(w), np.float32), ops.constant(np.full((32, 1), 0.01, np.float32)))
        y = ops.matmul(ops.fake_quantize(x, lo, hi, lo, hi, 256), wd, False, True)
        compiled = ov.Core().compile_model(ov.Model([y], [x]), "CPU")
        compiled.create_infer_request().infer([np.zeros((1, 16, 64), np.float32)])   # kernels are chosen at a run
        runtime = compiled.get_runtime_model()
        return [op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime.get_ordered_ops()
                if op.get_rt_info()["layerType"].astype(str).startswith("FullyConnected")]

    assert runtime_precision(-128 / 127, 1.0) == ["i8"]   # the grid avoided: OpenVINO goes signed
    scale, zero = quantize_activation_range(-128 / 127, 1.0)
    assert runtime_precision(-zero * scale, (255 - zero) * scale) == ["u8"]
