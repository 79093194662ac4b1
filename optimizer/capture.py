"""Capture: a model source -> ``Program`` (a ``torch.export`` graph with dynamic batch/sequence).

Sources:
    HF folder       config.json + safetensors; the class from ``architectures`` (else the Auto
                    class for ``model_type``); ``attn_implementation="sdpa"`` unless asked (``eager``
                    for a class without SDPA attention)
    nn.Module       with example inputs (Python API)
    *.pt2           a saved ``ExportedProgram``
    "pkg.mod:fn"    a callable returning ``(module, example_inputs)``

Refused with a message naming the file: a missing config, truncated or corrupt safetensors,
pickle weights without ``trust_pickle``, an unknown architecture, a graph torch.export rejects.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from .errors import CaptureError, UnsupportedModelError, UsageError
from .generation import HALF, LOGITS_INDEX, CacheSpec, GenerateEntry, cache_spec, example_feed, run_model
from .program import Program
from .resources import COPIES, check_disk, check_fits, checkpoint_bytes, releasing_mapped, widen_to_fp32

__all__ = ["capture", "sha256_files", "DEFAULT_SEQ_LEN"]

DEFAULT_SEQ_LEN = 16
_WRAPPER_PREFIX = "model."
_SKIP_OUTPUTS = {"past_key_values", "hidden_states", "attentions", "cross_attentions", "loss"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class _Entry(torch.nn.Module):
    """Calls the model with named inputs and returns a flat tuple of the chosen outputs."""

    def __init__(self, model: torch.nn.Module, outputs: list[str], extra: dict[str, Any], widen: bool = False):
        super().__init__()
        self.model, self.outputs, self.extra, self.widen = model, outputs, extra, widen

    def call(self, **inputs):
        out = run_model(self.model, {**inputs, **self.extra}, self.widen)
        if isinstance(out, torch.Tensor):
            return (out,)
        if isinstance(out, dict):
            return tuple(out[k] for k in self.outputs)
        return tuple(out[i] for i in range(len(self.outputs)))


def _named(base: type, names: list[str]) -> type:
    """A subclass of ``base`` whose forward takes ``names`` as real parameters and passes them
    to ``base.call`` by name, so the exported graph's placeholders (and a saved .pt2's inputs)
    carry the model's input names."""
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"input names must be Python identifiers; got {bad}.")
    params = ", ".join(names)
    scope: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self.call({', '.join(f'{n}={n}' for n in names)})", scope)
    return type(f"_Named{base.__name__.lstrip('_')}", (base,), {"forward": scope["forward"]})


def sha256_files(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _output_names(out) -> list[str]:
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, dict):
        return [k for k, v in out.items() if isinstance(v, torch.Tensor) and k not in _SKIP_OUTPUTS]
    return [f"output_{i}" for i, v in enumerate(out) if isinstance(v, torch.Tensor)]


def _default_dynamic(name: str, t: torch.Tensor) -> dict[int, str]:
    if name == "pixel_values" or t.dim() == 0:
        return {0: "batch"} if t.dim() else {}
    axes = {0: "batch"}
    if t.dim() >= 2 and (not t.is_floating_point() or t.dim() == 3):
        axes[1] = "sequence"
    return axes


def _export(entry: torch.nn.Module, names, inputs, dynamic_axes) -> torch.export.ExportedProgram:
    spec = {n: {ax: Dim.AUTO for ax in dynamic_axes.get(n, {})} or None for n in names}
    try:
        with torch.no_grad():
            ep = torch.export.export(entry, tuple(inputs[n] for n in names), dynamic_shapes=spec, strict=False)
    except Exception as e:  # torch raises many types here; the user needs the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(
            f"torch.export could not capture the model: {first}. {_untraceable(entry) or ''}tokopt needs a "
            "model that torch.export can trace; try --attn eager, or export it yourself and pass the .pt2.") from e
    _casts_at_use(ep)
    return ep


def _casts_at_use(ep: torch.export.ExportedProgram) -> None:
    """Each cast of a half-precision weight to fp32 (``run_model`` casts them all before the model
    runs) moved to just before the op that reads it, one per reader: a run then holds one
    widened weight at a time, not the whole model in fp32."""
    graph = ep.graph_module.graph
    weights = {n for n in graph.nodes if n.op == "placeholder" and getattr(n.meta.get("val"), "dtype", None) in HALF}
    casts = [n for n in graph.nodes if n.target is torch.ops.aten.to.dtype and n.args[0] in weights]
    for cast in casts:
        for user in list(cast.users):
            with graph.inserting_before(user):
                mine = graph.call_function(torch.ops.aten.to.dtype, cast.args, cast.kwargs)
            mine.meta.update(cast.meta)
            user.replace_input_with(cast, mine)
        graph.erase_node(cast)
    if casts:
        ep.graph_module.recompile()


