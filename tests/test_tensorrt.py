"""The TensorRT backend: what can be checked without TensorRT, and the real build where it exists."""
from __future__ import annotations

import importlib.util

import onnx
import pytest

import tokopt
from tokopt.backends.onnxruntime import export_onnx
from tokopt.optimizer.errors import BackendError

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed; the missing-TensorRT message is not reachable")
def test_missing_tensorrt_is_a_clear_error(tmp_path, model_dir):
    with pytest.raises(BackendError, match="needs NVIDIA TensorRT.*--backend onnxruntime"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "b", backend="tensorrt", target="tensorrt")
    assert not (tmp_path / "b").exists()


def test_onnx_for_tensorrt_is_standard(tmp_path, model_dir):
    """The graph TensorRT would parse: default-domain ops only (no ORT contrib fusions)."""
    from tokopt.optimizer.compile import plan_passes
    from tokopt.optimizer.pass_manager import PassManager, resolve
    prog = PassManager(resolve(plan_passes())).run(tokopt.capture(model_dir("llama")))
    export_onnx(prog, tmp_path / "m.onnx", fusions=False)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert sum(n.op_type == "Attention" for n in model.graph.node) == 2


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (its libraries come only from NVIDIA's index)")
def test_tensorrt_engine_matches_eager(tmp_path, model_dir):
    import numpy as np
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    res = tokopt.compile(model_dir("bert"), out=tmp_path / "b", backend="tensorrt", target="tensorrt",
                         measure=False)
    ids = torch.randint(10, 256, (2, 24))
    got = tokopt.load(res.bundle)(input_ids=ids.numpy(), attention_mask=np.ones((2, 24), np.int64))
    ref = res.program.module(input_ids=ids).last_hidden_state.detach().numpy()
    assert np.abs(got["last_hidden_state"] - ref).max() < 1e-3
