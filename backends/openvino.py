"""OpenVINO backend: Program -> tokopt's standard ONNX -> OpenVINO IR (``model.xml``/``model.bin``).

Conversion: the post-pass program is exported to ONNX without ONNX Runtime's graph fusions
(every tokopt op decomposed or in its hand lowering: ``MatMulNBits`` and ``GatherBlockQuantized``
for low-bit weights, which OpenVINO's ONNX frontend turns into compressed-weight kernels;
``QuantizeLinear``/``DequantizeLinear`` pairs for quantized activations, which it turns into
``FakeQuantize`` on its integer kernels), checked against the program in ONNX Runtime, and handed
to OpenVINO's own converter (``ov.convert_model``). Going through tokopt's ONNX rather than
``convert_model(ExportedProgram)`` reuses one verified lowering of every tokopt op (OpenVINO's
PyTorch frontend has no rule for custom ops) and gives OpenVINO the QDQ form it quantizes from.
ONNX Runtime's OpenVINO execution provider (``onnxruntime-openvino``) would be another route; it
replaces the ``onnxruntime`` package itself, lagging its releases, so tokopt uses OpenVINO's own
runtime beside ONNX Runtime.

Precision is a hint per target: ``auto`` is bf16 on a CPU that has it (AVX-512 BF16, AMX), fp32
elsewhere; ``fp32`` and ``bf16`` can be asked for, and bf16 on a CPU without it is refused. The
report measures the bundle's quality at the precision it runs.

Attention: OpenVINO's ONNX frontend follows each ``Attention`` by ``Select(IsNaN(y), 0, y)``, so a
query row with no key to attend to (SDPA's NaN) gives zeros; on this CPU those two nodes cost 6-7%
of a W8A8 MiniLM call. The lowering makes such rows impossible instead: each attention's mask
keeps every key in a row where it kept none (the row then averages the values, as attention with
a large negative additive mask does, where SDPA gives zeros: a sequence of padding only, or a
left-padded row's padding, whose outputs nothing reads; finite, so no NaN reaches later layers
through the values), and the guards are dropped from the converted model. An attention whose
causality is a flag beside its mask (the frontend folds the two into one mask) cannot be fixed
that way: a graph with one keeps every guard.

W8A8 under a bf16 hint: the CPU plugin runs LayerNorm in fp32 and SmoothQuant's per-channel multiply
after it in bf16, with a Reorder between, only for the FakeQuantize after the multiply to make
uint8 of it. Those multiplies (``quantizer_inputs_kept_fp32``) are marked ``precise`` in the IR and
stay fp32: one node fewer before each quantized linear (measured in the README, peers section).

A device that compiles static shapes only (OpenVINO's NPU) gets one model per input shape,
reshaped and compiled on first use, the last ``STATIC_MODELS`` kept, as does a bundle compiled
with ``--static-shapes``. Static shapes let OpenVINO fold every shape computation and plan memory
once; a length's first call pays the compile. The CPU and GPU run one dynamic model, and the
runner of an encoder-sized bundle compiles the shapes it is called with often as models of their
own in a background thread (``specialize``), so no call waits for a compile and the frequent
lengths run as fast as static ones.
"""
from __future__ import annotations

import tempfile
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..optimizer.errors import BackendError, UsageError
from ..optimizer.program import Program
from ..optimizer.report import Bench, time_lengths, verification_feeds
from ..optimizer.runtime import Backend, Runner, register_backend
from .onnxruntime import export_baseline, export_onnx, program_reference
from .targets import TARGETS, Target, get_target

__all__ = ["OpenVinoBackend", "OpenVinoRunner", "require_openvino", "MODEL_FILE"]

MODEL_FILE = "model.xml"
PRECISIONS = ("auto", "fp32", "bf16")
STATIC_DEVICES = ("NPU",)   # OpenVINO devices that compile static shapes only
STATIC_MODELS = 8   # the input shapes whose compiled models a static-shape runner keeps
SPECIALIZE_AFTER = 3   # calls at one input shape before the dynamic runner compiles a model for it
SPECIALIZE_MAX_BYTES = 256 * 2**20   # larger models are not specialized by default: GEMMs dominate their calls
# tokopt ops whose ONNX form OpenVINO 2026.4's converter refuses, and why (checked before export)
REFUSED = {
    "tokopt::tca_attention": "its per-KV-head gathers (GatherElements with indices narrower than the data "
                             "outside the gathered axis, which ONNX allows) fail OpenVINO's shape check",
    "tokopt::tca_cache_attention": "the same per-KV-head gathers as tca_attention",
}


