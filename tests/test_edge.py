"""Edge targets: the lowering each one chooses, the ORT-format model, TensorRT's parser check,
and ARM bundles run on ARM code under qemu (``tokopt verify --emulate``)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import tokopt
from tokopt.backends import emulate
from tokopt.backends.onnxruntime import OnnxRuntimeBackend
from tokopt.backends.targets import TARGETS
from tokopt.backends.tensorrt import parser_check
from tokopt.cli import main
from tokopt.optimizer.compile import plan_passes
from tokopt.optimizer.errors import BackendError, UsageError
from tokopt.optimizer.pass_manager import plan

W8A8 = "rsq:bits=8,act_bits=8,solver=rtn,importance=none,samples=4,seq_len=32"


def _zero_points(path) -> set[str]:
    """The dtypes of the QuantizeLinear zero points in the ONNX model at ``path``."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return {onnx.helper.tensor_dtype_to_np_dtype(inits[n.input[2]].data_type).name
            for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits}


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory, model_dir):
    """A config-built BERT's W8A8 bundle for x86 (u8 activations) and for ARM (s8)."""
    root = tmp_path_factory.mktemp("w8a8")
    np.save(root / "ids.npy", np.random.default_rng(0).integers(0, 256, (4, 32)))
    return {t: tokopt.compile(model_dir("bert"), out=root / t, passes=W8A8, target=t, calib=root / "ids.npy",
                              measure=False) for t in ("x86-cpu", "arm64-cpu")}


def test_arm_targets_take_int8_activations(w8a8):
    """ARM's dot-product kernels take s8 x s8 (ORT keeps s8 QDQ there), x86's VNNI u8 x s8: the same
    grid, re-encoded (zero point - 128), so both bundles compute the same values."""
    x86, arm = (w8a8[t].bundle / "model.onnx" for t in ("x86-cpu", "arm64-cpu"))
    assert _zero_points(x86) == {"uint8"} and _zero_points(arm) == {"int8"}
    lowering = w8a8["arm64-cpu"].manifest["lowering"]
    assert lowering["int8_activations"] == len(_quantize_nodes(arm)) > 0
    assert lowering["target_profile"]["int8_activations"] == "int8"
    assert "int8_activations" not in w8a8["x86-cpu"].manifest["lowering"]
    ids = np.random.default_rng(0).integers(5, 90, (2, 24))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    a, b = (tokopt.load(w8a8[t].bundle)(**feed)["last_hidden_state"] for t in ("x86-cpu", "arm64-cpu"))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)   # integer GEMM here vs float Q/DQ there


def _quantize_nodes(path):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"]


def test_tensorrt_refuses_asymmetric_int8(w8a8, tmp_path):
    """TensorRT's int8 is symmetric: W8A8's uint8 activations are refused by name for Jetson."""
    with pytest.raises(BackendError, match="TensorRT 10.3.*QuantizeLinear: a uint8 zero point"):
        OnnxRuntimeBackend().lower(w8a8["x86-cpu"].program, tmp_path, TARGETS["jetson-orin"])


def test_mobile_targets_ship_an_ort_format_model(tmp_path, model_dir):
    result = tokopt.compile(model_dir("bert"), out=tmp_path / "b", target="android-arm64", bench_runs=0)
    low = result.manifest["lowering"]
    assert low["ort_model"] == "model.ort" and (tmp_path / "b" / "model.ort").stat().st_size > 0
    config = (tmp_path / "b" / "required_operators.config").read_text().splitlines()
    assert any(line.startswith("com.microsoft;1;") and "SkipLayerNormalization" in line for line in config)
    assert any(line.startswith("ai.onnx;23;") and "Attention" in line for line in config)
    assert result.report["size_bytes"]["tokopt"] == (tmp_path / "b" / "model.ort").stat().st_size
    assert low["target_profile"] == TARGETS["android-arm64"].profile() and low["target_profile"]["threads"] == 4
    assert "x86_64" in result.report["checked_on"] and result.report["quality"]["max_abs_error"]["last_hidden_state"] < 1e-4


