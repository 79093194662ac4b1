"""The pipeline: validate -> capture -> passes -> lower -> measure -> bundle.

Everything a user can get wrong (pass names and options, target, provider, ``--out``) is
checked before the model is loaded, so a bad command fails in a second and writes nothing.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import sympy
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .bundle import atomic_bundle, check_out, write_manifest
from .capture import DEFAULT_SEQ_LEN, capture
from .errors import UsageError
from .generation import CacheSpec, example_feed
from .ops import is_exact
from .pass_manager import FLOAT_WEIGHTS, PassManager, PassSpec, load_recipe, parse_pass_spec, plan
from .program import Program
from .resources import COPIES, PEAK_SOURCE, check_disk, page_out, parse_bytes, stage, weights_bytes
from .report import Bench, format_report, generation_prompts, generation_quality, probe_inputs, quality, quality_rows
from .runtime import check_threads, get_backend

__all__ = ["compile", "CompileResult", "io_spec", "plan_passes"]

LARGE_BYTES = 2**30   # above, the report times the bundle alone and probes fewer rows (see _measure)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                    "merges.txt", "vocab.json", "tokenizer.model", "added_tokens.json")


@dataclass
class CompileResult:
    bundle: Path
    manifest: dict
    report: dict
    program: Program

    def __str__(self) -> str:
        return format_report(self.report)


def plan_passes(passes=None, recipe=None) -> list[PassSpec]:
    specs: list[PassSpec] = []
    if recipe is not None:
        specs += load_recipe(recipe)
    if isinstance(passes, str):
        specs += parse_pass_spec(passes)
    elif passes:
        specs += [p if isinstance(p, PassSpec) else parse_pass_spec(p)[0] for p in passes]
    if not any(s.name == "canonicalize" for s in specs):
        specs.insert(0, PassSpec("canonicalize", {}))
    return specs


def _axis_names(program: Program) -> dict[str, str]:
    names = {}
    for name, node in program.input_nodes().items():
        for ax, kind in program.dynamic_axes.get(name, {}).items():
            names.setdefault(str(node.meta["val"].shape[ax]), kind)
    return names


def _dims(shape, axis_names) -> list:
    """Sizes as ints or axis names; an expression keeps its form ("past_sequence + sequence")."""
    def name(d):
        expr = d.node.expr
        named = {sym: sympy.Symbol(axis_names.get(str(sym), str(sym))) for sym in expr.free_symbols}
        return str(expr.xreplace(named))  # sympy orders the terms by name: the same text on every export
    return [int(d) if is_concrete_int(d) else name(d) for d in shape]


def io_spec(program: Program) -> tuple[list[dict], list[dict]]:
    names = _axis_names(program)
    inputs = [{"name": n, "dtype": str(node.meta["val"].dtype).removeprefix("torch."),
               "shape": _dims(node.meta["val"].shape, names),
               "axes": {str(a): k for a, k in program.dynamic_axes.get(n, {}).items()},
               **({"id_limit": program.id_limits[n]} if n in program.id_limits else {})}
              for n, node in program.input_nodes().items()]
    out_node = program.graph.output_node()
    vals = [a.meta["val"] for a in out_node.args[0]]
    outputs = [{"name": n, "dtype": str(v.dtype).removeprefix("torch."), "shape": _dims(v.shape, names)}
               for n, v in zip(program.output_names, vals)]
    return inputs, outputs


def _probe_texts(calib) -> list[str]:
    """The calibration text when it is text (it is the user's domain), else the shipped
    passages' evaluation split (never the part a calibration step may train on)."""
    from .data import default_texts, load_texts
    if calib is not None and Path(calib).suffix not in (".npy", ".pt"):
        return load_texts(calib)
    return default_texts("eval")


def compile(model, example_inputs=None, *, out=None, passes=None, recipe=None, backend: str | None = None,
            target: str = "x86-cpu", calib=None, force: bool = False, verify_each: bool = False,
            seq_len: int = DEFAULT_SEQ_LEN, max_seq_len: int | None = None, trust_pickle: bool = False,
            attn_implementation: str = "sdpa", measure: bool = True, bench_runs: int = 20,
            bench_time: float | None = 10.0, bench_len: int = 128, threads: int | None = None, texts: list[str] | None = None,
            generate: bool | None = None, progress: bool = False, precision: str = "auto", max_drop: str | None = None,
            optimize: str = "latency", search_time="20m", search_trials: int | None = None, seed: int = 0,
            max_memory: str | int | None = None, static_shapes: bool = False,
            extra_files: dict | None = None, extra_report: dict | None = None) -> CompileResult:
    """Compile ``model`` into a bundle at ``out`` and measure it. See ``tokopt compile --help``.
    A causal LM is compiled as one prefill/decode graph with a KV cache and the bundle's runner
    gets ``generate()`` unless ``generate=False`` (``None``: wherever the model and every pass
    allow it; ``True``: refuse where they do not). With ``max_drop`` (e.g. ``"cosine=0.002"``), the passes
    and backend are searched for the fastest (``optimize="latency"``) or smallest bundle within that
    quality budget (``optimizer/search.py``); ``backend`` then fixes the backend. ``static_shapes``
    (OpenVINO): the bundle's runner compiles one model per input shape, on first use."""
    if max_drop is not None:
        if static_shapes:
            raise UsageError("--static-shapes with --max-drop: the search times every candidate with dynamic "
                             "shapes; compile its recipe again with --static-shapes.")
        if passes is not None or recipe is not None:
            raise UsageError("--max-drop searches the passes itself: leave out --passes and --recipe (the search "
                             "writes the recipe it found to the bundle's recipe.yaml).")
        from .search import search
        return search(model, max_drop, out=out, optimize=optimize, search_time=search_time, trials=search_trials,
                      seed=seed, backend=backend, target=target, calib=calib, force=force, bench_len=bench_len,
                      bench_runs=bench_runs, threads=threads, progress=progress, measure=measure, seq_len=seq_len,
                      max_seq_len=max_seq_len, trust_pickle=trust_pickle, attn_implementation=attn_implementation,
                      generate=generate, precision=precision)
    backend = backend or "onnxruntime"
    stages: list[dict] = []
    the_plan = plan(plan_passes(passes, recipe), generate=bool(generate))
    pass_list = the_plan.passes
    refusing = [p for p in pass_list if p.on_generate]
    if generate is None and refusing:
        generate = False   # a causal LM keeps its full-sequence forward; the plan says why below
    be = get_backend(backend)
    if static_shapes and not be.static_shapes:
        raise UsageError(f"--static-shapes: the {be.name} backend runs one model for every input shape; static "
                         "shapes are an OpenVINO option (--backend openvino).")
    if static_shapes and generate:
        raise UsageError("--static-shapes with --generate: a generation graph's shapes change at every decode "
                         "step, each a compile; leave one of them out.")
    if static_shapes and generate is None:
        generate = False   # as a refusing pass does; the plan says why below
    tgt = be.target(target)
    be.check_precision(tgt, precision)
    if tgt.tensorrt is not None:   # no ONNX Runtime contrib ops there: a pass that asks for one adapts or refuses
        fitted = [p.for_standard_onnx(tgt.name) for p in pass_list]
        pass_list = [p for p, _ in fitted]
        the_plan.notes.extend(note for _, note in fitted if note)
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="tokopt-")) / "bundle"
    check_out(out, force)
    if calib is not None and not Path(calib).exists():
        raise UsageError(f"--calib {calib} does not exist. Give a text file, a JSONL of texts or a .npy of token ids.")
    check_threads(threads)
    if measure and (bench_runs < 0 or bench_len < 1):
        raise UsageError(f"bench_runs={bench_runs}, bench_len={bench_len}: bench_runs must be 0 or more (0: "
                         "quality without timing) and bench_len at least 1; --no-measure skips the measurement.")
    if measure and bench_time is not None and not bench_time > 0:
        raise UsageError(f"--bench-time {bench_time}: give the seconds each timing may take, more than 0.")
    if seq_len < 2:
        raise UsageError("--seq-len must be at least 2 (a length of 1 would be specialised by torch.export).")

    budget = parse_bytes(max_memory) if isinstance(max_memory, str) else max_memory
    # measured, ONNX Runtime's sessions hold their own (prepacked) copy; passes that make weights hold theirs
    share = min([p.weight_share() for p in pass_list] or [1.0])   # of the fp32 weights, in the bundle
    copies = COPIES * share if measure or any(FLOAT_WEIGHTS in p.requires for p in pass_list) else 0.0
    # passes that replace every weight they read: a half-precision checkpoint stays half
    keep_half = all(p.half_weights for p in pass_list) and any(p.quantizes_weights for p in pass_list)
    with stage("capture", stages, progress, f"capturing {model if isinstance(model, (str, Path)) else type(model).__name__}"):
        captured = capture(model, example_inputs, seq_len=seq_len, max_seq_len=max_seq_len,
                           trust_pickle=trust_pickle, attn_implementation=attn_implementation,
                           generate=generate, max_memory=budget, copies=copies, keep_half=keep_half)
    captured.calib = str(calib) if calib is not None else None
    if captured.task == "causal-lm" and captured.cache is None and refusing:
        the_plan.notes.append(f"compiled as the full-sequence forward, without generate(): {refusing[0].name} "
                              f"cannot run on a generation graph ({refusing[0].on_generate})")
    elif captured.task == "causal-lm" and captured.cache is None and static_shapes:
        the_plan.notes.append("compiled as the full-sequence forward, without generate(): with --static-shapes "
                              "each decode step's new shape would be a compile")
    weights = weights_bytes(captured)
    held = int(weights_bytes(captured, as_fp32=True) * share)   # fp32 floats; an int4 bundle's (bits + 1)/32 of them
    check_disk(out.parent, held + 2**26, f"the bundle ({held / 2**30:.1f} GiB of weights)")
    with stage("passes", None, progress, f"running passes: {', '.join(p.name for p in pass_list)}"):
        program = PassManager(pass_list, verify=verify_each, source_hint=str(model)).run(captured)
    stages += [{"stage": f"pass {h['name']}", "seconds": h["seconds"], "peak_rss_bytes": h["peak_rss_bytes"]}
               for h in program.history]

    with atomic_bundle(out, force) as tmp:
        note = f" ({be.lowering_note})" if be.lowering_note else ""
        page_out(captured, keep=program)   # the original's weights a pass replaced: not read until the report's probe
        with stage("lowering", stages, progress, f"lowering to {be.name} for {tgt.name}{note}"):
            lowered = be.lower(program, tmp, tgt, precision)
        if static_shapes:
            lowered["shapes"] = "static"
        if program.tokenizer_dir:
            (tmp / "tokenizer").mkdir()
            for name in _TOKENIZER_FILES:
                if (Path(program.tokenizer_dir) / name).exists():
                    shutil.copy2(Path(program.tokenizer_dir) / name, tmp / "tokenizer" / name)
        for name, content in {**program.artifacts, **(extra_files or {})}.items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=1) + "\n")
        inputs, outputs = io_spec(program)
        source = {k: v for k, v in program.source.items() if k != "module_prefix"}
        data = {"source": source, "backend": be.name, "target": tgt.name, "task": program.task,
                "passes": [{"name": p.name, "options": h["options"]} for p, h in zip(pass_list, program.history)],
                "inputs": inputs, "outputs": outputs, "seq_range": program.seq_range,
                "tokenizer": "tokenizer" if program.tokenizer_dir else None,
                "lowering": lowered, "calib": str(calib) if calib else None,
                "rounding": not is_exact(program.graph)}   # kernels may differ by a rounding step (verify's tolerance)
        if program.cache is not None:
            data["generation"] = {"graph": "one graph: prefill = empty cache, decode step = one token",
                                  "cache": program.cache.to_json(),
                                  "per_head_cache_length": None,  # None: every head keeps every token
                                  "shared_buffer": bool(lowered.pop("shared_buffer", False)),
                                  "one_row_chunks": bool(lowered.get("decoder", {}).get("cached_attention")),
                                  # right: a row's tokens are the first sum(attention_mask[b]) (ops/gqa.py)
                                  "padding_side": lowered.get("decoder", {}).get("padding_side", "left")}
        report = {"source": source.get("path", source.get("class", "module")), "backend": be.name,
                  "target": tgt.name, "passes": program.history, **({"plan": the_plan.notes} if the_plan.notes else {}),
                  "attention": [b.row() for b in program.attention],
                  "attention_refused": [r.__dict__ for r in program.rejected],
                  "size_bytes": {"tokopt": _model_bytes(tmp, lowered)}, **(extra_report or {}),
                  **({"converted": source["converted"]} if "converted" in source else {})}
        if measure:
            with stage("measurement", stages, progress, "measuring quality and latency against the original"):
                if texts is None and captured.tokenizer_dir:
                    texts = _probe_texts(calib)
                large = weights > LARGE_BYTES
                bench = Bench(bench_runs, bench_time, baseline=not large)
                if not bench_runs:
                    report["latency_skipped"] = "--bench-runs 0: quality only"
                elif large:
                    report["baseline_skipped"] = (f"the weights ({weights / 2**30:.1f} GiB) are above "
                                                  f"{LARGE_BYTES / 2**30:.0f} GiB; a second export would "
                                                  "double the compile's memory and time")
                report.update(_measure(be, tgt, captured, tmp, data, texts, bench, bench_len, threads, large))
        report["stages"] = {"rows": stages, "weights_bytes": weights, "peak_rss": PEAK_SOURCE}
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
        manifest = write_manifest(tmp, data)
    return CompileResult(out, manifest, report, program)


