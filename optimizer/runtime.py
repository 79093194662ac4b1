"""The backend contract (registry, lowering, runners) and ``load(bundle)``.

The core knows backends only through ``BACKENDS``; a backend module registers itself. A runner
is what ``tokopt.load`` returns: ``runner(**inputs) -> {output name: np.ndarray}``. It checks
input names, ranks and the sequence range against the manifest before calling the engine, so a
wrong input gets a message in tokopt's words instead of one from deep inside the runtime. A
causal LM's bundle (compiled for generation, the default) also answers ``runner.generate(...)``
on every backend, and a plain call of it is the full-sequence forward.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np

from .errors import BackendError, BundleError, UsageError, did_you_mean

__all__ = ["Backend", "Runner", "BACKENDS", "register_backend", "get_backend", "load", "load_tokenizer"]


def load_tokenizer(folder, padding_side: str | None = None):
    """A local tokenizer that can pad (with EOS, else UNK, where it has no pad token)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if padding_side is not None:
        tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


class Runner:
    def __init__(self, bundle: Path, manifest: dict):
        self.bundle, self.manifest = Path(bundle), manifest
        self.inputs = {i["name"]: i for i in manifest["inputs"]}
        self.output_names = [o["name"] for o in manifest["outputs"]]

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def _feed(self, inputs: dict) -> dict[str, np.ndarray]:
        if self.manifest.get("generation") and "input_ids" in inputs:
            inputs = self._forward_defaults(inputs)
        unknown = set(inputs) - set(self.inputs)
        if unknown:
            name = sorted(unknown)[0]
            raise UsageError(f"the bundle has no input '{name}'.{did_you_mean(name, self.inputs)} "
                             f"Its inputs: {', '.join(self.inputs)}.")
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise UsageError(f"input '{missing[0]}' is missing; the bundle needs {', '.join(self.inputs)}.")
        feed = {}
        lo, hi = self.manifest.get("seq_range") or (None, None)
        for name, spec in self.inputs.items():
            arr = np.asarray(inputs[name].numpy() if hasattr(inputs[name], "numpy") else inputs[name])
            if arr.ndim != len(spec["shape"]):
                raise UsageError(f"input '{name}' has {arr.ndim} dims; the bundle expects "
                                 f"{len(spec['shape'])} ({spec['shape']}).")
            for ax, dim in enumerate(spec["shape"]):
                if isinstance(dim, int) and arr.shape[ax] != dim:
                    raise UsageError(f"input '{name}' has size {arr.shape[ax]} on axis {ax}; the "
                                     f"bundle was compiled for {dim} there.")
            if hi is not None and arr.ndim >= 2 and "sequence" in spec.get("axes", {}).values() \
                    and not lo <= arr.shape[1] <= hi:
                raise UsageError(f"input '{name}' has {arr.shape[1]} tokens; this bundle accepts "
                                 f"{lo} to {hi}. Shorten the input, or, where the model's positions "
                                 "reach further, recompile with a larger --max-seq-len.")
            limit = spec.get("id_limit")
            if limit is not None and arr.size and not 0 <= arr.min() <= arr.max() < limit:
                bad = arr.min() if arr.min() < 0 else arr.max()
                raise UsageError(f"input '{name}' holds {bad}; this bundle's {name} index a table of "
                                 f"{limit} rows, so each must be in 0..{limit - 1}. Were the ids made "
                                 "by another model's tokenizer?")
            feed[name] = arr.astype(spec["dtype"], copy=False)
        index = feed.get("logits_index")
        if index is not None and index.size and not 0 <= index.min() <= index.max() < feed["input_ids"].shape[1]:
            raise UsageError(f"logits_index holds {index.min() if index.min() < 0 else index.max()}; it picks which of "
                             f"the {feed['input_ids'].shape[1]} new tokens get logits, so each must be in "
                             f"0..{feed['input_ids'].shape[1] - 1} (leave it out for all of them).")
        gen = self.manifest.get("generation") or {}
        if gen.get("one_row_chunks") and feed["input_ids"].shape[0] > 1 and feed["input_ids"].shape[1] > 1 \
                and feed["past_key_0"].shape[2] > 0:
            raise UsageError("this bundle's decoder kernel (ONNX Runtime's GroupQueryAttention) takes several new "
                             "tokens after a cache for one row at a time: prefill a batch into an empty cache and "
                             "decode it a token at a time, or feed the rows one by one.")
        return feed

    def _forward_defaults(self, inputs: dict) -> dict:
        """A generation bundle called as a full-sequence forward (``runner(input_ids=...,
        attention_mask=...)``): what the call leaves out is filled as the model's own forward
        would take it: an empty cache, positions counted from the cache's length (as a
        --no-generate bundle and transformers' forward count them), every new position's logits.
        A call that gives part of the cache gets no defaults for the rest (the missing-input
        message names it)."""
        from .generation import LOGITS_INDEX
        spec = self.cache_spec()
        ids = np.asarray(inputs["input_ids"].numpy() if hasattr(inputs["input_ids"], "numpy") else inputs["input_ids"])
        if ids.ndim != 2:
            return inputs   # the rank check reports it
        out = dict(inputs)
        if not any(n in inputs for n in spec.input_names):
            out.update({k: v.numpy() for k, v in spec.empty(ids.shape[0]).items()})
        past = np.asarray(out[spec.input_names[0]]).shape[2] if spec.input_names[0] in out else 0
        if "attention_mask" not in out:
            out["attention_mask"] = np.ones((ids.shape[0], past + ids.shape[1]), dtype=np.int64)
        if "position_ids" in self.inputs and "position_ids" not in out:   # as transformers' forward counts them
            out["position_ids"] = np.ascontiguousarray(np.broadcast_to(np.arange(past, past + ids.shape[1]), ids.shape))
        if LOGITS_INDEX in self.inputs and LOGITS_INDEX not in out:
            out[LOGITS_INDEX] = np.arange(ids.shape[1], dtype=np.int64)
        return out

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        feed = self._feed(inputs)
        mask = feed.get("attention_mask")
        if self.right_padded and mask is not None and mask.shape[1] > 1 and (np.diff(mask, axis=1) > 0).any():
            raise UsageError("this bundle's rows take right padding (ONNX Runtime's decoder kernel reads a row's "
                             "length off attention_mask): put each row's tokens first and its padding after them "
                             "(a tokenizer's padding_side='right'); generate() does this itself.")
        return dict(zip(self.output_names, self._run(feed)))

    def decoding(self, batch: int, capacity: int, drafts: bool = False):
        """A decoding session (see ``generation.generate_ids``) for ``batch`` rows of at most
        ``capacity`` tokens, ``drafts``: whose steps may be taken back (prompt lookup); this one
        feeds the cache through the bundle's inputs and outputs."""
        from .generation import LOGITS_INDEX, FeedDecoding
        return FeedDecoding(lambda feed: self(**feed), self.cache_spec(), index=LOGITS_INDEX in self.inputs,
                            right_padded=self.right_padded)

    @property
    def right_padded(self) -> bool:
        """Whether the bundle's rows take right padding (a generation graph whose every layer is on
        ONNX Runtime's decoder kernel, as onnxruntime-genai's): a row's tokens are its first
        ``attention_mask[b].sum()``."""
        return (self.manifest.get("generation") or {}).get("padding_side") == "right"

    def _check_prompt(self, input_ids, attention_mask) -> None:
        """The input checks of a call, once for the prompt (decoding steps skip them)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim == 2 and ids.size:
            mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
            self._feed({"input_ids": ids, "attention_mask": mask})

    def tokenizer(self, padding_side: str | None = None):
        if not self.manifest.get("tokenizer"):
            raise UsageError(f"{self.bundle} has no tokenizer, so it cannot take text; pass token ids.")
        return load_tokenizer(self.bundle / self.manifest["tokenizer"], padding_side)

    def cache_spec(self):
        """The KV cache layout of a ``--generate`` bundle; a UsageError for any other."""
        from .generation import CacheSpec
        gen = self.manifest.get("generation")
        if gen is None:
            raise UsageError(f"{self.bundle} has no decode graph: it was compiled with --no-generate, from a "
                             "model that is not a causal LM, or with a pass that needs the full-sequence forward "
                             "(its report says which). Recompile it with `tokopt compile MODEL --generate`.")
        return CacheSpec.from_json(gen["cache"])

    def generate(self, prompt=None, *, input_ids=None, attention_mask=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, stop_tokens=None, on_text=None, on_token=None, prompt_lookup: int = 0):
        """Greedy (default) or seeded sampling from a ``--generate`` bundle.

        ``prompt``: a string or a list of strings (needs the bundle's tokenizer; batches are
        left-padded) -> the generated continuation(s) as text. ``input_ids`` (+ optional
        ``attention_mask``, zeros on the left for padding) -> ``[B, S + new]`` ids. Generation
        stops at ``max_new_tokens`` or when every row has produced a stop token (the model's
        EOS, plus ``stop_tokens``). ``on_text(str)`` receives the first row's text as it grows;
        ``on_token(ids)`` each step's new token per row. ``prompt_lookup=k`` (one prompt, greedy)
        drafts up to k tokens a step from earlier in the text and verifies them in one call: the
        same tokens in fewer calls where the text repeats itself (code, quotes, edits)."""
        from .generation import decode_text, generate_ids
        spec = self.cache_spec()
        tok = None
        if prompt is not None:
            tok = self.tokenizer(padding_side="left")
            enc = tok([prompt] if isinstance(prompt, str) else list(prompt), return_tensors="np", padding=True)
            input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        elif input_ids is None:
            raise UsageError("give a prompt (text) or input_ids to generate from.")
        if on_text is not None:
            tok = tok or self.tokenizer()
            on_token = _text_stream(tok, on_text, on_token)
        self._check_prompt(input_ids, attention_mask)
        ids = generate_ids(self, spec, input_ids, attention_mask,
                           max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens, on_token=on_token,
                           prompt_lookup=prompt_lookup)
        if prompt is None:
            return ids
        texts = decode_text(tok, ids, np.asarray(input_ids).shape[1])
        return texts[0] if isinstance(prompt, str) else texts


def _text_stream(tok, on_text, on_token):
    """An on_token callback that hands ``on_text`` each new piece of the first row's text
    (held back while the bytes decoded so far end inside a character)."""
    got, shown = [], [""]

    def step(ids):
        got.append(int(ids[0]))
        text = tok.decode(got, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(shown[0]):
            on_text(text[len(shown[0]):])
            shown[0] = text
        if on_token is not None:
            on_token(ids)
    return step


class Backend:
    name: ClassVar[str]
    runner_cls: ClassVar[type[Runner]]
    lowering_note: ClassVar[str] = ""   # what the progress line says of a slow lowering
    static_shapes: ClassVar[bool] = False   # can run a model compiled per input shape (--static-shapes)

    def target(self, name: str):
        """The target profile ``name``, checked for this machine (raises if unusable)."""
        raise NotImplementedError

    def check_precision(self, target, precision: str) -> None:
        """Refuse (UsageError) a ``--precision`` this backend cannot give on ``target``."""
        if precision not in ("auto", "fp32"):
            raise UsageError(f"precision {precision!r}: the {self.name} backend runs the graph's own precision "
                             "(auto or fp32); bf16 is an OpenVINO precision (--backend openvino).")

    def lower(self, program, out_dir: Path, target, precision: str = "auto") -> dict:
        """Write the engine files into ``out_dir``; return {"model": file, ...details}."""
        raise NotImplementedError

    def checked_on(self, target) -> str | None:
        """Where the compile checks a bundle for ``target`` when that is not the target itself."""
        return None

    def latency(self, captured, bundle_dir: Path, target, bench, lengths: list[int],
                threads: int | None, manifest: dict) -> list[dict] | None:
        """Time the bundle against this backend's no-pass baseline (where ``bench.baseline``) at
        each length as ``bench`` (``report.Bench``) says: one result each, the baseline built once;
        None where it cannot run here."""
        return None


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls):
    BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise UsageError(f"unknown backend '{name}'.{did_you_mean(name, BACKENDS)} "
                         f"Known backends: {', '.join(BACKENDS)}.")
    return BACKENDS[name]()


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise UsageError(f"threads={threads}: give a positive number of threads, or none for ONNX "
                         "Runtime's default.")


def load(bundle, threads: int | None = None, specialize: bool | None = None) -> Runner:
    """Open a bundle written by ``tokopt compile``; refuses a tampered or incompatible one.
    ``specialize`` (OpenVINO bundles): whether the runner compiles models of their own for the
    input shapes it is called with often, in the background (default: see OpenVinoRunner)."""
    from .bundle import verify_bundle
    check_threads(threads)
    path = Path(bundle)
    manifest = verify_bundle(path)
    backend = manifest.get("backend")
    if backend not in BACKENDS:
        raise BundleError(f"{path} was built for backend '{backend}', which this tokopt does not have.")
    options = {}
    if specialize is not None:
        if not BACKENDS[backend].static_shapes:   # the backends that compile per input shape can specialize
            raise UsageError(f"specialize: the {backend} backend runs one model for every input shape; "
                             "specializing shapes is an OpenVINO runner option.")
        options["specialize"] = specialize
    try:
        return BACKENDS[backend].runner_cls(path, manifest, threads=threads, **options)
    except BackendError:
        raise
    except Exception as e:
        raise BundleError(f"{path}: the engine could not be opened ({e}). Rebuild the bundle with "
                          "tokopt compile.") from e


def read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} has no manifest.json, so it is not a tokopt bundle. Build one "
                          "with `tokopt compile MODEL --out DIR`.") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{path / 'manifest.json'} is corrupt ({e}). Rebuild the bundle.") from e