def require_openvino():
    try:
        import openvino as ov
    except ImportError:
        raise BackendError("the openvino backend needs OpenVINO, which is not installed. Install it "
                           "(pip install 'tokopt[openvino]'), or use --backend onnxruntime.") from None
    return ov


def _hint(ov, core, device: str, precision: str) -> dict:
    """The compile config for ``precision`` on ``device`` (a UsageError where it lacks it)."""
    caps = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
    if precision == "auto":
        precision = "bf16" if device == "CPU" and "BF16" in caps else "fp32"
    if precision == "bf16" and "BF16" not in caps:
        raise UsageError(f"precision bf16: OpenVINO's {device} here has no bf16 ({', '.join(caps)}); "
                         "choose --precision fp32 or auto.")
    types = {"fp32": ov.Type.f32, "bf16": ov.Type.bf16}
    return {"precision": precision, "config": {ov.properties.hint.inference_precision: types[precision]}}


def _read(path: Path):
    return require_openvino().Core().read_model(str(path))


def _compile(model, device: str, precision: str, threads: int | None, shapes: dict | None = None):
    """``model`` (an IR read) compiled for ``device``; ``shapes`` ({input: shape}): a copy reshaped
    to them first."""
    ov = require_openvino()
    core = ov.Core()
    hint = _hint(ov, core, device, precision)
    # OpenVINO's CPU rounds the activations of compressed-weight MatMuls to int8 per group unless
    # told not to; tokopt's graph says where activations are rounded (rsq's compute=int8 spells it)
    config = {**hint["config"], ov.properties.hint.dynamic_quantization_group_size: 0}
    if threads:
        config[ov.properties.inference_num_threads] = threads
    return core.compile_model(_reshaped(model, shapes), device, config)


def _reshaped(model, shapes: dict | None):
    """``model`` itself, or a copy reshaped to ``shapes`` (the model stays dynamic for the next)."""
    if shapes is None:
        return model
    ov = require_openvino()
    model = model.clone()
    model.reshape({p.get_any_name(): ov.PartialShape(list(shapes[p.get_any_name()])) for p in model.inputs})
    return model


def _static(lowering: dict) -> bool:
    """Whether the bundle runs one model per input shape: its device's only way, or --static-shapes."""
    return lowering["device"] in STATIC_DEVICES or lowering.get("shapes") == "static"


class Compiled:
    """The compiled model and infer request for a feed. ``static``: one model per input shape,
    compiled on first use (that call waits for it). Else one dynamic model, and with
    ``specialize`` a shape called ``SPECIALIZE_AFTER`` times gets a model of its own, compiled in
    a background thread while the dynamic one keeps serving: OpenVINO folds a static model's
    shape arithmetic and plans its memory once, which the dynamic model redoes at every call
    (measured in the README, peers section). Either way the last ``STATIC_MODELS`` shapes' models
    are kept."""

    def __init__(self, make: Callable[[dict | None], object], static: bool, specialize: bool = False):
        self.make, self.static, self.models = make, static, OrderedDict()
        self.dynamic = None if static else self._made(None)
        self.calls: Counter = Counter()   # calls at each shape not yet specialized
        self.pending: dict = {}           # shape -> its compile in the background
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tokopt-openvino") if specialize and not static else None

    def _made(self, shapes):
        compiled = self.make(shapes)
        return compiled, compiled.create_infer_request()

    def _kept(self, key, made):
        self.models[key] = made
        if len(self.models) > STATIC_MODELS:
            self.models.popitem(last=False)
        return made

    def __call__(self, feed: dict[str, np.ndarray]):
        if self.pool is None and not self.static:
            return self.dynamic
        key = _shape_key(feed)
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        if self.static:
            return self._kept(key, self._made(dict(key)))
        job = self.pending.get(key)
        if job is None:
            if len(self.calls) >= 64 * STATIC_MODELS:   # many shapes, each seen once or twice: count afresh
                self.calls.clear()
            self.calls[key] += 1
            if self.calls[key] == SPECIALIZE_AFTER:
                self.pending[key] = self.pool.submit(self._made, dict(key))
        elif job.done():
            del self.pending[key]
            if job.exception() is None:
                self.calls.pop(key, None)   # counted afresh should it be dropped from the kept models
                return self._kept(key, job.result())
            warnings.warn(f"OpenVINO could not compile the model for input shapes {dict(key)} ({job.exception()}); "
                          "those calls keep the dynamic model.", stacklevel=3)
        return self.dynamic

    def settle(self) -> None:
        """Wait for the models being compiled in the background; the next call at their shapes uses them."""
        for job in list(self.pending.values()):
            job.exception()

    def warm(self, feed: dict[str, np.ndarray]):
        """What a runner that has seen ``feed``'s shapes often calls: its specialized model,
        compiled now where it is not yet made."""
        key = _shape_key(feed)
        if self.pool is not None and key not in self.models:
            job, _ = self.pending.pop(key, None), self.calls.pop(key, None)
            self._kept(key, job.result() if job is not None else self._made(dict(key)))
        return self(feed)