def _model_bytes(bundle: Path, lowered: dict) -> int:
    """What the device loads: model.onnx(.data), .xml + .bin, .pt2; the ORT-format model where there is one."""
    if "ort_model" in lowered:
        return (bundle / lowered["ort_model"]).stat().st_size
    return sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith(Path(lowered["model"]).stem + "."))


def _measure(be, tgt, captured: Program, bundle_dir: Path, data: dict, texts, bench: Bench, length: int,
             threads, large: bool) -> dict:
    # each quality probe opens the bundle's runner and drops it on return: the timing loads the bundle
    # itself, one copy of its weights in memory at a time
    where = be.checked_on(tgt)
    if captured.cache is not None:
        result = _generation_quality(captured, data, lambda: be.runner_cls(bundle_dir, data, threads=threads), texts,
                                     length)
        lengths = [length]   # the decode step at this context; then the first token after two prompt lengths
        bench = replace(bench, prefill=(length, *filter(None, [_longer_length(captured, length)])))
    else:
        # a large model is probed on 2 rows instead of 4: its original runs in torch on this CPU
        result = _encoder_quality(captured, lambda: be.runner_cls(bundle_dir, data, threads=threads), texts,
                                  length, batch=2 if large else 4)
        # the longer length is where passes that scale with length (pruning, sparse attention) show
        lengths = [length, *filter(None, [_longer_length(captured, length)])]
    lats = be.latency(captured, bundle_dir, tgt, bench, lengths, threads, manifest=data) if bench.runs else None
    if lats is not None and captured.cache is not None:
        result["latency"] = {**lats[0], "label": f"decode step, {length} cached tokens, batch 1"}
        result["first_token"] = [{**lat, "label": f"first token, {lat['feed']['input_ids'][1]}-token prompt, batch 1"}
                                 for lat in lats[1:]]
    elif lats is not None:
        result.update(zip(("latency", "latency_long"), lats))
    return {**result, **({"checked_on": where} if where else {})}