def _untraceable(entry: torch.nn.Module) -> str | None:
    """What in the model's config makes a graph depend on the data, where it is known."""
    cfg = getattr(entry, "config", None) or getattr(getattr(entry, "model", None), "config", None)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kinds = [rope] + [v for v in rope.values() if isinstance(v, dict)] if isinstance(rope, dict) else []
    if any(k.get("rope_type", k.get("type")) == "dynamic" for k in kinds):
        return ("Its RoPE scaling is 'dynamic' (NTK): each call recomputes the frequencies from the longest "
                "position it sees, a branch on the data that no one graph holds; a fixed scaling ('linear', "
                "'yarn', 'llama3') traces. ")
    return None


def _actual_axes(ep, names, wanted) -> dict[str, dict[int, str]]:
    """Which requested axes stayed symbolic after export (a model may specialise one)."""
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user = placeholders[len(placeholders) - len(names):]
    got = {}
    for name, node in zip(names, user):
        shape = node.meta["val"].shape
        got[name] = {ax: kind for ax, kind in wanted.get(name, {}).items()
                     if not isinstance(shape[ax], int)}
    return got


def _distinct_sizes(example: dict[str, torch.Tensor], axes: dict[str, dict[int, str]]) -> dict[str, torch.Tensor]:
    """The example with every dynamic axis at least 2 long and each kind of axis (batch,
    sequence) a size no other kind has: torch.export fixes a size-1 dimension, and gives
    dimensions of equal size one symbol. Rows and tokens are repeated cyclically."""
    sizes: dict[str, int] = {}
    for name, kinds in axes.items():
        for ax, kind in kinds.items():
            sizes.setdefault(kind, example[name].shape[ax])
    wanted: dict[str, int] = {}
    for kind, size in sizes.items():
        size = max(size, 2)
        while size in wanted.values():
            size += 1
        wanted[kind] = size
    out = dict(example)
    for name, kinds in axes.items():
        for ax, kind in kinds.items():
            t = out[name]
            if t.shape[ax] != wanted[kind]:
                out[name] = t.index_select(ax, torch.arange(wanted[kind]) % t.shape[ax])
    return out


def _from_module(model: torch.nn.Module, example: dict[str, torch.Tensor], *, source: dict,
                 task: str = "generic", extra: dict | None = None, seq_range=None,
                 tokenizer_dir=None, dynamic_axes=None, widen: bool = False) -> Program:
    model.eval()
    names = list(example)
    extra = extra or {}
    # for the output names, as the model is: widened, it would hold every weight in fp32
    with torch.no_grad(), releasing_mapped(model):
        out = model(**example, **extra)
    outputs = _output_names(out)
    if not outputs:
        raise UnsupportedModelError("the model returns no tensors; tokopt compiles models that "
                                    "return a tensor, a tuple of tensors or a ModelOutput.")
    entry = _named(_Entry, names)(model, outputs, extra, widen)
    wanted = dynamic_axes or {n: _default_dynamic(n, t) for n, t in example.items()}
    example = _distinct_sizes(example, wanted)
    ep = _export(entry, names, example, wanted)
    prog = Program(ep=ep, input_names=names, output_names=outputs,
                   dynamic_axes=_actual_axes(ep, names, wanted), probe=dict(example), task=task,
                   source={**source, "module_prefix": _WRAPPER_PREFIX}, module=model,
                   seq_range=seq_range, tokenizer_dir=tokenizer_dir)
    return prog


def _generate_program(model: torch.nn.Module, *, source: dict, max_len: int | None,
                      tokenizer_dir=None, spec: CacheSpec | None = None, widen: bool = False) -> Program:
    """The one-graph prefill/decode program of a causal LM (see ``optimizer/generation.py``);
    ``spec``: its cache layout where already read (``_plain_cache``)."""
    model.eval()
    spec = cache_spec(model, max_len, widen) if spec is None else replace(spec, max_length=max_len)
    names = ["input_ids", "attention_mask", "position_ids", LOGITS_INDEX, *spec.input_names]
    # Distinct example sizes (batch 2, 4 new tokens, 5 cached, logits of 3), so no two axes share a symbol.
    example = example_feed(spec, batch=2, seq=4, past=5, logits=3)
    wanted = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
              "position_ids": {0: "batch", 1: "sequence"}, LOGITS_INDEX: {0: "logits"},
              **{n: {0: "batch", 2: "past_sequence"} for n in spec.input_names}}
    ep = _export(_named(GenerateEntry, names)(model, spec.layers, widen), names, example, wanted)
    _select_logit_rows(ep)
    prog = Program(ep=ep, input_names=names, output_names=["logits", *spec.output_names],
                   dynamic_axes=_actual_axes(ep, names, wanted), probe=example, task="causal-lm",
                   source={**source, "module_prefix": _WRAPPER_PREFIX}, module=model,
                   seq_range=(1, max_len), tokenizer_dir=tokenizer_dir, cache=spec)
    return prog