def test_jetson_gets_attention_tensorrt_10_3_parses(tmp_path, model_dir):
    """JetPack 6's TensorRT (10.3) parses no fused Attention: the decoder's attention is lowered to
    MatMul/Softmax (checked against the program by the export), the parser check passes, and
    build_engine.sh carries the shape profile; the tensorrt target (10.14+) keeps Attention."""
    jetson = tokopt.compile(model_dir("llama"), out=tmp_path / "j", target="jetson-orin", generate=True, measure=False)
    model = onnx.load(str(tmp_path / "j" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "Attention" not in ops and ops.count("Softmax") == 2 and {n.domain for n in model.graph.node} <= {""}
    check = jetson.manifest["lowering"]["tensorrt_check"]
    assert check["parses"] and check["tensorrt"] == "10.3" and check["oldest"] == "10.0"
    script = (tmp_path / "j" / "build_engine.sh").read_text()
    assert "--onnx=model.onnx" in script and "--minShapes=input_ids:1x1," in script and "past_key_0:1x2x0x" in script
    info = OnnxRuntimeBackend().lower(jetson.program, tmp_path / "t", TARGETS["tensorrt"])
    assert info["tensorrt_check"]["parses"] and info["tensorrt_check"]["oldest"] == "10.14"
    stale = parser_check(tmp_path / "t" / "model.onnx", "10.3")
    assert not stale["parses"] and stale["problems"] == ["Attention: parsed from TensorRT 10.14, and the target has 10.3"]


def test_tensorrt_targets_refuse_the_int8_compute_kernel(tmp_path, model_dir):
    """rsq's int8 compute is MatMulNBits' accuracy_level 4, a contrib kernel: asked for on a TensorRT
    target it is refused before the model is read; compute=auto becomes float there, and the plan says so."""
    with pytest.raises(UsageError, match=r"rsq:compute=int8 runs MatMulNBits on int8 activations \(accuracy_level "
                                         r"4\).*target 'jetson-orin' parses standard ONNX only. Use compute=float"):
        tokopt.compile(tmp_path / "not-read", out=tmp_path / "a", target="jetson-orin", passes="rsq:compute=int8")
    assert not (tmp_path / "a").exists()
    rsq = plan(plan_passes("rsq")).passes[-1]
    fitted, note = rsq.for_standard_onnx("jetson-orin")
    assert fitted.options.compute == "float" and rsq.options.compute == "auto"
    assert note == "rsq: compute=auto is float for target 'jetson-orin' (int8 compute is an ONNX Runtime contrib kernel)"
    w8a8 = plan(plan_passes(W8A8)).passes[-1]
    assert w8a8.for_standard_onnx("jetson-orin") == (w8a8, None)   # QDQ int8: what TensorRT runs


def test_tensorrt_check_names_contrib_ops(tmp_path, model_dir):
    tokopt.compile(model_dir("bert"), out=tmp_path / "x", measure=False)
    check = parser_check(tmp_path / "x" / "model.onnx", "10.14")
    assert not check["parses"]
    assert "com.microsoft::SkipLayerNormalization: not an ONNX op (an ONNX Runtime contrib op); TensorRT parses " \
           "standard ONNX only" in check["problems"]


def test_verify_compares_with_the_original(tmp_path, minilm_dir, capsys):
    tokopt.compile(minilm_dir, out=tmp_path / "m", measure=False)
    assert main(["verify", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "bundle here vs the original model:" in out and "cosine 1.000000" in out
    with pytest.raises(UsageError, match="--emulate runs ARM bundles on ARM code; this one is for x86-cpu"):
        tokopt.verify(tmp_path / "m", emulate=True)


def test_emulation_not_set_up_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOKOPT_EMULATOR_DIR", str(tmp_path / "none"))
    why = emulate.missing()
    assert why is not None and ("qemu-user-static" in why or "tokopt verify --setup" in why)
    with pytest.raises(BackendError, match="cannot run on emulated ARM code"):
        emulate.run(tmp_path / "model.onnx", [])
    assert main(["verify"]) == 2
    assert "needs a bundle folder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not emulate.ready(), reason=f"no emulated ARM runtime here: {emulate.missing()}")
def test_arm_bundles_run_on_arm_code(tmp_path, minilm_dir):
    """The shipped MiniLM (no pass, for android-arm64: its model.ort is what runs) and the reference LM
    (int4 on int8 compute, a generation bundle, arm64-cpu), run by the aarch64 ONNX Runtime under
    qemu: equal to the run here (exact graph: allclose 1e-3/1e-4; int8 compute: as faithful to the
    original as the run here)."""
    tokopt.compile(minilm_dir, out=tmp_path / "m", target="android-arm64", measure=False)
    tokopt.compile("models/reference-lm", out=tmp_path / "lm", target="arm64-cpu", generate=True, measure=False,
                   passes="rsq:bits=4,solver=rtn,importance=none,rotate=off,compute=int8")
    for name, model in (("m", "model.ort"), ("lm", "model.onnx")):
        result = tokopt.verify(tmp_path / name, emulate=True)
        e = result["emulated"]
        assert result["ok"] and e["info"]["machine"] == "aarch64" and e["info"]["model"] == model, json.dumps(e)
        assert all(s["cosine"] > 0.999 for s in result["original"]["vs_bundle_here"].values() if name == "m")
    assert e["info"]["kernels"].get("MatMulNBits") and e["info"]["kernels"].get("GroupQueryAttention")
