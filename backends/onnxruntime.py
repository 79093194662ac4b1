"""ONNX Runtime backend: Program -> model.onnx (+ external data above 2 GB) -> a runner.

Lowering: ``torch.onnx.export(ep, dynamo=True, opset 23)`` with every tokopt op lowered by its
registered onnxscript function (``tokopt.attention`` -> the standard ONNX ``Attention`` op, GQA
included), then onnxscript's optimizer and, for targets that allow contrib ops, its ONNX
Runtime fusions (SkipLayerNormalization, BiasGelu, RotaryEmbedding, ...).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..optimizer.errors import BackendError, UsageError
from ..optimizer.ops import OPSET, decompose, is_exact, onnx_translation_table, rounding_jitter, standardize
from ..optimizer.program import Program
from ..optimizer.resources import page_out
from ..optimizer.generation import LOGITS_INDEX, CacheSpec, Compaction, logit_rows, with_positions
from ..optimizer.report import Bench, time_lengths, verification_feeds
from ..optimizer.runtime import Backend, Runner, register_backend
from .decoder import decoder_feeds, lower_decoder
from .projections import fuse_projections
from .lengths import LENGTHS, NEW_TOKENS, graph_feed
from .onnx_shapes import drop_unread_outputs, lengths_inputs, merge_ifs, static_reshapes
from .ort_options import DISABLED_OPTIMIZERS, session_options
from .targets import Target, get_target, host_arch, host_providers
from .windowed_cache import WINDOWED_KEY, WindowedSession, mark_windowed, windowed_rows

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeRunner", "BoundDecoding", "decode_step", "export_onnx", "for_onnx", "export_baseline", "make_session",
           "disagreement", "program_reference", "session_disagreement", "MODEL_FILE"]

MODEL_FILE = "model.onnx"
ORT_FILE = "model.ort"                       # ORT format (ORT Mobile, minimal builds)
OPS_CONFIG = "required_operators.config"
EXTERNAL_BYTES = 256 * 2**20    # larger models keep their weights beside the graph
# relative nudges of the reference's rounding inputs: float noise between kernels as the reference
# sees it (one nudge may happen to flip nothing; a deep int8 graph's kernels differ by up to 1e-5)
ROUNDING_NUDGES = (1e-6, 1e-5)


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines to stdout; tokopt has its own progress display."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _save(model, path: Path) -> None:
    """Weights above ``EXTERNAL_BYTES`` go to ``model.onnx.data``, written tensor by tensor (no
    serialized copy of them in memory) at 64 KiB-aligned offsets, which ONNX Runtime maps instead of
    reading."""
    import onnx_ir as ir
    mark_windowed(model)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    path.parent.mkdir(parents=True, exist_ok=True)
    if size > EXTERNAL_BYTES:
        ir.save(model, path, external_data=path.name + ".data", alignment=65536)
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
    run = program.runner()

    def reference(feed, nudge: float = 0.0):
        with rounding_jitter(nudge):
            out = run({k: torch.from_numpy(v) for k, v in feed.items()})
        return [out[n].numpy() for n in program.output_names]
    return reference


def _computed(reference, feeds: list[dict], exact: bool):
    """``reference`` (see ``program_reference``) evaluated now on ``feeds`` (with the nudges
    ``disagreement`` asks for where not ``exact``), so torch's weights can leave memory before a
    runtime loads its own copy to be checked against it."""
    nudges = (0.0,) if exact else (0.0, *ROUNDING_NUDGES)
    table = {id(feed): {eps: reference(feed, eps) for eps in nudges} for feed in feeds}
    return lambda feed, nudge=0.0: table[id(feed)][nudge]


def session_disagreement(path: Path, feeds: list[dict], reference, exact: bool, prepack: bool = True) -> str | None:
    """``disagreement`` of the model file at ``path`` run by ONNX Runtime's CPU provider (each feed
    cut to the inputs the graph reads), or why it does not even load. ``prepack``: see
    ``ort_options.session_options`` (``_needs_packing`` says when a graph must keep it)."""
    try:
        session = make_session(path, ["CPUExecutionProvider"], prepack=prepack)
    except BackendError as e:
        return str(e)
    names = {i.name for i in session.get_inputs()}
    return disagreement(lambda feed: session.run(None, graph_feed(feed, names)), feeds, reference, exact)


def _needs_packing(model) -> bool:
    """Whether the onnx-ir ``model``'s check session must prepack: MatMulNBits quantizes its
    activations (accuracy_level 4) only packed. Elsewhere the check reads the weights unpacked from
    the mapped external-data file (pageable) instead of a second copy in memory."""
    return any(n.op_type == "MatMulNBits" for g in (model.graph, *model.functions.values()) for n in g)


def _shapes(feed: dict) -> str:
    return ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())


def for_onnx(ep, primitive: dict | None = None):
    """``ep`` with the tokopt ops that have no hand-written ONNX lowering decomposed (torch.onnx
    lowers their ATen ops); ``primitive`` (op name -> a body with the reference's arguments)
    decomposes the ops it names into that body instead of their hand lowering."""
    primitive = primitive or {}
    return decompose(ep, keep=lambda spec: spec.onnx is not None and spec.name not in primitive, replace=primitive)


def signed_activations(model) -> int:
    """Each QuantizeLinear with a constant uint8 zero point, and the DequantizeLinear nodes
    reading it, re-encoded on the int8 grid (zero point - 128): the same values, in the
    signedness ARM's dot-product kernels take (W8A8's activations). Returns how many."""
    import onnx_ir as ir
    count, made = 0, {}   # one int8 zero point per uint8 one (q, k and v quantize one input)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
            continue
        zero = ir.convenience.get_const_tensor(node.inputs[2]) if node.inputs[2] is not None else None
        if zero is None or zero.dtype != ir.DataType.UINT8:
            continue
        if node.inputs[2] not in made:
            name = f"{node.inputs[2].name}_s8"
            made[node.inputs[2]] = ir.Value(name=name, const_value=ir.tensor(
                (zero.numpy().astype(np.int16) - 128).astype(np.int8), name=name))
            model.graph.register_initializer(made[node.inputs[2]])
        signed = made[node.inputs[2]]
        node.replace_input_with(2, signed)
        out = node.outputs[0]
        out.type = ir.TensorType(ir.DataType.INT8)
        for use in list(out.uses()):
            reader = use.node
            if reader.op_type == "DequantizeLinear" and len(reader.inputs) > 2:
                reader.replace_input_with(2, signed)
        count += 1
    for old in made:
        if not old.uses() and old.name in model.graph.initializers:
            del model.graph.initializers[old.name]
    return count


def export_onnx(program: Program, path: Path, *, fusions: bool = True, standard: bool | None = None,
                check_feeds: list[dict] | None = None, primitive: dict | None = None,
                int8_activations: str = "uint8") -> dict:
    """Export ``program`` to ``path`` with tokopt's lowerings and onnxscript's optimizer.

    The exported graph is checked against the program itself on ``check_feeds`` (a lowering
    that disagrees is a tokopt bug and fails the compile). With ``fusions``, ONNX Runtime
    contrib fusions are applied (they include the optimizer) and checked first; a fused graph
    that fails or disagrees is not shipped, the plain optimized one is checked and shipped, and
    the reason is recorded. (torch.onnx's own post-export optimizer is not used: at opset 23 it
    rewrites RoPE into a RotaryEmbedding whose batch-1 cos/sin caches ONNX Runtime refuses for
    batch > 1.) ``standard`` (default: without ``fusions``) rewrites the ops' contrib-op lowerings
    into standard ONNX (TensorRT); OpenVINO takes the contrib ``MatMulNBits`` and
    ``GatherBlockQuantized`` as they are. ``primitive``: see ``for_onnx``. ``int8_activations="int8"``
    re-encodes W8A8's activations as int8 (``signed_activations``; ARM). Returns {"fusions": counts}
    or {"fusions_rejected": reason}, with {"int8_activations": count} where it re-encoded some and
    {"lengths_inputs": count} where that many attention nodes read the rows' lengths as inputs
    (``onnx_shapes.lengths_inputs``)."""
    import onnxscript.optimizer
    model = _torch_export(program, primitive)
    feeds, exact = check_feeds or [], is_exact(program.graph)
    reference = _computed(program_reference(program), feeds, exact)

    extra = {}

    def save(candidate, where: Path) -> None:
        if int8_activations == "int8":
            extra["int8_activations"] = signed_activations(candidate)
        _save(candidate, where)

    # each candidate is dropped once saved: its folded weights (transposed linears) are then on disk,
    # not in memory beside the copy ONNX Runtime loads to check it
    rejected = None
    if fusions:
        from onnxscript.rewriter import ort_fusions
        model, fused = ort_fusions.optimize_for_ort(model)
        static_reshapes(model)
        drop_unread_outputs(model)
        merge_ifs(model)
        extra["lengths_inputs"] = lengths_inputs(model)
        with tempfile.TemporaryDirectory() as tmp:
            save(model, Path(tmp) / path.name)
            packing, model = _needs_packing(model), None
            page_out(program)
            rejected = session_disagreement(Path(tmp) / path.name, feeds, reference, exact, packing)
            if rejected is None:
                for f in Path(tmp).iterdir():
                    shutil.move(str(f), path.parent / f.name)
                return {"fusions": {k: v for k, v in fused.items() if v}, **_nonzero(extra)}
        model = _torch_export(program, primitive)   # again rather than a copy kept: the weights once in memory
    onnxscript.optimizer.optimize(model)
    static_reshapes(model)
    merge_ifs(model)
    extra["lengths_inputs"] = lengths_inputs(model)
    standardized = standardize(model) if (not fusions if standard is None else standard) else {}
    save(model, path)
    packing = _needs_packing(model)
    del model
    page_out(program)
    why = session_disagreement(path, feeds, reference, exact, packing)
    if why is not None:
        raise BackendError(f"the ONNX lowering does not reproduce the graph: {why}. This is a tokopt "
                           "bug; rerun with --debug and report it.")
    if rejected is not None:
        return {"fusions_rejected": rejected, **_nonzero(extra)}
    return {"fusions": {}, **({"standardized": standardized} if standardized else {}), **_nonzero(extra)}


def _torch_export(program: Program, primitive: dict | None):
    """``program`` as an onnx_ir model, every input it reads (see ``export_onnx``)."""
    import torch
    try:
        with _quiet():
            onnx_program = torch.onnx.export(
                for_onnx(program.ep, primitive), dynamo=True, opset_version=OPSET, verbose=False, optimize=False,
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
    return model


def _nonzero(counts: dict) -> dict:
    return {k: v for k, v in counts.items() if v}


def write_ort_format(onnx_path: Path, feeds: list[dict], program: Program) -> dict:
    """``model.ort`` beside the ONNX model: ONNX Runtime's own converter, optimizations fixed at
    conversion for an ARM CPU (what ORT Mobile's CPU provider runs), and ``required_operators.config``,
    the operator list a minimal ONNX Runtime build is configured with. Checked against the program
    on ``feeds`` before it ships."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
    out = onnx_path.parent
    with tempfile.TemporaryDirectory() as tmp:
        with _quiet():
            convert_onnx_models_to_ort(onnx_path, output_dir=Path(tmp), optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform="arm")
        shutil.move(str(Path(tmp) / ORT_FILE), out / ORT_FILE)
        ops = [line for line in (Path(tmp) / f"{onnx_path.stem}.required_operators.config").read_text().splitlines()
               if line and not line.startswith("#")]
    (out / OPS_CONFIG).write_text(f"# the operators {ORT_FILE} needs: a minimal ONNX Runtime build takes this file "
                                  "(build.py --minimal_build --include_ops_by_config)\n" + "\n".join(ops) + "\n")
    why = session_disagreement(out / ORT_FILE, feeds, program_reference(program), is_exact(program.graph))
    if why is not None:
        raise BackendError(f"the ORT-format model does not reproduce the graph: {why}. This is a tokopt bug; "
                           "rerun with --debug and report it.")
    return {"ort_model": ORT_FILE, "ort_format": {"optimizations": "fixed at conversion, level all, for ARM",
                                                  "operators": OPS_CONFIG,
                                                  "domains": sorted({line.split(";")[0] for line in ops})}}


def export_baseline(program: Program, path: Path) -> None:
    """What a user writes without tokopt: ``torch.onnx.export(ep, dynamo=True)``, defaults."""
    import torch
    try:
        with _quiet():
            onnx_program = torch.onnx.export(program.ep, dynamo=True, verbose=False, input_names=program.input_names,
                                             output_names=program.output_names)
        _save(onnx_program.model, path)
    except Exception as e:
        raise BackendError(f"the baseline torch.onnx.export failed: {str(e).strip().splitlines()[0]}") from e


def make_session(path: Path, providers: list[str], threads: int | None = None, prepack: bool = True):
    """An ONNX Runtime session of ``path``; a ``WindowedSession`` where it has windowed caches."""
    import onnxruntime as ort
    try:
        session = ort.InferenceSession(str(path), session_options(ort, threads, prepack), providers=providers,
                                       disabled_optimizers=DISABLED_OPTIMIZERS)
    except Exception as e:
        raise BackendError(f"ONNX Runtime cannot load {path}: {str(e).strip().splitlines()[0]}") from e
    windowed = session.get_modelmeta().custom_metadata_map.get(WINDOWED_KEY)
    return WindowedSession(session, json.loads(windowed)) if windowed else session


def bundle_model(manifest: dict | None) -> str:
    """The model file a bundle's runner loads: the ORT-format one where the target has it."""
    return ((manifest or {}).get("lowering") or {}).get("ort_model", MODEL_FILE)


class OnnxRuntimeRunner(Runner):
    def __init__(self, bundle: Path, manifest: dict, threads: int | None = None):
        super().__init__(bundle, manifest)
        target = get_target(manifest["target"])
        self.providers, self.checked_on = host_providers(target)
        if threads is None and target.arch == host_arch():
            threads = target.threads   # on the device: its thread count
        self.session = make_session(bundle / bundle_model(manifest), self.providers, threads)
        self.graph_inputs = {i.name for i in self.session.get_inputs()}

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # an input the lowering made unused (position_ids, once RoPE reads cache indices) is gone, and
        # a graph that reads each row's length gets it from the mask
        return self.session.run(None, graph_feed(feed, self.graph_inputs))

    def decoding(self, batch: int, capacity: int, drafts: bool = False):
        if not (self.manifest.get("generation") or {}).get("shared_buffer"):
            return super().decoding(batch, capacity, drafts)
        return BoundDecoding(self.session, self.cache_spec(), batch, capacity, self.graph_inputs, self.right_padded,
                             drafts)


class BoundDecoding:
    """Decoding with the cache in one preallocated buffer per layer's keys and values, bound
    through ORT's IOBinding as both the graph's past and its present: GroupQueryAttention
    writes each step's keys in place, nothing is copied or concatenated between steps. The
    logits (one position per row, [B, 1, V]) land in a bound buffer too; a call returns a view of
    it, valid until the next call (a 152K vocabulary's copy per token cost more than its argmax).
    A windowed layer's buffers (``windowed_cache``) hold its window and a slack, not ``capacity``,
    unless ``drafts`` may be taken back (``every``) or tca compacts the cache."""

    def __init__(self, session, spec, batch: int, capacity: int, inputs: set[str], right_padded: bool = False,
                 drafts: bool = False):
        import onnxruntime as ort
        self.session, self.positions, self.capacity = session, "position_ids" in inputs, capacity
        self.drafts = drafts
        windowed = getattr(session, "windowed", {})
        self.right_padded = right_padded   # see generation.generate_ids
        self.index = LOGITS_INDEX in inputs   # the last position's logits are asked for (newer bundles)
        self.last = None   # the logits_index bound: the prompt's last row(s), then 0 at each step
        self.last_row = None   # the row it holds when it holds one, as an int (a step compares it)
        self.io = session.io_binding()
        self.logits = np.zeros((batch, 1, spec.vocab_size), dtype=spec.dtype)
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(self.logits)]   # kept alive while bound
        self.io.bind_ortvalue_output("logits", self.buffers[0])
        self.cache = {}   # the buffers' memory, as numpy (an OrtValue made from a CPU array shares it)
        exact = drafts or spec.keeps or spec.index   # every position kept (see windowed_rows)
        for i in range(spec.layers):
            for kv in ("key", "value"):
                name = f"past_{kv}_{i}"
                rows = windowed_rows(capacity, windowed[name][1], exact) if name in windowed else capacity
                self.cache[name] = np.zeros((batch, spec.kv_heads[i], rows, spec.head_dim[i]), dtype=spec.dtype)
                buf = ort.OrtValue.ortvalue_from_numpy(self.cache[name])
                self.io.bind_ortvalue_input(name, buf)
                self.io.bind_ortvalue_output(f"present_{kv}_{i}", buf)
                self.buffers.append(buf)
        self.spec, self.compaction, self.prefilled = spec, None, False
        # a one-token step's ids (and positions) are written into buffers bound once
        self.step_ids = np.zeros((batch, 1), dtype=np.int64)
        self.step_pos = np.zeros((batch, 1), dtype=np.int64)
        self.stepping = False   # whether those buffers (and wide_mask, below) are the bound inputs
        # one-token steps of a graph that reads each row's length off the mask's sum (right padding)
        # take the mask at full capacity, zeros past the tokens so far: bound once, each step writes
        # its columns in place (a bind after a run costs 10-12 us of cold code, 3-4% of a small
        # model's step). Several tokens after a cache need the exact length: ORT's kernel reads a
        # longer mask as a continued prompt, which it takes for one row only.
        # a graph that reads each row's length (lengths.py) takes them in two buffers bound once, and
        # the mask only where something else reads it (tca's selection)
        self.lengths, self.reads_mask = LENGTHS[0] in inputs, "attention_mask" in inputs
        self.wide_mask = np.zeros((batch, capacity), dtype=np.int64) if right_padded and self.reads_mask else None
        self.wide_len = 0   # the columns written
        if self.lengths:
            self.seqlens, self.total = np.zeros(batch, dtype=np.int32), np.zeros((), dtype=np.int32)
            self.io.bind_cpu_input(LENGTHS[0], self.seqlens)
            self.io.bind_cpu_input(LENGTHS[1], self.total)
        self.new_tokens = np.zeros(batch, dtype=np.int32) if NEW_TOKENS in inputs else None   # windowed layers'
        if self.new_tokens is not None:
            self.io.bind_cpu_input(NEW_TOKENS, self.new_tokens)
        for name in spec.keep_names:   # tca select=prefill: what the prefill keeps, allocated by ORT
            self.io.bind_output(name)

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, last: np.ndarray | None = None) -> np.ndarray:
        mask = self._bind(ids, mask, pos)
        if last is not None:
            index, pick = logit_rows(ids, last)
            if len(index) > 1:
                return self._after(mask, self._wide(index)[np.arange(len(pick)), pick])
            row = int(index[0])
        else:
            row = ids.shape[1] - 1
        if self.index and self.last_row != row:   # once a mode
            self.last, self.last_row = np.array([row]), row   # kept alive while bound
            self.io.bind_cpu_input(LOGITS_INDEX, self.last)
        self.session.run_with_iobinding(self.io)
        return self._after(mask, self.logits[:, -1])

    def greedy(self, token: int, steps: int, stops: set[int], on_token=None) -> list[int]:
        """Up to ``steps`` more greedy one-token steps of one row whose last call was a one-token
        step that picked ``token``, ending after a token in ``stops``. Each is the call ``__call__``
        would make with the row one token longer (its mask column or its length written in place),
        with nothing else between runs: generate's loop for one greedy row (its general loop's numpy
        work is a few percent of a small model's step). ``on_token`` gets each new token as a [1]
        array."""
        lengths, wide = self.lengths, None if self.wide_mask is None else self.wide_mask[0]
        n = self.wide_len if wide is not None else int(self.total) if lengths else 0
        if not (self.stepping and n) or self.step_ids.shape[0] != 1 or (self.reads_mask and wide is None):
            raise UsageError("greedy() continues one row's one-token steps after such a step, on a graph whose "
                             "rows take right padding.")
        if n + steps > self.capacity:
            raise UsageError(f"the cache holds {self.capacity} tokens and {steps} more steps would make it "
                             f"{n + steps}: open the decoding with a larger capacity (prompt + new tokens).")
        ids, pos, row, picked = self.step_ids, self.step_pos, self.logits[0, -1], []
        seqlens, total = (self.seqlens, self.total) if lengths else (None, None)
        for _ in range(steps):
            ids[0, 0] = token
            if self.positions:
                pos[0, 0] += 1
            if lengths:
                seqlens[0] = n
                total[()] = n + 1
            if wide is not None:
                wide[n] = 1
                self.wide_len = n + 1
            n += 1
            self.session.run_with_iobinding(self.io)
            token = int(row.argmax())
            picked.append(token)
            if on_token is not None:
                on_token(np.array([token]))
            if token in stops:
                break
        return picked

    def every(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """The logits of every position of ``ids`` [B, S, V]: a step that verifies drafted tokens
        (the kernel writes them all into the buffers; the next call's mask says which count)."""
        if not self.drafts:
            raise UsageError("this decoding was not opened for drafts (decoding(..., drafts=True)): a windowed "
                             "layer's cache may have evicted what taking drafts back needs.")
        mask = self._bind(ids, mask, pos)
        return self._after(mask, self._wide(np.arange(ids.shape[1])))

    def _bind(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if self.compaction is not None:
            mask = self.compaction.mask(mask)
        if mask.shape[1] > self.capacity:
            raise UsageError(f"the cache holds {self.capacity} tokens and this step would make it {mask.shape[1]}: "
                             "open the decoding with a larger capacity (prompt + new tokens).")
        if ids.shape == self.step_ids.shape:
            self.step_ids[...] = ids
            if self.positions:
                self.step_pos[...] = pos
            if self.wide_mask is not None:
                n = mask.shape[1]
                self.wide_mask[:, :n] = mask
                if self.wide_len > n:   # a rejected draft's columns
                    self.wide_mask[:, n:self.wide_len] = 0
                self.wide_len = n
            if not self.stepping:
                self.io.bind_cpu_input("input_ids", self.step_ids)
                if self.positions:
                    self.io.bind_cpu_input("position_ids", self.step_pos)
                if self.wide_mask is not None:
                    self.io.bind_cpu_input("attention_mask", self.wide_mask)
                self.stepping = True
        else:
            self.io.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
            if self.positions:
                self.io.bind_cpu_input("position_ids", np.ascontiguousarray(pos))
            self.stepping = False
        if self.lengths:
            rows = mask.sum(1)
            self.seqlens[...] = rows - 1
            self.total[...] = mask.shape[1]
            if self.new_tokens is not None:
                self.new_tokens[...] = np.minimum(rows, ids.shape[1])
        if self.reads_mask and not (self.stepping and self.wide_mask is not None):
            self.io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        return mask

    def _after(self, mask: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if self.spec.keeps and not self.prefilled:
            import onnxruntime as ort
            self._compact(mask)
            for i, name in enumerate(self.spec.keep_names):   # a decode step keeps nothing: [B, Hkv, 0]
                empty = np.zeros((logits.shape[0], self.spec.kv_heads[i], 0), dtype=np.int64)
                self.buffers.append(ort.OrtValue.ortvalue_from_numpy(empty))
                self.io.bind_ortvalue_output(name, self.buffers[-1])
        self.prefilled = True
        return logits

    def _compact(self, mask: np.ndarray) -> None:
        """After the prefill: each buffer's kept entries moved to its start, in place."""
        outs = self.io.get_outputs()[-self.spec.layers:]   # the keep_i are bound last
        keeps = dict(zip(self.spec.keep_names, (o.numpy() for o in outs)))
        self.compaction = Compaction.after_prefill(self.spec, keeps, mask, self.cache, True)

    def _wide(self, index: np.ndarray) -> np.ndarray:
        """The logits of the positions ``index`` (rows that end apart, drafts), [B, len(index), V], in
        a buffer of this call's own."""
        import onnxruntime as ort
        self.last, self.last_row = index, None
        self.io.bind_cpu_input(LOGITS_INDEX, self.last)
        wide = np.zeros((self.logits.shape[0], len(index), self.logits.shape[-1]), dtype=self.logits.dtype)
        self.io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(wide))
        self.session.run_with_iobinding(self.io)
        self.io.bind_ortvalue_output("logits", self.buffers[0])
        return wide


def decode_step(session, manifest: dict, names: set[str], feed: dict) -> tuple[BoundDecoding, Callable]:
    """A decode step as generate() runs it, to time: the cache in the buffers bound as past and
    present, the greedy pick included (as in the peer's generate_next_token). A cache the prefill
    compacts (tca select=prefill) is first filled by a prefill of the step's context, so the step
    attends to what it keeps, as it does in generate()."""
    ids, mask = feed["input_ids"], feed["attention_mask"]
    spec = CacheSpec.from_json(manifest["generation"]["cache"])
    step = BoundDecoding(session, spec, 1, mask.shape[1], names)
    if spec.keeps:
        n = mask.shape[1] - 1
        prompt = np.random.default_rng(0).integers(spec.vocab_size // 10, spec.vocab_size, (1, n))
        step(prompt, np.ones((1, n), dtype=np.int64), np.arange(n)[None])
    pos = feed.get("position_ids", np.array([[mask.shape[1] - 1]]))
    return step, lambda: step(ids, mask, pos).argmax(-1)


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    runner_cls = OnnxRuntimeRunner

    def target(self, name: str) -> Target:
        target = get_target(name)
        host_providers(target)
        return target

    def checked_on(self, target: Target) -> str | None:
        return host_providers(target)[1]

    def lower(self, program: Program, out_dir: Path, target: Target, precision: str = "auto") -> dict:
        from ..optimizer.compile import io_spec
        from .tensorrt import engine_script, longest, parser_check, primitive_attention
        decoder = {}
        if program.cache is not None and target.contrib_fusions:
            program, decoder = lower_decoder(program)
        # fused after the decoder's rewrite and its check, not inside that rewrite: the check then ran
        # the fused gate/up weights beside the original ones (1.1B: lowering peak 7.08 GiB against 5.21)
        program, fused = fuse_projections(program)
        primitive = primitive_attention(target)
        feeds = decoder_feeds(program) if decoder.get("cached_attention") else verification_feeds(program)
        info = export_onnx(program, out_dir / MODEL_FILE, fusions=target.contrib_fusions, check_feeds=feeds,
                           primitive=primitive, int8_activations=target.int8_activations)
        shared = len(decoder.get("cached_attention", ())) == (program.cache.layers if program.cache else -1)
        lowered = {"model": MODEL_FILE, **info, **({"decoder": decoder} if decoder else {}),
                   **({"fused_projections": fused} if fused else {}),
                   **({"shared_buffer": True} if shared else {}), "target_profile": target.profile(),
                   **({"attention": f"MatMul/Softmax (TensorRT {target.tensorrt} parses no fused Attention)"}
                      if primitive else {})}
        if target.tensorrt is not None:
            check = parser_check(out_dir / MODEL_FILE, target.tensorrt)
            if not check["parses"]:
                raise BackendError(f"target '{target.name}' runs TensorRT {target.tensorrt}, whose ONNX parser would "
                                   f"refuse this graph: {'; '.join(check['problems'])}. Leave out the pass that "
                                   "makes it, or choose a CPU target.")
            lowered["tensorrt_check"] = check
            script = out_dir / "build_engine.sh"
            script.write_text(engine_script(io_spec(program)[0], longest(program.seq_range)))
            script.chmod(0o755)
        if target.ort_format:
            lowered.update(write_ort_format(out_dir / MODEL_FILE, feeds, program))
        return lowered

    def latency(self, captured: Program, bundle_dir: Path, target: Target, bench: Bench, lengths: list[int],
                threads: int | None, manifest: dict | None = None) -> list[dict]:
        """Median/p90 of the bundle and of the plain-export baseline at each length: same feed,
        same run."""
        providers, _ = host_providers(target)
        if target.gpu and providers[0] == "CPUExecutionProvider":
            return None   # an edge GPU's latency is not this CPU's
        base, size = None, None
        if bench.baseline:
            with tempfile.TemporaryDirectory() as tmp:
                base_path = Path(tmp) / "baseline.onnx"
                export_baseline(captured, base_path)
                base = make_session(base_path, providers, threads)
                size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        ours = make_session(bundle_dir / bundle_model(manifest), providers, threads)
        names = [i.name for i in ours.get_inputs()]
        bound = ((manifest or {}).get("generation") or {}).get("shared_buffer")

        def own(feed):
            feed = with_positions(feed, names)
            fed = graph_feed(feed, names)
            ids, mask = feed["input_ids"], feed.get("attention_mask")
            if bound and ids.shape[1] == 1 and mask is not None and mask.shape[1] > 1:
                return decode_step(ours, manifest, set(names), feed)[1]
            return lambda: ours.run(None, fed)
        with tempfile.TemporaryDirectory() as tmp:
            others, fields = {}, {}
            if captured.cache is not None and providers[0] == "CPUExecutionProvider":
                peer = self._peer(captured, bench, manifest, Path(tmp), threads)
                if isinstance(peer, str):
                    fields["peer_skipped"] = peer
                else:
                    others.update(peer)
            return time_lengths(captured, lengths, bench, ours=own,
                                baseline=None if base is None else (lambda feed: lambda: base.run(None, feed)),
                                baseline_bytes=size, others=others or None, threads=threads, providers=providers,
                                **fields)

    @staticmethod
    def _peer(captured: Program, bench: Bench, manifest: dict | None, work: Path, threads: int | None):
        """{name: call} of onnxruntime-genai's build of the same folder, or why it is not timed."""
        from . import genai
        if captured.source.get("kind") != "hf-folder":
            return f"{genai.PEER}: its model builder reads a Hugging Face folder, and this model was a module"
        if not bench.baseline:
            return f"{genai.PEER}: not built for a model this large (a second conversion of the weights)"
        precision = genai.precision_of((manifest or {}).get("passes", []))
        model = genai.build(Path(captured.source["path"]), precision, work / "genai", threads)
        if isinstance(model, str):
            return model
        return {f"{genai.PEER} {precision}": genai.step_calls(model, captured.cache.vocab_size,
                                                             captured.cache.max_length)}
