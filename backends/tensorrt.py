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

__all__ = ["TensorRTBackend", "TensorRTRunner", "ENGINE_FILE", "require_tensorrt", "parser_check", "engine_script", "longest",
           "primitive_attention"]

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


# The ONNX ops TensorRT's parser takes: onnx-tensorrt's docs/operators.md at TensorRT 10.0/10.1 (opsets 9-20),
# then the ops later releases added, with the release (their changelogs: Attention in 10.14, with one output;
# RMSNormalization in 10.15). An op outside both is not parsed by any release.
_PARSED = set("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign
Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile
TopK Transpose Trilu Unsqueeze Upsample Where Xor""".split())
_LATER = {"Attention": "10.14", "RMSNormalization": "10.15"}


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def primitive_attention(target: Target) -> dict | None:
    """``export_onnx``'s ``primitive`` for ``target``: attention as MatMul/Softmax where its TensorRT
    parses no fused Attention (before 10.14: JetPack 6's 10.3), else None."""
    from ..optimizer.ops.attention import attention_primitive
    if target.tensorrt is None or _version(target.tensorrt) >= _version(_LATER["Attention"]):
        return None
    return {"tokopt::attention": attention_primitive}


def parser_check(model_path: Path, tensorrt: str) -> dict:
    """Whether TensorRT ``tensorrt``'s ONNX parser takes the graph at ``model_path``, checked
    statically against its documented operator list and the restrictions tokopt graphs can hit:
    ONNX Runtime contrib ops, ops added after that release, Attention with more than one output,
    Q/DQ with a nonzero zero point or a uint8 grid (TensorRT's int8 is symmetric and signed).
    Returns {"tensorrt", "parses", "ops": counts, "oldest": the oldest release that parses it,
    "problems": one line each}."""
    import onnx_ir as ir
    model = ir.load(str(model_path))
    ops: dict[str, int] = {}
    problems: dict[str, str] = {}
    oldest = "10.0"
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        name = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        ops[name] = ops.get(name, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            problems[name] = f"{name}: not an ONNX op (an ONNX Runtime contrib op); TensorRT parses standard ONNX only"
        elif node.op_type in _LATER:
            since = _LATER[node.op_type]
            oldest = max(oldest, since, key=_version)
            if _version(since) > _version(tensorrt):
                problems[name] = f"{name}: parsed from TensorRT {since}, and the target has {tensorrt}"
            if node.op_type == "Attention" and sum(1 for o in node.outputs[1:] if o.name) > 0:
                problems[name + "/outputs"] = f"{name}: TensorRT takes Attention with one output (this one has more)"
        elif node.op_type not in _PARSED:
            problems[name] = f"{name}: no TensorRT release's ONNX parser takes it"
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.inputs) > 2 and node.inputs[2] is not None:
            zero = ir.convenience.get_const_tensor(node.inputs[2])
            if zero is None or zero.dtype == ir.DataType.UINT8 or np.any(zero.numpy() != 0):
                problems[name + "/zero"] = (f"{name}: a {'uint8' if zero is not None and zero.dtype == ir.DataType.UINT8 else 'nonzero'} "
                                            "zero point; TensorRT's quantization is symmetric int8 (zero point 0), so "
                                            "asymmetric W8A8 activations (rsq act_bits=8) do not build")
    return {"tensorrt": tensorrt, "parses": not problems, "ops": dict(sorted(ops.items())), "oldest": oldest,
            "problems": sorted(problems.values())}


def engine_script(inputs: list[dict], seq_max: int, onnx_file: str = "model.onnx") -> str:
    """``build_engine.sh``: builds the engine on the device with trtexec, over the shapes the bundle
    accepts (the profile the tensorrt backend builds with)."""
    shapes = [_profile_shapes(spec, seq_max) for spec in inputs]

    def flag(i: int) -> str:
        return ",".join(f"{spec['name']}:{'x'.join(map(str, s[i]))}" for spec, s in zip(inputs, shapes))
    return "\n".join([
        "#!/bin/sh",
        "# Build this bundle's TensorRT engine on the device (JetPack ships trtexec in /usr/src/tensorrt/bin).",
        "# The shapes are the range the bundle accepts; extra arguments go to trtexec (e.g. --fp16).",
        "set -e",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        f'"$TRTEXEC" --onnx={onnx_file} --saveEngine=model.engine \\',
        f"    --minShapes={flag(0)} \\", f"    --optShapes={flag(1)} \\", f"    --maxShapes={flag(2)} \\",
        '    "$@"', ""])


# axis kind -> (min, opt, max) given the longest sequence; a generation graph's cache starts empty
_RANGES = {"batch": lambda n: (1, 1, 8), "sequence": lambda n: (1, min(128, n), n),
           "total_sequence": lambda n: (1, min(128, n), n), "past_sequence": lambda n: (0, min(128, n - 1), n - 1),
           "logits": lambda n: (1, 1, n)}


def longest(seq_range) -> int:
    """The longest sequence an engine's profile spans: the bundle's limit, else 512."""
    return (seq_range or (1, 512))[1] or 512


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
        export_onnx(program, onnx_path, fusions=False, primitive=primitive_attention(target))
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
        seq_max = longest(program.seq_range)
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