def _shape_key(feed: dict[str, np.ndarray]) -> tuple:
    """The feed's input shapes as a key (``dict(key)`` gives them back, as ``make`` takes them)."""
    return tuple((k, v.shape) for k, v in sorted(feed.items()))


class OpenVinoRunner(Runner):
    def __init__(self, bundle: Path, manifest: dict, threads: int | None = None, static: bool | None = None,
                 specialize: bool | None = None):
        """``static``: one model per input shape (default: where the device compiles no other).
        ``specialize``: the dynamic model's frequent shapes get models of their own, compiled in
        the background (default: for a bundle that is not a generation graph, whose decode steps
        change shape at every call, with weights of ``SPECIALIZE_MAX_BYTES`` or less, where the
        per-call shape work is a noticeable share; each specialized model holds its own copy)."""
        super().__init__(bundle, manifest)
        lowering = manifest["lowering"]
        device, precision = lowering["device"], lowering["precision"]
        model = _read(Path(bundle) / MODEL_FILE)
        static = _static(lowering) if static is None else static
        if specialize is None:
            specialize = specializes(manifest, Path(bundle))
        self.models = Compiled(lambda shapes: _compile(model, device, precision, threads, shapes), static,
                               specialize=specialize)
        self.graph_inputs = {i.get_any_name() for i in model.inputs}

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        feed = {k: v for k, v in feed.items() if k in self.graph_inputs}
        compiled, request = self.models(feed)
        out = request.infer(feed)
        return [out[o] for o in compiled.outputs]

    def settle(self) -> None:
        """Wait for the shape-specialized models being compiled (a benchmark's warm-up ends here)."""
        self.models.settle()


def specializes(manifest: dict, bundle: Path) -> bool:
    """Whether a bundle's runner specializes its frequent input shapes by default (see OpenVinoRunner)."""
    weights = sum(p.stat().st_size for p in bundle.glob("*.bin"))
    return not manifest.get("generation") and not _static(manifest["lowering"]) and weights <= SPECIALIZE_MAX_BYTES


def _keeps_a_key(mask):
    """``mask`` with each row that keeps no key keeping every key (see the module docstring)."""
    import torch
    if mask.dtype == torch.bool:
        return mask | ~mask.any(-1, keepdim=True)
    masked = mask == float("-inf")
    return mask.masked_fill(masked.all(-1, keepdim=True), 0.0)


def rows_keep_a_key(program: Program) -> tuple[Program, int]:
    """``program`` with every attention's mask through ``_keeps_a_key`` (once per mask tensor), and
    how many attention ops read such a mask; unchanged, and 0, where none has a mask or one is
    causal beside its mask (the frontend folds that flag into the mask, past a fix, so the guards
    must all stay and fixing the others would buy nothing)."""
    import torch

    from ..optimizer.ops import ATTENTION
    from ..optimizer.program import call_function_nodes
    rw = program.rewrite()
    masked = []   # (attention, its mask)
    for node in call_function_nodes(rw.graph):
        args = ATTENTION.attention(node.args) if ATTENTION.matches(node) else None
        if args is None or not isinstance(args.mask, torch.fx.Node):
            continue
        if args.causal:
            return program, 0
        masked.append((node, args.mask))
    if not masked:
        return program, 0
    made = {}
    for att, mask in masked:
        if mask not in made:
            with rw.graph.inserting_after(mask):
                made[mask] = rw.graph.call_function(_keeps_a_key, (mask,))
        att.replace_input_with(mask, made[mask])
    return rw.commit("making every attention row keep a key"), len(masked)


