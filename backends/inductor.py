"""Inductor backend: Program -> an AOTInductor package (``model.pt2``): C++ kernels on a CPU, Triton on a GPU.

Lowering: the post-pass ``ExportedProgram`` is compiled by ``torch._inductor.aoti_compile_and_package``
with its dynamic batch and sequence axes. tokopt ops reach Inductor in one of three forms:

- decomposed (the default): replaced by the ATen ops of their torch reference before lowering, so
  Inductor fuses them with their neighbours and the package calls no Python for them;
- called (``OPAQUE``: ops Inductor cannot trace, TCA's): the op stays one node, which AOTInductor's
  proxy executor runs through the dispatcher: the torch reference on a CPU, the op's Triton kernel
  on a GPU (registered as its CUDA implementation). The loading process must have tokopt imported;
- traced Triton (``--target cuda``, the kernels whose torch side traces: ``matmul_nbits``): a
  ``torch.library.triton_op`` that Inductor traces into, so AOTInductor compiles the kernel into
  the package with the graph's own code around it.

On a CPU, ``linear_w8a8`` (rsq's W8A8) is first rewritten into PT2E's quantized form (static scale
and zero point as constants, int8 weights dequantized per channel, ``aten.linear``), which
Inductor, with freezing and under no_grad, lowers onto oneDNN's int8 linear; the manifest counts
how many it placed there. ``REFUSED`` ops have no correct path on a CPU and are refused by name before the C++ build.
Inductor's compiled kernels are cached (its own FX graph and code caches, under
``TORCHINDUCTOR_CACHE_DIR``), so compiling the same graph again, or the no-pass baseline the report
times, skips most of the C++ build. A package is tied to the torch that built it: the runner
refuses one built by another torch version.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..optimizer.errors import BackendError, BundleError
from ..optimizer.program import Program
from ..optimizer.report import Bench, time_lengths, verification_feeds
from ..optimizer.runtime import Backend, Runner, register_backend
from ..optimizer.ops import is_exact
from .onnxruntime import disagreement, export_baseline, make_session, program_reference
from .targets import TARGETS, Target, get_target, host_arch
from .triton import KERNELS, graph_ops, register_cuda_kernels

__all__ = ["InductorBackend", "InductorRunner", "MODEL_FILE", "graph_for"]

MODEL_FILE = "model.pt2"
# ops Inductor cannot take decomposed, and why: they stay calls of the op in the package, run by
# its registered CPU implementation (the torch reference) through AOTInductor's proxy executor
OPAQUE = {
    "tokopt::tca_attention": "its reference sizes tensors by computed values (each head's key budget); traced "
                             "with a size bound instead, torch 2.13's AOTInductor built a package that fails "
                             "at lengths other than the probe's",
    "tokopt::tca_cache_attention": "its compacted cache's length is a computed value, as in tca_attention",
    "tokopt::tca_keep": "the number of entries it keeps is a computed value (none at a decode step)",
}
# ops the backend cannot take at all on a CPU, and why (checked before the C++ build)
REFUSED = {
    "tokopt::still_attention": "decomposed, its chunking specialises the graph to the probe's number of chunks "
                               "(and torch 2.13's C++ vectorizer does not compile the result); called as an opaque "
                               "op, AOTInductor's proxy executor returns wrong values for it",
}


def graph_for(program: Program, device: str):
    """The program's ExportedProgram as Inductor gets it on ``device``: tokopt ops decomposed into
    their references, except the ``OPAQUE`` ones and, on a GPU, those a Triton kernel serves (as a
    triton_op traced into the package, or as the op's CUDA implementation, called); weights moved
    to the device."""
    import torch
    from ..optimizer.ops import decompose
    if device == "cpu":
        return decompose(program.ep, keep=lambda spec: spec.name in OPAQUE)
    called = register_cuda_kernels()
    ep = decompose(program.ep, keep=lambda spec: spec.name in OPAQUE or spec.name in called, replace=graph_ops())
    return torch.export.passes.move_to_device_pass(ep, device)


def int8_linears(program: Program) -> tuple[Program, int]:
    """Each ``linear_w8a8`` in PT2E's quantized form, which Inductor (freezing, under no_grad) lowers
    onto oneDNN's int8 linear (``qlinear_pointwise``: u8 activations x s8 weights, VNNI/AMX): the
    activation's static scale and zero point as constants, the weights [N, K] int8 dequantized per
    output channel, ``aten.linear``. Returns the program and how many linears it rewrote."""
    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines the quantized_decomposed ops)
    from ..optimizer.ops import LINEAR_W8A8
    from ..optimizer.program import inherit_meta
    qd = torch.ops.quantized_decomposed
    rw = program.edit()   # new weights and nodes, no input or output changes: no re-export
    nodes = [n for n in rw.graph.nodes if LINEAR_W8A8.matches(n)]
    for i, n in enumerate(nodes):
        x, w, w_scale, x_scale, x_zero, *bias = n.args
        scale, zero, weight = float(rw.tensor(x_scale)), int(rw.tensor(x_zero)), rw.tensor(w)
        w_t = rw.constant(f"int8_weight_{i}", weight.t().contiguous())
        w_zero = rw.constant(f"int8_zero_{i}", torch.zeros(weight.shape[1], dtype=torch.int64))
        with rw.graph.inserting_before(n):
            xq = rw.graph.call_function(qd.quantize_per_tensor.default, (x, scale, zero, 0, 255, torch.uint8))
            xd = rw.graph.call_function(qd.dequantize_per_tensor.default, (xq, scale, zero, 0, 255, torch.uint8))
            wd = rw.graph.call_function(qd.dequantize_per_channel.default,
                                        (w_t, w_scale, w_zero, 0, -128, 127, torch.int8))
            y = rw.graph.call_function(torch.ops.aten.linear.default, (xd, wd, bias[0] if bias else None))
        inherit_meta(y, n)
        n.replace_all_uses_with(y)
    return (rw.commit("the inductor backend's int8 linears") if nodes else program), len(nodes)


def _how(name: str, device: str) -> str:
    """How op ``name`` runs in a package for ``device`` (the manifest's words)."""
    if device == "cpu" and name == "tokopt::linear_w8a8":
        return "int8 linear (PT2E's quantized form, oneDNN qlinear)"
    if device == "cuda" and name in graph_ops():
        return "triton kernel, in the package"
    if device == "cuda" and name in KERNELS:   # the rest of them are the op's CUDA implementation
        return "triton kernel, called"
    return "torch reference, called" if name in OPAQUE else "decomposed"


def _package(ep, path: Path, freezing: bool = False) -> None:
    """AOTInductor's package of ``ep`` at ``path``. ``freezing`` folds the weights in as constants,
    which Inductor's int8 patterns need (they prepack the weights for oneDNN), and only under no_grad."""
    import torch
    try:
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(ep, package_path=str(path.resolve()),
                                                     inductor_configs={"freezing": True} if freezing else {})
    except Exception as e:
        raise BackendError(f"AOTInductor could not compile the graph: {str(e).strip().splitlines()[0][:300]}. "
                           "Rerun with --debug for Inductor's log, or use --backend onnxruntime.") from e


def _wrapper(path: Path) -> str:
    """The C++ wrapper code AOTInductor wrote into the package at ``path``."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        return "".join(z.read(n).decode(errors="ignore") for n in z.namelist() if n.endswith("wrapper.cpp"))


def _load(path: Path):
    import torch
    return torch._inductor.aoti_load_package(str(path))


def _call(model, device: str, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch
    args = [torch.from_numpy(np.ascontiguousarray(feed[n])).to(device) for n in names]
    with torch.no_grad():
        out = model(*args)
    return [o.cpu().numpy() for o in (out if isinstance(out, (list, tuple)) else [out])]


class InductorRunner(Runner):
    def __init__(self, bundle: Path, manifest: dict, threads: int | None = None):
        import torch
        super().__init__(bundle, manifest)
        built, have = (manifest.get("versions") or {}).get("torch"), torch.__version__
        if built is not None and built.split("+")[0] != have.split("+")[0]:
            raise BundleError(f"{bundle} holds an AOTInductor package built by torch {built}; the installed torch "
                              f"is {have}, and a package only loads in the torch that built it. Install "
                              f"torch=={built.split('+')[0]}, or recompile the bundle with this torch.")
        self.device = manifest["lowering"]["device"]
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"{bundle} was built for a CUDA GPU and torch sees none here. Run it on a GPU "
                               "machine, or compile for --target x86-cpu.")
        if threads:
            torch.set_num_threads(threads)   # Inductor's OpenMP loops and ATen's kernels both follow it
        if self.device == "cuda":
            register_cuda_kernels()          # the ops the package calls run their Triton kernels
        self.model = _load(Path(bundle) / MODEL_FILE)
        self.names = [i["name"] for i in manifest["inputs"]]

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return _call(self.model, self.device, self.names, feed)


def _check_runs(program: Program, path: Path, device: str) -> None:
    """The package reproduces the program on the probe and on shapes the export never saw, to the
    closeness every backend's lowering is held to (``disagreement``), else a BackendError."""
    model = _load(path)
    why = disagreement(lambda feed: _call(model, device, program.input_names, feed), verification_feeds(program),
                       program_reference(program), is_exact(program.graph))
    if why is not None:
        raise BackendError(f"the AOTInductor package does not reproduce the graph: {why}. This is a tokopt or "
                           "Inductor bug; use --backend onnxruntime, and report it.")


@register_backend
class InductorBackend(Backend):
    name = "inductor"
    runner_cls = InductorRunner
    lowering_note = "Inductor's C++ build takes a minute or more on a few cores; a graph it has built before is cached"

    def target(self, name: str) -> Target:
        import torch
        target = get_target(name)
        if target.inductor_device is None:
            served = ", ".join(t for t, spec in TARGETS.items() if spec.inductor_device)
            raise BackendError(f"target '{name}' is not one the inductor backend serves; choose one of {served}, "
                               "or another backend for it.")
        if target.inductor_device == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"target '{name}' compiles Triton kernels for a CUDA GPU, and torch sees none on this "
                               "machine (a CPU build of torch, or no GPU). Compile on a machine with an NVIDIA GPU and "
                               "a CUDA build of torch, or choose --target x86-cpu.")
        if target.inductor_device == "cpu" and target.arch != host_arch():
            raise BackendError(f"target '{name}': Inductor builds C++ for the machine it runs on, and this one is "
                               f"{host_arch()}. Compile the bundle on a {target.arch} machine, or use "
                               "--backend onnxruntime, whose bundles are portable.")
        return target

    def lower(self, program: Program, out_dir: Path, target: Target, precision: str = "auto") -> dict:
        import torch
        from ..optimizer.ops import OPS
        device = target.inductor_device
        for name, why in REFUSED.items():
            if device == "cpu" and any(OPS[name].matches(n) for n in program.graph.nodes):
                raise BackendError(f"the inductor backend cannot take {name} on a CPU: {why}. Use --backend "
                                   "onnxruntime for this pass.")
        lowered, int8 = int8_linears(program) if device == "cpu" else (program, 0)
        _package(graph_for(lowered, device), out_dir / MODEL_FILE, freezing=int8 > 0)
        _check_runs(program, out_dir / MODEL_FILE, device)
        used = sorted({spec.name for n in program.graph.nodes for spec in OPS.values() if spec.matches(n)})
        info = {"model": MODEL_FILE, "device": device, "torch": torch.__version__,
                "ops": {name: _how(name, device) for name in used}}
        if int8:   # how many of them Inductor put on oneDNN's int8 kernel
            info["int8_linears"] = {"rewritten": int8, "qlinear_calls": _wrapper(out_dir / MODEL_FILE).count(
                "qlinear_pointwise")}
        return info

    def latency(self, captured: Program, bundle_dir: Path, target: Target, bench: Bench, lengths: list[int],
                threads: int | None, manifest: dict) -> list[dict]:
        """The bundle against the no-pass program through the same backend (AOTInductor of the plain
        export; Inductor's cache makes it cheap after the first time) and against ONNX Runtime's
        plain export, same feed, same run, at each length."""
        import tempfile
        device = manifest["lowering"]["device"]
        ours = InductorRunner(bundle_dir, manifest, threads=threads)
        base = size = ort = None
        if bench.baseline:
            with tempfile.TemporaryDirectory() as tmp:
                _package(graph_for(captured, device), Path(tmp) / MODEL_FILE)
                base = _load(Path(tmp) / MODEL_FILE)
                size = (Path(tmp) / MODEL_FILE).stat().st_size
                if device == "cpu":
                    export_baseline(captured, Path(tmp) / "baseline.onnx")
                    ort = make_session(Path(tmp) / "baseline.onnx", ["CPUExecutionProvider"], threads)
        return time_lengths(captured, lengths, bench,
                            ours=lambda feed: functools.partial(ours._run, ours._feed(feed)),
                            baseline=None if base is None else (lambda feed: lambda: _call(base, device, captured.input_names, feed)),
                            baseline_bytes=size, threads=threads, device=device,
                            others={"onnxruntime": lambda feed: lambda: ort.run(None, feed)} if ort else None)
