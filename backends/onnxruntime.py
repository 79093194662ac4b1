"""ONNX Runtime backend: Program -> model.onnx (+ external data above 2 GB) -> a runner.

Lowering: ``torch.onnx.export(ep, dynamo=True, opset 23)`` with every tokopt op lowered by its
registered onnxscript function (``tokopt.attention`` -> the standard ONNX ``Attention`` op, GQA
included), then onnxscript's optimizer and, for targets that allow contrib ops, its ONNX
Runtime fusions (SkipLayerNormalization, BiasGelu, RotaryEmbedding, ...).
"""
from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..optimizer.errors import BackendError, UsageError
from ..optimizer.ops import OPS, OPSET, decompose, onnx_translation_table, rounding_jitter, standardize
from ..optimizer.program import Program
from ..optimizer.generation import with_positions
from ..optimizer.report import time_lengths, verification_feeds
from ..optimizer.runtime import Backend, Runner, register_backend
from .decoder import decoder_feeds, lower_decoder
from .onnx_shapes import static_reshapes
from .targets import Target, get_target, require_providers

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeRunner", "BoundDecoding", "export_onnx", "for_onnx", "export_baseline", "make_session",
           "disagreement", "program_reference", "is_exact", "MODEL_FILE"]

MODEL_FILE = "model.onnx"
_TWO_GB = 2 * 1024 ** 3
# relative nudges of the reference's rounding inputs: float noise between kernels as the reference
# sees it (one nudge may happen to flip nothing; a deep int8 graph's kernels differ by up to 1e-5)
ROUNDING_NUDGES = (1e-6, 1e-5)


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines to stdout; tokopt has its own progress display."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _save(model, path: Path) -> None:
    import onnx_ir as ir
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    path.parent.mkdir(parents=True, exist_ok=True)
    if size > _TWO_GB:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        ir.save(model, path)


def disagreement(run, feeds: list[dict], reference, exact: bool = True) -> str | None:
    """None if ``run(feed)`` (the outputs as a list of arrays) reproduces ``reference(feed)`` on
    every feed, else what went wrong.
    ``exact=False`` (a graph with rounding decisions, which float noise between kernels can
    flip one step either way) accepts a mean error within 2% of the mean magnitude and a
    largest error within a quarter of the largest value, each widened by twice what the
    reference itself moves when its rounding inputs are nudged by 1e-6 or 1e-5 (in a deep graph of
    int8 roundings that alone can be several percent): a wrong lowering is far outside."""
    for feed in feeds:
        try:
            got = run(feed)
        except Exception as e:
            return f"it fails at {_shapes(feed)}: {str(e).strip().splitlines()[0][:300]}"
        nudged = None if exact else [reference(feed, eps) for eps in ROUNDING_NUDGES]
        for i, (x, y) in enumerate(zip(reference(feed), got)):
            if x.shape != y.shape:
                return f"output shape {list(y.shape)} instead of {list(x.shape)} at {_shapes(feed)}"
            if x.dtype.kind != "f":
                continue
            err = np.abs(x - y)
            noise = None if exact else np.max([np.abs(x - n[i]) for n in nudged], axis=0)
            ok = (np.allclose(x, y, rtol=1e-3, atol=1e-4) if exact else
                  err.mean() <= 0.02 * np.abs(x).mean() + 2 * noise.mean()
                  and err.max() <= 0.25 * np.abs(x).max() + 2 * noise.max())
            if not ok:
                return f"outputs differ by up to {float(err.max()):.3g} (mean {float(err.mean()):.3g}) at {_shapes(feed)}"
    return None


def program_reference(program: Program):
    """``reference(feed, nudge=0.0)``: the program's outputs on a numpy feed, as a list in output
    order, with every rounding op's input nudged by a relative ``nudge`` (see ``disagreement``)."""
    import torch

    def reference(feed, nudge: float = 0.0):
        with rounding_jitter(nudge):
            out = program.run({k: torch.from_numpy(v) for k, v in feed.items()})
        return [out[n].numpy() for n in program.output_names]
    return reference


def is_exact(program: Program) -> bool:
    """Whether every tokopt op in the program is exact (no rounding decisions)."""
    return all(spec.is_exact(n) for n in program.graph.nodes for spec in OPS.values() if spec.matches(n))


def _shapes(feed: dict) -> str:
    return ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())


def for_onnx(ep):
    """``ep`` with the tokopt ops that have no hand-written ONNX lowering decomposed (torch.onnx
    lowers their ATen ops)."""
    return decompose(ep, keep=lambda spec: spec.onnx is not None)