def drop_nan_guards(model) -> int:
    """Remove the frontend's ``Select(IsNaN(y), 0, y)`` after each attention ``y`` (see the module
    docstring: only where every attention's mask keeps a key in each row); returns how many."""
    dropped = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Select":
            continue
        cond, other = op.input_value(0).get_node(), op.input_value(2)
        if cond.get_type_name() != "IsNaN" or cond.input_value(0) != other \
                or other.get_node().get_type_name() != "ScaledDotProductAttention":
            continue
        for user in list(op.output(0).get_target_inputs()):
            user.replace_source_output(other)
        dropped += 1
    return dropped


def _fed_by_layer_norm(op) -> bool:
    """Is ``op``'s data input an ``MVN``, through its affine (Multiply and Add by constants) and
    any gather or reshape of its rows (token_prune's cut)?"""
    rows = ("Gather", "GatherND", "Reshape")
    node = op.input_value(0).get_node()
    while node.get_type_name() in ("Multiply", "Add", *rows):
        if node.get_type_name() in rows:
            node = node.input_value(0).get_node()
            continue
        data = [v for v in node.input_values() if v.get_node().get_type_name() != "Constant"]
        if len(data) != 1:
            return False
        node = data[0].get_node()
    return node.get_type_name() == "MVN"


def quantizer_inputs_kept_fp32(model) -> list[str]:
    """The per-channel Multiplies (SmoothQuant's scales) between a LayerNorm and the FakeQuantize
    of the linears it feeds: named to be kept at fp32 under a bf16 hint (``mark_precise``). The
    CPU plugin runs the norm in fp32 and the multiply in bf16, with a Reorder between; kept fp32,
    the multiply reads the norm's output as it is and the quantizer makes its uint8 from it."""
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() == "Multiply" and _fed_by_layer_norm(op)
            and all(i.get_node().get_type_name() == "FakeQuantize" for i in op.output(0).get_target_inputs())]


def mark_precise(xml: Path, names: list[str]) -> None:
    """Give the named layers of a saved IR OpenVINO's ``precise`` runtime attribute (its
    ``DisablePrecisionConversion``: the plugin keeps the layer in its original precision under an
    inference-precision hint). The Python API cannot set it (the plugin reads it as that C++
    type), so it is written as OpenVINO's serializer writes it."""
    import xml.etree.ElementTree as ET
    if not names:
        return
    tree = ET.parse(xml)
    wanted = set(names)
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") not in wanted:
            continue
        info = layer.find("rt_info")
        if info is None:
            info = ET.Element("rt_info")
            layer.insert(1 if layer.find("data") is not None else 0, info)
        ET.SubElement(info, "attribute", {"name": "precise", "version": "0"})
    tree.write(xml, encoding="utf-8", xml_declaration=True)


def _check_runs(program: Program, path: Path) -> None:
    """OpenVINO's CPU device runs the IR on the probe and on shapes the export never saw, in
    fp32, and reproduces the program (where the graph's rounding decisions allow it: a graph
    of quantizers or rank cuts is only required to run): else a BackendError before shipping."""
    from ..optimizer.ops import is_exact
    compiled = _compile(_read(path), "CPU", "fp32", None)
    names = {i.get_any_name() for i in compiled.inputs}
    exact = is_exact(program.graph)
    reference = program_reference(program) if exact else None
    for feed in verification_feeds(program):
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())
        try:
            out = compiled.create_infer_request().infer({k: v for k, v in feed.items() if k in names})
        except Exception as e:
            raise BackendError(f"OpenVINO converted the graph but cannot run it at {shapes}: "
                               f"{str(e).strip().splitlines()[-1][:300]}. Use --backend onnxruntime for this "
                               "model and passes.") from e
        if exact:
            for port, ref in zip(compiled.outputs, reference(feed)):
                if ref.dtype.kind == "f" and not np.allclose(out[port], ref, rtol=1e-3, atol=1e-3):
                    raise BackendError(f"OpenVINO's result differs from the graph by up to "
                                       f"{float(np.abs(out[port] - ref).max()):.3g} at {shapes}; this is a "
                                       "tokopt or OpenVINO bug, report it.")


