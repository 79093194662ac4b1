"""Target profiles: where a bundle will run, and what that asks of each backend.

A target names the ONNX Runtime execution providers in priority order (the first one is
required: a missing provider is an error, never a silent fallback to the CPU), and the choices
its lowering makes for that device: whether ORT's contrib ops may be used (TensorRT parses
standard ONNX only), the signedness of int8 activations (x86's VNNI kernels take u8 x s8; ARM's
dot-product kernels take s8 x s8, and ORT keeps s8 QDQ there), the oldest TensorRT whose parser
must take the graph (JetPack 6 ships 10.3, before ONNX ``Attention`` was parsed), whether the
bundle carries an ORT-format model for a mobile runtime, and the device's thread count.

An *edge* target is built here for a device that is not: its bundle is checked on this
machine's CPU (the same graph on ONNX Runtime's CPU provider), its latency is measured here only
where the CPU is of the same kind, and ``tokopt verify BUNDLE --emulate`` runs an ARM bundle on
ARM code under qemu.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass

from ..optimizer.errors import BackendError, UsageError, did_you_mean

__all__ = ["Target", "TARGETS", "get_target", "require_providers", "host_providers", "host_arch"]


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    providers: tuple[str, ...]
    contrib_fusions: bool = True
    gpu: bool = False
    openvino_device: str | None = None   # the OpenVINO device the openvino backend compiles for
    inductor_device: str | None = None   # the torch device the inductor backend compiles for
    arch: str | None = None              # the CPU a CPU target's code runs on (platform.machine() spelling)
    edge: bool = False                   # built here for a device that is not here
    int8_activations: str = "uint8"      # the activation side of W8A8's QDQ: what the device's int8 GEMM takes
    tensorrt: str | None = None          # the oldest TensorRT whose ONNX parser must take the graph
    ort_format: bool = False             # also write model.ort and its operator list (ORT Mobile, minimal builds)
    threads: int | None = None           # intra-op threads on the device (None: the runtime's default)

    def profile(self) -> dict:
        """The lowering choices this target makes, as the manifest records them."""
        return {"arch": self.arch, "edge": self.edge, "contrib_ops": self.contrib_fusions,
                "int8_activations": self.int8_activations, "tensorrt": self.tensorrt,
                "ort_format": self.ort_format, "threads": self.threads, "precision": "fp32"}


_ARM = dict(arch="aarch64", int8_activations="int8")
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("x86-cpu", "x86-64 server or desktop CPU: ONNX Runtime's CPU provider, OpenVINO's CPU device, or "
           "Inductor's C++ kernels", ("CPUExecutionProvider",), openvino_device="CPU", inductor_device="cpu",
           arch="x86_64"),
    Target("arm64-cpu", "ARM64 Linux CPU (Graviton, Ampere, Raspberry Pi 5): ONNX Runtime's CPU provider with s8 "
           "activations for its dot-product kernels, or Inductor's C++ kernels (built on the device); "
           "tokopt verify --emulate runs it on ARM code here", ("CPUExecutionProvider",), edge=True,
           openvino_device="CPU", inductor_device="cpu", **_ARM),
    Target("android-arm64", "Android phone (arm64-v8a): as arm64-cpu, plus model.ort and required_operators.config "
           "for ONNX Runtime Mobile", ("CPUExecutionProvider",), edge=True, ort_format=True, threads=4, **_ARM),
    Target("ios-arm64", "iPhone/iPad (arm64): as android-arm64", ("CPUExecutionProvider",), edge=True,
           ort_format=True, threads=4, **_ARM),
    Target("intel-gpu", "Intel integrated or Arc GPU through OpenVINO (--backend openvino)",
           ("OpenVINOExecutionProvider",), contrib_fusions=False, gpu=True, openvino_device="GPU"),
    Target("intel-npu", "Intel NPU (Core Ultra) through OpenVINO (--backend openvino)",
           ("OpenVINOExecutionProvider",), contrib_fusions=False, openvino_device="NPU"),
    Target("cuda", "NVIDIA GPU through ONNX Runtime's CUDA provider (CPU for unsupported ops), or Inductor's "
           "Triton kernels", ("CUDAExecutionProvider", "CPUExecutionProvider"), gpu=True, inductor_device="cuda"),
    Target("tensorrt", "NVIDIA GPU through ONNX Runtime's TensorRT provider, then CUDA (standard ONNX that "
           "TensorRT 10.14+ parses)", ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
           contrib_fusions=False, gpu=True, tensorrt="10.14"),
    Target("jetson-orin", "NVIDIA Jetson Orin, JetPack 6 (TensorRT 10.3): standard ONNX with attention as MatMul/"
           "Softmax, and build_engine.sh to build the engine on the device with trtexec",
           ("TensorrtExecutionProvider", "CUDAExecutionProvider"), contrib_fusions=False, gpu=True, edge=True,
           arch="aarch64", tensorrt="10.3"),
)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UsageError(f"unknown target '{name}'.{did_you_mean(name, TARGETS)} "
                         f"Known targets: {', '.join(TARGETS)} (see `tokopt targets`).")
    return TARGETS[name]


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


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


def host_providers(target: Target) -> tuple[list[str], str | None]:
    """(providers, note): where this machine runs a bundle for ``target`` to check it. An edge
    target whose device is not here runs on the CPU provider, and the note says so; any other
    target needs its own providers."""
    if target.edge:
        try:
            providers = require_providers(target)
        except BackendError:
            providers = ["CPUExecutionProvider"]
        if providers[0] == "CPUExecutionProvider" and target.arch == host_arch():
            return providers, None
        device = f"{target.arch}{', ' + target.providers[0] if target.gpu else ''}"
        return providers, (f"measured on this {host_arch()} machine's {providers[0]}, not on the target's device "
                           f"({device}); `tokopt verify --emulate` runs an ARM CPU bundle on ARM code")
    return require_providers(target), None