def export_onnx(program: Program, path: Path, *, fusions: bool = True, standard: bool | None = None,
                check_feeds: list[dict] | None = None) -> dict:
    """Export ``program`` to ``path`` with tokopt's lowerings and onnxscript's optimizer.

    The exported graph is checked against the program itself on ``check_feeds`` (a lowering
    that disagrees is a tokopt bug and fails the compile). With ``fusions``, ONNX Runtime
    contrib fusions are applied (they include the optimizer) and checked first; a fused graph
    that fails or disagrees is not shipped, the plain optimized one is checked and shipped, and
    the reason is recorded. (torch.onnx's own post-export optimizer is not used: at opset 23 it
    rewrites RoPE into a RotaryEmbedding whose batch-1 cos/sin caches ONNX Runtime refuses for
    batch > 1.) ``standard`` (default: without ``fusions``) rewrites the ops' contrib-op lowerings
    into standard ONNX (TensorRT); OpenVINO takes the contrib ``MatMulNBits`` and
    ``GatherBlockQuantized`` as they are. Returns {"fusions": counts} or {"fusions_rejected": reason}."""
    import onnx_ir as ir
    import onnxscript.optimizer
    import torch
    try:
        with _quiet():
            onnx_program = torch.onnx.export(
                for_onnx(program.ep), dynamo=True, opset_version=OPSET, verbose=False, optimize=False,
                input_names=program.input_names, output_names=program.output_names,
                custom_translation_table=onnx_translation_table())
    except Exception as e:
        raise BackendError(f"torch.onnx.export failed: {str(e).strip().splitlines()[0]}. "
                           "Run with --debug for the exporter's report.") from e
    model = onnx_program.model
    # an input the lowering left unread (position_ids, once RoPE reads cache indices) would still
    # have to be fed at every call; the runner feeds the graph only what it reads
    for value in [v for v in model.graph.inputs if not v.uses()]:
        model.graph.inputs.remove(value)
    feeds, reference, exact = check_feeds or [], program_reference(program), is_exact(program)

    def check(candidate, where: Path) -> str | None:
        _save(candidate, where)
        try:
            session = make_session(where, ["CPUExecutionProvider"])
        except BackendError as e:  # it does not even load
            return str(e)
        names = {i.name for i in session.get_inputs()}
        return disagreement(lambda feed: session.run(None, {k: v for k, v in feed.items() if k in names}),
                            feeds, reference, exact)

    rejected = None
    if fusions:
        from onnxscript.rewriter import ort_fusions
        plain = ir.from_proto(ir.to_proto(model))   # kept for when the fused graph is refused
        fused_model, fused = ort_fusions.optimize_for_ort(model)
        static_reshapes(fused_model)
        with tempfile.TemporaryDirectory() as tmp:
            rejected = check(fused_model, Path(tmp) / path.name)
            if rejected is None:
                for f in Path(tmp).iterdir():
                    shutil.move(str(f), path.parent / f.name)
                return {"fusions": {k: v for k, v in fused.items() if v}}
        model = plain
    onnxscript.optimizer.optimize(model)
    static_reshapes(model)
    standardized = standardize(model) if (not fusions if standard is None else standard) else {}
    why = check(model, path)
    if why is not None:
        raise BackendError(f"the ONNX lowering does not reproduce the graph: {why}. This is a tokopt "
                           "bug; rerun with --debug and report it.")
    if rejected is not None:
        return {"fusions_rejected": rejected}
    return {"fusions": {}, **({"standardized": standardized} if standardized else {})}


def export_baseline(program: Program, path: Path) -> None:
    """What a user writes without tokopt: ``torch.onnx.export(ep, dynamo=True)``, defaults."""
    import torch
    try:
        with _quiet():
            torch.onnx.export(program.ep, dynamo=True, verbose=False, input_names=program.input_names,
                              output_names=program.output_names).save(str(path))
    except Exception as e:
        raise BackendError(f"the baseline torch.onnx.export failed: {str(e).strip().splitlines()[0]}") from e


def make_session(path: Path, providers: list[str], threads: int | None = None):
    import onnxruntime as ort
    ort.set_default_logger_severity(3)  # failures surface as exceptions with tokopt's message
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # ORT fuses DequantizeLinear + MatMul into MatMulNBits and would then quantize the
    # activations to int8 (its default accuracy level 4): keep the float math the bundle promises
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        so.intra_op_num_threads = threads
    try:
        # ONNX Runtime 1.32's QDQ propagation and its S8->U8 rewrite together emit QuantizeLinear
        # nodes whose output type contradicts their zero point (edgeqat's per-token QDQ pairs
        # fail to load); tokopt graphs never need the rewrite (it targets int8 MatMul/Conv)
        return ort.InferenceSession(str(path), so, providers=providers, disabled_optimizers=["QDQS8ToU8Transformer"])
    except Exception as e:
        raise BackendError(f"ONNX Runtime cannot load {path}: {str(e).strip().splitlines()[0]}") from e


