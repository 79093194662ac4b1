"""Target profiles: where a bundle will run, and what that asks of each backend.

A target names the ONNX Runtime execution providers in priority order (the first one is
required: a missing provider is an error, never a silent fallback to the CPU), whether ORT's
contrib-op fusions may be used (TensorRT parses standard ONNX only), and the default backend.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..optimizer.errors import BackendError, UsageError, did_you_mean

__all__ = ["Target", "TARGETS", "get_target", "require_providers"]


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    providers: tuple[str, ...]
    contrib_fusions: bool = True
    gpu: bool = False
    openvino_device: str | None = None   # the OpenVINO device the openvino backend compiles for
    inductor_device: str | None = None   # the torch device the inductor backend compiles for


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("x86-cpu", "x86-64 server or desktop CPU: ONNX Runtime's CPU provider, OpenVINO's CPU device, or "
           "Inductor's C++ kernels",
           ("CPUExecutionProvider",), openvino_device="CPU", inductor_device="cpu"),
    Target("arm64-cpu", "ARM64 CPU (Graviton, Apple silicon, Raspberry Pi): ONNX Runtime's CPU provider, "
           "OpenVINO's CPU device, or Inductor's C++ kernels (built on the device)", ("CPUExecutionProvider",),
           openvino_device="CPU", inductor_device="cpu"),
    Target("intel-gpu", "Intel integrated or Arc GPU through OpenVINO (--backend openvino)",
           ("OpenVINOExecutionProvider",), contrib_fusions=False, gpu=True, openvino_device="GPU"),
    Target("intel-npu", "Intel NPU (Core Ultra) through OpenVINO (--backend openvino)",
           ("OpenVINOExecutionProvider",), contrib_fusions=False, openvino_device="NPU"),
    Target("cuda", "NVIDIA GPU through ONNX Runtime's CUDA provider (CPU for unsupported ops), or Inductor's "
           "Triton kernels", ("CUDAExecutionProvider", "CPUExecutionProvider"), gpu=True, inductor_device="cuda"),
    Target("tensorrt", "NVIDIA GPU through ONNX Runtime's TensorRT provider, then CUDA",
           ("TensorrtExecutionProvider", "CUDAExecutionProvider"), contrib_fusions=False, gpu=True),
    Target("jetson-orin", "NVIDIA Jetson Orin (TensorRT provider, then CUDA)",
           ("TensorrtExecutionProvider", "CUDAExecutionProvider"), contrib_fusions=False, gpu=True),
)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UsageError(f"unknown target '{name}'.{did_you_mean(name, TARGETS)} "
                         f"Known targets: {', '.join(TARGETS)} (see `tokopt targets`).")
    return TARGETS[name]


def require_providers(target: Target) -> list[str]:
    import onnxruntime as ort
    have = ort.get_available_providers()
    need = target.providers[0]
    if need not in have:
        hint = ("install onnxruntime-gpu (pip install 'tokopt[gpu]') on a machine with an NVIDIA "
                "GPU and its drivers" if target.gpu else "reinstall onnxruntime")
        raise BackendError(f"target '{target.name}' needs ONNX Runtime's {need}, which the installed "
                           f"onnxruntime does not provide (it has: {', '.join(have)}). To fix: {hint}, "
                           "or pick a target this machine has, such as --target x86-cpu.")
    return [p for p in target.providers if p in have]