def _select_logit_rows(ep: torch.export.ExportedProgram) -> None:
    """transformers picks the positions to score with ``hidden[:, logits_index]``, an aten.index
    that exports to ONNX as Transpose-Gather-Transpose, and ONNX Runtime folds those transposes
    into a FusedMatMul with the LM head that fails at batch > 1. ``index_select`` on the axis is
    one Gather."""
    graph = ep.graph
    for node in list(graph.nodes):
        if node.target is torch.ops.aten.index.Tensor and len(node.args[1]) == 2 and node.args[1][0] is None \
                and getattr(node.args[1][1], "name", None) == LOGITS_INDEX:
            with graph.inserting_before(node):
                rows = graph.call_function(torch.ops.aten.index_select.default, (node.args[0], 1, node.args[1][1]))
            rows.meta = dict(node.meta)
            node.replace_all_uses_with(rows)
            graph.erase_node(node)
    ep.graph_module.recompile()


def _context_limit(config) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and _task(model, type(model).__name__) == "causal-lm"


def _plain_cache(model: torch.nn.Module, widen: bool = False) -> CacheSpec | None:
    """The cache layout of a causal LM with a plain per-layer KV cache (what the generation graph
    needs; read by an eager prefill, so read once); None for any other model."""
    if not _is_causal_lm(model):
        return None
    try:
        return cache_spec(model, None, widen)
    except UnsupportedModelError:
        return None


def _require_causal_lm(model: torch.nn.Module, name: str) -> None:
    if not _is_causal_lm(model):
        raise UsageError(f"--generate needs a causal language model (a transformers *ForCausalLM or "
                         f"*LMHeadModel); {name} is not one.")


# --- Hugging Face folders -------------------------------------------------------------------

def _check_weights(folder: Path, trust_pickle: bool) -> list[Path]:
    safet = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if not safet and not pickles:
        raise CaptureError(f"{folder} has no weights (no *.safetensors file). Save the model with "
                           "model.save_pretrained(folder) and try again.")
    if not safet and not trust_pickle:
        raise CaptureError(f"{pickles[0]} is a pickle file, which can run arbitrary code when "
                           "loaded. Convert it to safetensors, or pass --trust-pickle if you "
                           "trust where it came from.")
    from safetensors import safe_open
    for f in safet:
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except Exception as e:
            raise CaptureError(f"{f} is not a readable safetensors file ({e}). The file is "
                               "truncated or corrupt: copy or save it again.") from e
    return safet or pickles


def _model_class(config, folder: Path):
    import transformers
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except KeyError:
        archs = getattr(config, "architectures", None)
        raise UnsupportedModelError(
            f"{folder / 'config.json'}: architecture {archs or config.model_type!r} is not one "
            "transformers provides. Use a model class from transformers, or pass an nn.Module "
            "through the Python API.") from None


def _example_text(config, forward_params, batch: int, seq: int, gen: torch.Generator):
    vocab = int(getattr(config, "vocab_size", 0) or 1000)
    # Stay clear of the low ids, where special tokens usually live.
    ids = torch.randint(min(10, vocab - 1), vocab, (batch, seq), generator=gen)
    ex = {"input_ids": ids}
    if "attention_mask" in forward_params:
        ex["attention_mask"] = torch.ones_like(ids)
    return ex


def _example_image(config, batch: int, gen: torch.Generator):
    size = getattr(config, "image_size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return {"pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), *size, generator=gen)}


def _task(model, cls_name: str) -> str:
    if cls_name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if getattr(model, "main_input_name", "") == "pixel_values":
        return "vision"
    return "encoder"