def _encoder_quality(captured: Program, open_runner, texts, length: int, batch: int) -> dict:
    feed, desc = probe_inputs(captured, texts, length=length, batch=batch)
    reference = captured.runner(release_mapped=True)(feed)
    page_out(captured)   # the original's weights leave memory before the bundle's are loaded
    runner = open_runner()
    got = runner(**{k: v.numpy() for k, v in feed.items()})
    if any(got[k].shape != tuple(reference[k].shape) for k in reference):
        # the bundle changes the token count: compare what its contract keeps, row by row
        q = quality_rows(captured, lambda row: runner(**{k: v.numpy() for k, v in row.items()}), feed)
    else:
        del runner   # its weights leave memory before the comparison's float64 work
        q = quality(captured, reference, got, feed)
    q["probe"] = desc + (f" (2 rows, not 4: the weights are above {LARGE_BYTES / 2**30:g} GiB)" if batch == 2 else "")
    return {"quality": q}


def _longer_length(captured: Program, length: int) -> int | None:
    """The report's second latency length: 4x the first, or the model's limit; None for inputs
    whose length is fixed (images) or when the limit leaves nothing longer."""
    if "input_ids" not in captured.input_names:
        return None
    limit = (captured.seq_range or (1, None))[1]
    longer = 4 * length if limit is None else min(4 * length, limit)
    return longer if longer > length else None


def _generation_quality(captured: Program, data: dict, open_runner, texts, length: int, steps: int = 16) -> dict:
    ids, mask, desc = generation_prompts(captured, texts, length)
    spec = CacheSpec.from_json(data["generation"]["cache"])
    q, runner = generation_quality(captured, open_runner, ids, mask, steps, spec)
    q["probe"] = f"{desc}, {steps} decode steps"
    full = {str(n): captured.cache.nbytes(n) for n in (1024, 4096)}
    result = {"quality": q, "kv_cache_bytes": full}
    if spec.index or spec.keeps:  # a compacting cache: what the bundle holds after a prefill of n tokens, measured
        result["kv_cache_bytes"] = {str(n): spec.held_bytes(runner(**{k: v.numpy() for k, v in
                                                                      example_feed(spec, 1, n, 0).items()}))
                                    for n in (1024, 4096) if spec.max_length is None or n <= spec.max_length}
        result["kv_cache_bytes_full"] = full
    return result