@register_backend
class OpenVinoBackend(Backend):
    name = "openvino"
    runner_cls = OpenVinoRunner
    static_shapes = True

    def target(self, name: str) -> Target:
        target = get_target(name)
        ov = require_openvino()
        if target.openvino_device is None:
            served = ", ".join(t for t, spec in TARGETS.items() if spec.openvino_device)
            raise BackendError(f"target '{name}' is not one OpenVINO serves; choose one of {served}, or another "
                               "backend for it.")
        have = ov.Core().available_devices
        if not any(d.split(".")[0] == target.openvino_device for d in have):
            raise BackendError(f"target '{name}' needs OpenVINO's {target.openvino_device} device, which this machine "
                               f"does not have (it has: {', '.join(have)}). Choose --target x86-cpu.")
        return target

    def check_precision(self, target: Target, precision: str) -> None:
        if precision not in PRECISIONS:
            raise UsageError(f"precision {precision!r}: the openvino backend takes {', '.join(PRECISIONS)}.")
        ov = require_openvino()
        _hint(ov, ov.Core(), target.openvino_device, precision)

    def lower(self, program: Program, out_dir: Path, target: Target, precision: str = "auto") -> dict:
        ov = require_openvino()
        from ..optimizer.ops import OPS
        for name, why in REFUSED.items():
            if any(OPS[name].matches(n) for n in program.graph.nodes):
                raise BackendError(f"the openvino backend cannot take {name}: {why}. Use --backend onnxruntime "
                                   "for this pass.")
        program, keyed = rows_keep_a_key(program)
        # no fuse_projections here: a fused projection's split is a reference kernel in OpenVINO
        # (VariadicSplit, 16 us a layer on MiniLM), which costs what the wider GEMM saves
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            # low-bit weights stay MatMulNBits / GatherBlockQuantized, which OpenVINO's ONNX frontend
            # turns into compressed-weight kernels (its frontend has no blocked DequantizeLinear-23)
            export_onnx(program, onnx_path, fusions=False, standard=False,
                        check_feeds=verification_feeds(program))
            try:
                model = ov.convert_model(str(onnx_path))
            except Exception as e:  # the converter's messages name the op it has no rule for
                raise BackendError(f"OpenVINO cannot convert tokopt's ONNX: {str(e).strip().splitlines()[0]}") from e
            guards = drop_nan_guards(model) if keyed else 0
            fp32 = quantizer_inputs_kept_fp32(model)
            ov.save_model(model, str(out_dir / MODEL_FILE), compress_to_fp16=False)  # weights as they are
        mark_precise(out_dir / MODEL_FILE, fp32)
        _check_runs(program, out_dir / MODEL_FILE)
        hint = _hint(ov, ov.Core(), target.openvino_device, precision)
        return {"model": MODEL_FILE, "device": target.openvino_device, "precision": hint["precision"],
                **({"nan_guards_dropped": guards, "masks_keep_a_key": keyed} if guards or keyed else {}),
                **({"fp32_quantizer_inputs": len(fp32)} if fp32 else {})}

    def latency(self, captured: Program, bundle_dir: Path, target: Target, bench: Bench, lengths: list[int],
                threads: int | None, manifest: dict) -> list[dict]:
        """The bundle against what a user gets from OpenVINO alone: ``ov.convert_model`` of the
        plain ``torch.onnx.export``, OpenVINO's default precision; same feed, same run, at each length."""
        ov = require_openvino()
        lowering = manifest["lowering"]
        device, static, specialize = lowering["device"], _static(lowering), specializes(manifest, bundle_dir)
        own = _read(bundle_dir / MODEL_FILE)
        ours = Compiled(lambda shapes: _compile(own, device, lowering["precision"], threads, shapes), static, specialize)
        names = {i.get_any_name() for i in own.inputs}
        plain, size = None, None
        if bench.baseline:
            with tempfile.TemporaryDirectory() as tmp:
                export_baseline(captured, Path(tmp) / "baseline.onnx")
                model = ov.convert_model(str(Path(tmp) / "baseline.onnx"))
                size = sum(p.stat().st_size for p in Path(tmp).iterdir())
            config = {ov.properties.inference_num_threads: threads} if threads else {}
            plain = Compiled(lambda shapes: ov.Core().compile_model(_reshaped(model, shapes), device, config), static,
                             specialize)

        def call(models, feed):   # both sides as a runner that has seen the feed's shapes often runs them
            request = models.warm(feed)[1]
            return lambda: request.infer(feed)
        return time_lengths(captured, lengths, bench,
                            ours=lambda feed: call(ours, {k: v for k, v in feed.items() if k in names}),
                            baseline=None if plain is None else (lambda feed: call(plain, feed)), baseline_bytes=size,
                            threads=threads, device=device, precision=lowering["precision"],
                            **({"shapes": "static: one model compiled per input shape"} if static else
                               {"shapes": "specialized: the dynamic model's frequent shapes compiled as their own"}
                               if specialize else {}))