def _from_hf_folder(folder: Path, *, seq_len: int, max_seq_len: int | None, trust_pickle: bool,
                    attn_implementation: str, generate: bool | None = False, max_memory: int | None = None,
                    copies: float = COPIES, keep_half: bool = False) -> Program:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CaptureError(f"{folder} has no config.json, so it is not a Hugging Face model "
                           "folder. Save the model with save_pretrained(), or pass a .pt2 file.")
    try:
        json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CaptureError(f"{cfg_path} is not valid JSON ({e}). Restore the file.") from e
    weights = _check_weights(folder, trust_pickle)
    load_from, widened, half = folder, None, False
    if weights[0].suffix == ".safetensors":
        stored_bytes, as_fp32, largest = checkpoint_bytes(weights)
        half = keep_half and stored_bytes != as_fp32
        check_fits(as_fp32, largest, max_memory, str(folder), copies)
        if stored_bytes != as_fp32 and not half:   # half precision: an fp32 copy on disk, mapped like any checkpoint
            widened = tempfile.TemporaryDirectory(prefix="tokopt-fp32-")
            check_disk(Path(widened.name), as_fp32, f"the fp32 copy of {folder}'s half-precision weights")
            load_from = widen_to_fp32(folder, weights, Path(widened.name))
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{cfg_path}: transformers does not know this model type "
                                    f"({str(e).splitlines()[0]}). Upgrade transformers or use a "
                                    "supported architecture.") from e
    cls = _model_class(config, folder)
    stored = getattr(config, "dtype", None)
    stored = stored if isinstance(stored, torch.dtype) else torch.float32
    if attn_implementation == "sdpa" and not getattr(cls, "_supports_sdpa", True):
        # no SDPA path in the class (Gemma 2, MPNet, DeBERTa-v2): its own attention, which transformers
        # would otherwise refuse to load; the source records what was loaded
        attn_implementation = "eager"
    try:
        # the graph computes in fp32 (the lowering's check and the CPU targets run fp32 kernels): a
        # half-precision checkpoint is widened, or, for passes that replace the weights (``keep_half``),
        # kept as it is and read through casts (``run_model``)
        model = cls.from_pretrained(load_from, local_files_only=True, attn_implementation=attn_implementation,
                                    dtype="auto" if half else torch.float32, config=config)
    except Exception as e:
        raise CaptureError(f"{folder}: loading the weights into {cls.__name__} failed "
                           f"({str(e).strip().splitlines()[0]}). Check that the weights belong "
                           "to this config.") from e
    finally:
        if widened is not None:
            widened.cleanup()   # the mapped files stay readable until unmapped
    model.eval()
    if half:   # what the files hold, whatever the config says
        stored = next(p.dtype for p in model.parameters() if p.dtype in HALF)
    limit = _context_limit(config)
    if max_seq_len is not None and limit is not None and max_seq_len > limit:
        raise UsageError(f"--max-seq-len {max_seq_len} is longer than the model's "
                         f"max_position_embeddings ({limit}). Pass at most {limit}.")
    max_len = max_seq_len or limit
    if max_len is not None and seq_len > max_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the maximum sequence length {max_len}.")
    tok = folder if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                        "vocab.txt")) else None
    source = {"kind": "hf-folder", "path": str(folder.resolve()), "class": cls.__name__,
              "sha256": sha256_files(weights), "attn_implementation": attn_implementation,
              **({"half_weights": f"{str(stored).removeprefix('torch.')}, read as float32 by the graph"} if half
                 else {"converted": f"{str(stored).removeprefix('torch.')} -> float32"} if stored != torch.float32
                 else {})}
    spec = _plain_cache(model, half) if generate is None else None
    if generate is None:
        generate = spec is not None
    if generate:
        _require_causal_lm(model, str(folder))
        return _generate_program(model, source=source, max_len=max_len, tokenizer_dir=str(tok) if tok else None,
                                 spec=spec, widen=half)
    gen = torch.Generator().manual_seed(0)
    params = inspect.signature(model.forward).parameters
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        example, seq_range = _example_image(config, 2, gen), None
    else:
        example, seq_range = _example_text(config, params, 2, seq_len, gen), (1, max_len)
    extra = {"return_dict": True}
    if "use_cache" in params:
        extra["use_cache"] = False
    return _from_module(model, example, source=source, task=_task(model, cls.__name__), extra=extra,
                        seq_range=seq_range, tokenizer_dir=str(tok) if tok else None, widen=half)


# --- other sources --------------------------------------------------------------------------

