"""TensorRT backend: Program -> standard ONNX (no ORT contrib ops) -> serialized TensorRT engine.

Written against TensorRT 10's Python API (``Builder`` with an explicit-batch network,
``OnnxParser``, an optimisation profile spanning the dynamic batch/sequence range,
``build_serialized_network``; at run time ``Runtime.deserialize_cuda_engine`` and
``execute_async_v3`` on torch CUDA buffers). Where TensorRT or a GPU is missing, choosing this
backend is an error that says so before anything is built; no engine is ever pretended.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..optimizer.errors import BackendError
from ..optimizer.program import Program
from ..optimizer.runtime import Backend, Runner, register_backend
from .onnxruntime import export_onnx
from .targets import Target, get_target

__all__ = ["TensorRTBackend", "TensorRTRunner", "ENGINE_FILE", "require_tensorrt"]

ENGINE_FILE = "model.engine"
ONNX_FILE = "model.onnx"


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError("the tensorrt backend needs NVIDIA TensorRT, which is not installed. "
                           "Install it (pip install 'tokopt[tensorrt]') on a machine with an NVIDIA "
                           "GPU, or use --backend onnxruntime.") from None
    import torch
    if not torch.cuda.is_available():
        raise BackendError("the tensorrt backend needs a CUDA GPU and none is visible to torch. "
                           "Run on a GPU machine, or use --backend onnxruntime --target x86-cpu.")
    return trt


# axis kind -> (min, opt, max) given the longest sequence; a generation graph's cache starts empty
_RANGES = {"batch": lambda n: (1, 1, 8), "sequence": lambda n: (1, min(128, n), n),
           "total_sequence": lambda n: (1, min(128, n), n), "past_sequence": lambda n: (0, min(128, n - 1), n - 1)}


def _profile_shapes(spec: dict, seq_max: int) -> tuple[tuple, tuple, tuple]:
    dims = [_RANGES[d](seq_max) if d in _RANGES else (d, d, d) for d in spec["shape"]]
    return tuple(zip(*dims)) if dims else ((), (), ())


@register_backend
class TensorRTBackend(Backend):
    name = "tensorrt"

    def target(self, name: str) -> Target:
        require_tensorrt()
        return get_target(name)

    def lower(self, program: Program, out_dir: Path, target: Target, precision: str = "auto") -> dict:
        trt = require_tensorrt()
        from ..optimizer.compile import io_spec
        onnx_path = out_dir / ONNX_FILE
        export_onnx(program, onnx_path, fusions=False)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT's ONNX parser rejected the graph: {errors}")
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        inputs, _ = io_spec(program)
        seq_max = (program.seq_range or (1, 512))[1] or 512
        for spec in inputs:
            profile.set_shape(spec["name"], *_profile_shapes(spec, seq_max))
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise BackendError("TensorRT could not build an engine for this graph (see its log above).")
        (out_dir / ENGINE_FILE).write_bytes(bytes(engine))
        onnx_path.unlink()
        return {"model": ENGINE_FILE}


class TensorRTRunner(Runner):
    def __init__(self, bundle: Path, manifest: dict, threads: int | None = None):
        super().__init__(bundle, manifest)
        trt = require_tensorrt()
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            (Path(bundle) / ENGINE_FILE).read_bytes())
        self.context = self.engine.create_execution_context()

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch
        stream = torch.cuda.current_stream()
        keep = {}
        for name, arr in feed.items():
            keep[name] = torch.from_numpy(np.ascontiguousarray(arr)).cuda()
            self.context.set_input_shape(name, tuple(arr.shape))
            self.context.set_tensor_address(name, keep[name].data_ptr())
        outs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, device="cuda", dtype=torch.float32)
            self.context.set_tensor_address(name, t.data_ptr())
            outs.append(t)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError("TensorRT execution failed.")
        stream.synchronize()
        return [t.cpu().numpy() for t in outs]


TensorRTBackend.runner_cls = TensorRTRunner