class OnnxRuntimeRunner(Runner):
    def __init__(self, bundle: Path, manifest: dict, threads: int | None = None):
        super().__init__(bundle, manifest)
        self.providers = require_providers(get_target(manifest["target"]))
        self.session = make_session(bundle / MODEL_FILE, self.providers, threads)
        self.graph_inputs = {i.name for i in self.session.get_inputs()}

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # an input the lowering made unused (position_ids, once RoPE reads cache indices) is gone
        return self.session.run(None, {k: v for k, v in feed.items() if k in self.graph_inputs})

    def decoding(self, batch: int, capacity: int):
        if not (self.manifest.get("generation") or {}).get("shared_buffer"):
            return super().decoding(batch, capacity)
        return BoundDecoding(self.session, self.cache_spec(), batch, capacity, self.graph_inputs)


class BoundDecoding:
    """Decoding with the cache in one preallocated buffer per layer's keys and values, bound
    through ORT's IOBinding as both the graph's past and its present: GroupQueryAttention
    writes each step's keys in place, nothing is copied or concatenated between steps. The
    logits (the last position's, [B, 1, V] at every call) land in a bound buffer too."""

    def __init__(self, session, spec, batch: int, capacity: int, inputs: set[str]):
        import onnxruntime as ort
        self.session, self.positions, self.capacity = session, "position_ids" in inputs, capacity
        self.io = session.io_binding()
        self.logits = np.zeros((batch, 1, spec.vocab_size), dtype=spec.dtype)
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(self.logits)]   # kept alive while bound
        self.io.bind_ortvalue_output("logits", self.buffers[0])
        for i in range(spec.layers):
            for kv in ("key", "value"):
                buf = ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((batch, spec.kv_heads[i], capacity, spec.head_dim[i]), dtype=spec.dtype))
                self.io.bind_ortvalue_input(f"past_{kv}_{i}", buf)
                self.io.bind_ortvalue_output(f"present_{kv}_{i}", buf)
                self.buffers.append(buf)

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if mask.shape[1] > self.capacity:
            raise UsageError(f"the cache holds {self.capacity} tokens and this step would make it {mask.shape[1]}: "
                             "open the decoding with a larger capacity (prompt + new tokens).")
        self.io.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        self.io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        if self.positions:
            self.io.bind_cpu_input("position_ids", np.ascontiguousarray(pos))
        self.session.run_with_iobinding(self.io)
        return self.logits[:, -1].copy()   # the buffer is the next call's output


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    runner_cls = OnnxRuntimeRunner

    def target(self, name: str) -> Target:
        target = get_target(name)
        require_providers(target)
        return target

    def lower(self, program: Program, out_dir: Path, target: Target, precision: str = "auto") -> dict:
        decoder = {}
        if program.cache is not None and target.contrib_fusions:
            program, decoder = lower_decoder(program)
        info = export_onnx(program, out_dir / MODEL_FILE, fusions=target.contrib_fusions,
                           check_feeds=decoder_feeds(program) if decoder.get("cached_attention") else
                           verification_feeds(program))
        shared = len(decoder.get("cached_attention", ())) == (program.cache.layers if program.cache else -1)
        return {"model": MODEL_FILE, **info, **({"decoder": decoder} if decoder else {}),
                **({"shared_buffer": True} if shared else {})}

    def latency(self, captured: Program, bundle_dir: Path, target: Target, runs: int, lengths: list[int],
                threads: int | None, manifest: dict | None = None) -> list[dict]:
        """Median/p90 of the bundle and of the plain-export baseline at each length: same feed,
        same run."""
        providers = require_providers(target)
        with tempfile.TemporaryDirectory() as tmp:
            base_path = Path(tmp) / "baseline.onnx"
            export_baseline(captured, base_path)
            base = make_session(base_path, providers, threads)
            size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        ours = make_session(bundle_dir / MODEL_FILE, providers, threads)
        names = [i.name for i in ours.get_inputs()]

        def own(feed):
            fed = {k: v for k, v in with_positions(feed, names).items() if k in names}
            return lambda: ours.run(None, fed)
        return time_lengths(captured, lengths, runs, ours=own, baseline=lambda feed: lambda: base.run(None, feed),
                            baseline_bytes=size, threads=threads, providers=providers)