def _example_from_placeholder(node) -> torch.Tensor:
    val = node.meta["val"]
    shape = [int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
    if val.dtype.is_floating_point:
        return torch.randn(shape, dtype=val.dtype, generator=torch.Generator().manual_seed(0))
    return torch.zeros(shape, dtype=val.dtype)


def _from_pt2(path: Path) -> Program:
    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise CaptureError(f"{path} is not a loadable torch.export archive ({e}). Save it with "
                           "torch.export.save(exported_program, path).") from e
    user = ep.graph_signature.user_inputs
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    probe = {name: _example_from_placeholder(placeholders[name]) for name in user}
    axes = {}
    for name in user:
        shape = placeholders[name].meta["val"].shape
        axes[name] = {i: ("batch" if i == 0 else "sequence") for i, s in enumerate(shape)
                      if isinstance(s, torch.SymInt)}
    n_out = len(ep.graph_signature.user_outputs)
    outs = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    prog = Program(ep=ep, input_names=list(user), output_names=outs, dynamic_axes=axes, probe=probe,
                   source={"kind": "pt2", "path": str(path.resolve()), "sha256": sha256_files([path])})
    return prog


def _names_for(module: torch.nn.Module, example) -> dict[str, torch.Tensor]:
    if isinstance(example, dict):
        return dict(example)
    example = example if isinstance(example, (tuple, list)) else (example,)
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) < len(example):
        raise UsageError("more example inputs than the module's forward() takes.")
    return {p.name: t for p, t in zip(params, example)}


def _from_callable(spec: str, **kw) -> Program:
    mod_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise CaptureError(f"cannot import {spec!r} ({e}). Give 'package.module:callable' "
                           "importable from the current environment.") from e
    got = fn()
    if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], torch.nn.Module)):
        raise CaptureError(f"{spec} must return (module, example_inputs); it returned {type(got).__name__}.")
    return capture(got[0], got[1], **kw)


def capture(source, example_inputs=None, *, seq_len: int = DEFAULT_SEQ_LEN, max_seq_len: int | None = None,
            trust_pickle: bool = False, attn_implementation: str = "sdpa",
            dynamic_axes: dict[str, dict[int, str]] | None = None, generate: bool | None = False,
            max_memory: int | None = None, copies: float = COPIES, keep_half: bool = False) -> Program:
    """Capture ``source`` into a Program (see the module docstring for the accepted sources).
    With ``generate``, a causal LM becomes the prefill/decode graph with a KV cache; with
    ``generate=None``, a causal LM with a plain KV cache does (a folder, or a module given without
    example inputs), anything else its forward. A folder whose
    compile would not fit ``max_memory`` bytes (default: the memory available) is refused unread
    (``copies``: see ``resources.check_fits``). ``keep_half``: a folder's half-precision weights stay
    as they are, read through casts by a graph that computes in fp32 (for passes that replace them)."""
    if isinstance(source, torch.export.ExportedProgram):
        raise UsageError("pass a saved .pt2 path (torch.export.save), not an ExportedProgram object.")
    spec = None
    if isinstance(source, torch.nn.Module) and generate is None:
        spec = _plain_cache(source) if example_inputs is None else None
        generate = spec is not None
    if isinstance(source, torch.nn.Module) and generate:
        _require_causal_lm(source, type(source).__name__)
        return _generate_program(source, source={"kind": "module", "class": type(source).__name__},
                                 max_len=max_seq_len or _context_limit(source.config), spec=spec)
    if isinstance(source, torch.nn.Module):
        if example_inputs is None:
            raise UsageError("an nn.Module needs example_inputs (a dict name -> tensor, or a tuple).")
        example = _names_for(source, example_inputs)
        return _from_module(source, example, source={"kind": "module", "class": type(source).__name__},
                            dynamic_axes=dynamic_axes)
    text = str(source)
    path = Path(text)
    if path.suffix == ".pt2":
        if not path.exists():
            raise CaptureError(f"{path} does not exist.")
        if generate:   # None: a .pt2 is its one graph
            raise UsageError("--generate needs the model itself (a Hugging Face folder or a module): "
                             "a .pt2 holds one fixed graph with no KV cache to build.")
        return _from_pt2(path)
    if path.is_dir():
        return _from_hf_folder(path, seq_len=seq_len, max_seq_len=max_seq_len, trust_pickle=trust_pickle,
                               attn_implementation=attn_implementation, generate=generate, max_memory=max_memory,
                               copies=copies, keep_half=keep_half)
    if ":" in text and not path.exists() and not text.startswith((".", "/")):
        return _from_callable(text, seq_len=seq_len, max_seq_len=max_seq_len, generate=generate)
    if path.exists():
        raise CaptureError(f"{path} is a file, not a model folder. Pass the Hugging Face folder that "
                           "holds config.json, a .pt2 file, or 'package.module:callable'.")
    raise CaptureError(f"{text} does not exist. Pass a Hugging Face model folder, a .pt2 file or "
                       "'package.module:callable'.")
