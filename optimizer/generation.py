"""Generation: a causal LM as one graph with an explicit KV cache, and the decoding loop.

The graph (ONNX Runtime GenAI's and Optimum's ``past_key_values``/``present`` convention, with
names that are Python identifiers)::

    inputs   input_ids [B, S]   attention_mask [B, P+S]   position_ids [B, S]
             logits_index [K] (int64): which of the S new positions get logits, in 0..S-1
             past_key_i, past_value_i [B, Hkv, P, d]                 for every layer i
             past_index_i [B, Hkv, P] (int64)        only in a graph that compacts its cache
    outputs  logits [B, K, V] (decoding asks for the last position, K = 1; a full forward for all)
             present_key_i, present_value_i [B, Hkv, P+S, d]
             present_index_i                         (compacting graphs: P+S becomes what is kept)

Prefill is a call with an empty cache (P = 0), a decode step a call with one token (S = 1), a
step that verifies drafted tokens (prompt lookup, ``decode_lookup``) a call of several after a cache.
Padding is on the left (``attention_mask`` zeros first), except in a graph whose every layer is
on ONNX Runtime's decoder kernel (manifest ``generation.padding_side: right``, as in
onnxruntime-genai): there a row's tokens are its first ``attention_mask[b].sum()``, each row's
new token goes after its own length, and ``generate_ids`` moves a left-padded prompt's rows so.
``logits_index`` is transformers' ``logits_to_keep`` as a tensor: the LM head runs on the
positions asked for only, so a prefill that decodes pays for one row of it, and the same graph
gives every position's logits to a caller who wants the full-sequence forward (the runner fills
it, and an empty cache, when a call leaves them out).
A graph that compacts its cache (``tca`` on a ``--generate`` graph) keeps, per layer, only some
entries; ``past_index_i`` says which context position (a column of ``attention_mask``) each
cached entry holds, so padding stays masked after entries are dropped. A graph that chooses its
cache once (``tca:select=prefill``) instead returns ``keep_i`` [B, Hkv, K] after a prefill
(empty after a decode step): the entries of each layer's cache the runner keeps (``Compaction``);
later calls' ``attention_mask`` covers the kept entries and the new tokens, and ``position_ids``
carries the positions.
One graph serves both: the weights are stored once without external-data sharing between two
files, every pass rewrites prefill and decode consistently by construction, and an exported
decode graph would hold the same ops anyway. The cache has a dynamic length (concatenation)
rather than a static ``max_len`` buffer: with standard ONNX ops a static buffer is copied and
attended in full at every step, so a step would cost ``max_len`` instead of the current length.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call

from .errors import UsageError
from .resources import releasing_mapped

LOGITS_INDEX = "logits_index"

__all__ = ["LOGITS_INDEX", "CacheSpec", "GenerateEntry", "cache_spec", "example_feed", "with_positions", "generate_ids", "decode_text", "logit_rows",
           "FeedDecoding", "Compaction", "Drafts", "decode_lookup", "open_decoding", "run_model", "HALF"]


@dataclass(frozen=True)
class CacheSpec:
    """The KV cache a generation graph reads and writes."""
    layers: int
    vocab_size: int
    kv_heads: tuple[int, ...]      # per layer
    head_dim: tuple[int, ...]      # per layer
    dtype: str
    max_length: int | None         # prompt + generated tokens the model supports (None: unbounded)
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    index: bool = False            # the graph compacts its cache and carries past_index_i
    keeps: bool = False            # a prefill returns keep_i: the entries the runner keeps (tca select=prefill)
    windows: tuple[int, ...] = ()  # per layer: the keys a query sees (sliding-window attention), 0: all

    @property
    def _parts(self) -> tuple[str, ...]:
        return ("key", "value", "index") if self.index else ("key", "value")

    @property
    def input_names(self) -> list[str]:
        return [f"past_{kv}_{i}" for i in range(self.layers) for kv in self._parts]

    @property
    def output_names(self) -> list[str]:
        return [f"present_{kv}_{i}" for i in range(self.layers) for kv in self._parts]

    @property
    def keep_names(self) -> list[str]:
        return [f"keep_{i}" for i in range(self.layers)] if self.keeps else []

    def entry_bytes(self, layer: int) -> int:
        """Bytes one cached position takes in ``layer``: every KV head's key and value, and its
        int64 position where the cache is compacted."""
        h, d = self.kv_heads[layer], self.head_dim[layer]
        return h * (2 * d * np.dtype(self.dtype).itemsize + (8 if self.index else 0))

    def nbytes(self, context: int, batch: int = 1) -> int:
        return batch * context * sum(self.entry_bytes(i) for i in range(self.layers))

    def empty(self, batch: int, length: int = 0, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        dtype = getattr(torch, self.dtype)
        out = {}
        for i, (h, d) in enumerate(zip(self.kv_heads, self.head_dim)):
            for kv in ("key", "value"):
                out[f"past_{kv}_{i}"] = torch.randn(batch, h, length, d, generator=gen).to(dtype)
            if self.index:
                out[f"past_index_{i}"] = torch.arange(length).expand(batch, h, length).contiguous()
        return out

    def held_bytes(self, out: dict) -> int:
        """Bytes of the cache a graph call returned (``present_*``), positions included; with
        ``keep_i``, of the entries the runner keeps of it."""
        if self.keeps:
            return self.nbytes(np.asarray(out["keep_0"]).shape[-1], np.asarray(out["keep_0"]).shape[0])
        return sum(int(np.asarray(out[n]).nbytes) for n in self.output_names)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CacheSpec":
        return cls(**{**data, "kv_heads": tuple(data["kv_heads"]), "head_dim": tuple(data["head_dim"]),
                      "eos_token_ids": tuple(data.get("eos_token_ids", ())), "windows": tuple(data.get("windows", ()))})


HALF = (torch.bfloat16, torch.float16)


def run_model(model: torch.nn.Module, kwargs: dict, widen: bool):
    """``model(**kwargs)``; with ``widen``, the weights it keeps in half precision read as fp32.
    Exported, each read is a cast after its weight: the graph computes in fp32 while the program
    holds the checkpoint's own half-precision tensors (mapped from its files, not widened into a copy)."""
    half = {n: t.float() for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if t.dtype in HALF} if widen else {}
    return functional_call(model, half, (), kwargs) if half else model(**kwargs)


class GenerateEntry(torch.nn.Module):
    """Calls a transformers causal LM with a cache rebuilt from flat tensors and returns the
    last position's logits and the flat updated cache."""

    def __init__(self, model: torch.nn.Module, layers: int, widen: bool = False):
        super().__init__()
        self.model, self.layers, self.widen = model, layers, widen
        import inspect
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keeps = "logits_to_keep" in params   # else every position's logits, indexed after

    def call(self, input_ids, attention_mask, position_ids, logits_index, **past):
        from transformers import DynamicCache
        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[f"past_key_{i}"], past[f"past_value_{i}"], i)
        out = run_model(self.model, dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                         use_cache=True, return_dict=True, **{self.cache_kw: cache},
                                         **({"logits_to_keep": logits_index} if self.keeps else {})), self.widen)
        present = getattr(out, "cache", None) or out.past_key_values
        flat = [t for layer in present.layers[: self.layers] for t in (layer.keys, layer.values)]
        return (out.logits if self.keeps else out.logits[:, logits_index], *flat)


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def cache_spec(model: torch.nn.Module, max_length: int | None, widen: bool = False) -> CacheSpec:
    """Read the cache layout off one eager prefill (no per-architecture code); ``widen``: the
    graph will read the model's half-precision weights as fp32 (``run_model``), and so keep an
    fp32 cache. The prefill itself runs as the model is: widened, it would hold every weight in
    fp32 at once."""
    cfg = model.config
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0))
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad(), releasing_mapped(model):
        out = model(input_ids=ids, use_cache=True, return_dict=True)
    present = getattr(out, "cache", None) or out.past_key_values
    keys = [layer.keys for layer in present.layers[:layers]]
    if len(keys) != layers or any(k.dim() != 4 or k.shape[2] != 2 for k in keys):
        from .errors import UnsupportedModelError
        raise UnsupportedModelError(
            f"{type(model).__name__} does not keep a plain per-layer [batch, heads, length, dim] KV "
            "cache (sliding-window, recurrent or compressed caches are not supported for --generate).")
    # What transformers' generate() stops on: the generation config, where the model has one.
    stops = getattr(model, "generation_config", None) or cfg
    eos = _token_ids(getattr(stops, "eos_token_id", None))
    pad = getattr(stops, "pad_token_id", None)
    return CacheSpec(layers=layers, vocab_size=int(cfg.vocab_size), kv_heads=tuple(int(k.shape[1]) for k in keys),
                     head_dim=tuple(int(k.shape[3]) for k in keys),
                     dtype="float32" if widen else str(keys[0].dtype).removeprefix("torch."), max_length=max_length,
                     eos_token_ids=eos, pad_token_id=int(pad if pad is not None else (eos or (0,))[0]),
                     windows=_windows(cfg, layers, max_length))


def _windows(cfg, layers: int, max_length: int | None) -> tuple[int, ...]:
    """Per layer, how many keys (itself included) a query attends to where the model's config
    gives it a sliding window (transformers' ``sliding_window`` and ``layer_types``: Mistral's every
    layer, Gemma 2/3's "sliding_attention" ones), 0 for all; () where no layer's window is shorter
    than the longest sequence. The graph computes the window's mask itself; the decoder kernel is
    told it (``backends/decoder.py``)."""
    window = getattr(cfg, "sliding_window", None)
    if not window or (getattr(cfg, "use_sliding_window", True) is False):
        return ()
    types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * layers
    windows = tuple(int(window) if t == "sliding_attention" else 0 for t in types[:layers])
    return windows if max_length is None or any(0 < w < max_length for w in windows) else ()


def example_feed(spec: CacheSpec, batch: int, seq: int, past: int, seed: int = 0,
                 logits: int = 1) -> dict[str, torch.Tensor]:
    """Random token ids and cache: prefill when ``past == 0``, a decode step when ``seq == 1``;
    the logits of the last ``logits`` positions."""
    gen = torch.Generator().manual_seed(seed)
    vocab = spec.vocab_size
    ids = torch.randint(min(10, vocab - 1), vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, past + seq, dtype=torch.long),
            "position_ids": torch.arange(past, past + seq).expand(batch, seq).contiguous(),
            LOGITS_INDEX: torch.arange(seq - logits, seq), **spec.empty(batch, past, gen)}


def with_positions(feed: dict, names) -> dict:
    """``feed`` plus the ``past_index_i`` a compacting graph among ``names`` reads, for a cache
    that holds every position in order (what a graph without compaction would have been fed)."""
    extra = {}
    for name in names:
        if name.startswith("past_index_") and name not in feed:
            key = np.asarray(feed[f"past_key_{name.removeprefix('past_index_')}"])
            extra[name] = np.ascontiguousarray(np.broadcast_to(np.arange(key.shape[2]), key.shape[:3]))
    return {**feed, **extra}


def _pick(logits: np.ndarray, rng: np.random.Generator | None, temperature: float, top_k: int,
          top_p: float) -> np.ndarray:
    """Greedy when ``rng`` is None, else a sample after temperature, top-k and top-p."""
    if rng is None:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(z, -1)[:, -min(top_k, z.shape[-1])][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, -1)
        sorted_p = np.take_along_axis(p, order, -1)
        drop = np.cumsum(sorted_p, -1) - sorted_p >= top_p  # keep the smallest set reaching top_p
        p = np.zeros_like(p)
        np.put_along_axis(p, order, np.where(drop, 0.0, sorted_p), -1)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def logit_rows(ids: np.ndarray, last: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(the positions to ask ``logits_index`` for, which of them is each row's): each row's
    ``last`` position (a right-padded prompt's rows end apart), the last new one by default."""
    rows = np.full(ids.shape[0], ids.shape[1] - 1) if last is None else np.asarray(last)
    index = np.unique(rows)
    return index, np.searchsorted(index, rows)


class Compaction:
    """A cache compacted once after the prefill (``tca`` with ``select=prefill``): the graph
    returned ``keep_i`` [B, Hkv, K], the entries each layer's heads keep, in context order. Every
    head of a row keeps the same number of its valid entries (padding scores below them all), so
    one attention mask over the kept entries serves every layer, and later calls' masks are the
    context's translated to it: a row's kept entries, then its new tokens."""

    def __init__(self, mask: np.ndarray, keep: list[np.ndarray], right_padded: bool):
        kept = np.take_along_axis(mask, keep[0][:, 0], 1)
        self.dropped = mask.sum(1) - kept.sum(1)          # per row: context entries no longer cached
        self.shrink = mask.shape[1] - keep[0].shape[-1]
        self.right_padded = right_padded

    @classmethod
    def after_prefill(cls, spec: CacheSpec, out, mask: np.ndarray, cache: dict[str, np.ndarray],
                      right_padded: bool) -> "Compaction | None":
        """Where the prefill's ``keep_i`` (in ``out``, a name -> array lookup) drop something from
        the ``mask.shape[1]`` entries it cached: each layer's kept keys and values moved to the
        front of its arrays in ``cache`` (``past_key_i``/``past_value_i``), in place, and the
        compaction that later calls translate their masks by; else None."""
        keep = [np.asarray(out[n]) for n in spec.keep_names]
        width = mask.shape[1]
        if not keep or not 0 < keep[0].shape[-1] < width:
            return None
        for i, sel in enumerate(keep):
            for kv in ("key", "value"):
                buf = cache[f"past_{kv}_{i}"]
                buf[:, :, :sel.shape[-1]] = np.take_along_axis(buf[:, :, :width], sel[..., None], 2)
        return cls(mask, keep, right_padded)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """The mask over the compacted cache for a call given the context's ``mask``."""
        width = mask.shape[1] - self.shrink
        held = (mask.sum(1) - self.dropped)[:, None]
        cols = np.arange(width)
        return (cols < held if self.right_padded else cols >= width - held).astype(np.int64)


class FeedDecoding:
    """Decoding through a function of whole feeds: ``step(feed) -> {name: array}`` reads the
    cache as inputs and returns it as outputs, which the next call feeds back."""

    def __init__(self, step: Callable[[dict], dict], spec: CacheSpec, index: bool = True, right_padded: bool = False):
        self.step, self.spec, self.past, self.compaction = step, spec, None, None
        self.index = index   # False: a bundle from before logits_index, whose logits are the last position's
        self.right_padded = right_padded   # the graph's rows take right padding (see generate_ids)

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, last: np.ndarray | None = None) -> np.ndarray:
        """The logits of each row's ``last`` position of ``ids`` [B, S] (the last by default), the
        cache so far before them."""
        index, pick = logit_rows(ids, last)
        logits = self._run(ids, mask, pos, index)
        return logits[np.arange(len(pick)), pick] if self.index else logits[:, -1]

    def every(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """The logits of every position of ``ids`` [B, S, V]: a step that verifies drafted tokens."""
        return self._run(ids, mask, pos, np.arange(ids.shape[1]))

    def _run(self, ids, mask, pos, index) -> np.ndarray:
        first = self.past is None
        past = self.past if not first else {k: v.numpy() for k, v in self.spec.empty(ids.shape[0]).items()}
        fed = mask if self.compaction is None else self.compaction.mask(mask)
        held = fed.shape[1] - ids.shape[1]
        if not self.spec.index and next(iter(past.values())).shape[2] > held:   # a rejected draft's entries
            past = {k: v[:, :, :held] for k, v in past.items()}
        out = self.step({"input_ids": ids, "attention_mask": fed, "position_ids": pos,
                         **({LOGITS_INDEX: index} if self.index else {}), **past})
        self.past = {p: np.asarray(out[o]) for p, o in zip(self.spec.input_names, self.spec.output_names)}
        if first and self.spec.keeps:
            self.compaction = Compaction.after_prefill(self.spec, out, fed, self.past, self.right_padded)
            if self.compaction is not None:   # the cache fed back is the kept entries only
                kept = fed.shape[1] - self.compaction.shrink
                self.past = {k: v[:, :, :kept] for k, v in self.past.items()}
        return np.asarray(out["logits"])


def open_decoding(step, spec: CacheSpec, batch: int, capacity: int, drafts: bool = False):
    """The decoding ``step`` holds its cache in (``step.decoding``), or a feed loop over it;
    ``drafts``: one whose steps may be taken back (prompt lookup)."""
    return step.decoding(batch, capacity, drafts) if hasattr(step, "decoding") else FeedDecoding(step, spec)


def generate_ids(step, spec: CacheSpec, input_ids, attention_mask=None, *,
                 max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop_tokens=None, forced=None,
                 on_token: Callable[[np.ndarray], None] | None = None,
                 on_logits: Callable[[np.ndarray], None] | None = None, prompt_lookup: int = 0) -> np.ndarray:
    """Prefill, then one decode step per new token (or, with ``prompt_lookup``, up to that many
    drafted tokens verified per step: ``decode_lookup``). ``step`` runs the graph: a function
    ``step(feed) -> {name: array}`` (a bundle's runner call or the captured program), or an object
    whose ``decoding(batch, capacity)`` holds the cache itself (a runner that keeps it in bound
    buffers). Left-padded batches are supported (``attention_mask`` zeros on the left); a graph whose
    rows take right padding (``right_padded`` on the decoding) is fed each row's tokens moved to its start. A row
    that emits a stop token is padded after it; the loop ends when every row has stopped.
    ``forced`` ([B, T] ids) replaces the choice at each step (teacher forcing, for quality
    measurement). Returns [B, S + new] ids."""
    ids = np.asarray(input_ids, dtype=np.int64)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise UsageError("the prompt is empty: give at least one token.")
    if max_new_tokens is None or int(max_new_tokens) <= 0:
        raise UsageError(f"max_new_tokens must be at least 1 (got {max_new_tokens}).")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
        raise UsageError("sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0.")
    if not do_sample and (temperature != 1.0 or top_p != 1.0 or top_k):
        raise UsageError("temperature, top_k and top_p shape sampling, and this is greedy decoding: set "
                         "do_sample=True (--sample) to sample, or leave them out.")
    batch, length = ids.shape
    if spec.max_length is not None and length + max_new_tokens > spec.max_length:
        raise UsageError(f"the prompt has {length} tokens and {max_new_tokens} new tokens were asked "
                         f"for, but the model's cache holds at most {spec.max_length} tokens. Shorten "
                         f"the prompt or ask for at most {max(spec.max_length - length, 0)} new tokens.")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mask.shape != ids.shape:
        raise UsageError(f"attention_mask has shape {list(mask.shape)}; it must match input_ids {list(ids.shape)}.")
    decode = open_decoding(step, spec, batch, length + int(max_new_tokens), drafts=bool(prompt_lookup))
    stop = np.array(sorted(set(_token_ids(stop_tokens)) | set(spec.eos_token_ids)) or [-1])
    stops = set(stop.tolist())
    if prompt_lookup:
        why = ("it drafts for one row at a time: give one prompt" if batch > 1 else
               "it is greedy: leave out do_sample" if do_sample else
               "teacher forcing feeds every token" if forced is not None else
               "this graph compacts its cache every step (tca:select=step), so a rejected draft "
               "cannot be taken back" if spec.index else
               "this runner gives one position's logits per call" if not hasattr(decode, "every")
               or not getattr(decode, "index", True) else None)
        if why or prompt_lookup < 0:
            raise UsageError(f"prompt_lookup={prompt_lookup} cannot be used here: "
                             f"{why or 'it is the number of tokens drafted per step, at least 1'}.")
        new = decode_lookup(decode, ids[0, mask[0] == 1], int(max_new_tokens), int(prompt_lookup), stops,
                            on_token, on_logits)
        return np.concatenate([ids, new[None]], 1)
    right = getattr(decode, "right_padded", False)
    lengths, last, inputs = mask.sum(1), None, ids
    if right and (lengths < length).any():
        # the graph takes right-padded rows: each row's tokens moved to its start, its logits read
        # at its own last token, its new tokens written after its own length
        order = np.argsort(mask == 0, axis=1, kind="stable")
        inputs, mask, last = np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1), lengths - 1
    pos = np.cumsum(mask, -1) - 1
    pos[mask == 0] = 1
    rng = np.random.default_rng(seed) if do_sample else None
    done, stopped = np.zeros(batch, dtype=bool), False
    # the mask of every step is a view of one buffer, each step marks one column (a row's own
    # column where rows are right-padded): the loop's numpy work is a few small ops per token
    full = np.zeros((batch, length + int(max_new_tokens)), dtype=np.int64)
    full[:, :length] = mask
    rows, column = np.arange(batch), (lengths if right else np.full(batch, length))
    one_column = column[0] if (column == column[0]).all() else None   # the rows' new tokens line up
    following = lengths if right else pos[:, -1] + 1   # each row's position after the prompt
    positions = (following + np.arange(int(max_new_tokens))[:, None])[..., None]   # [T, B, 1]: a step's, contiguous
    # one greedy row on a decoding that steps itself: its own loop after the first one-token step
    fast = right and batch == 1 and bool(mask.all()) and rng is None and forced is None and on_logits is None \
        and getattr(decode, "greedy", None) is not None
    new = []
    for t in range(int(max_new_tokens)):
        logits = decode(inputs, full[:, :length + t], pos, last)
        if on_logits is not None:
            on_logits(logits.copy())   # a decoding may hand out its own buffer, rewritten next step
        nxt = np.asarray(forced)[:, t] if forced is not None else _pick(logits, rng, temperature, top_k, top_p)
        nxt = (np.where(done, spec.pad_token_id, nxt) if stopped else nxt).astype(np.int64, copy=False)
        new.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if not stops.isdisjoint(nxt.tolist()):   # a set test per step: this loop runs once per token
            done |= np.isin(nxt, stop)
            stopped = bool(done.any())
        if t == max_new_tokens - 1 or (stopped and done.all()):
            break
        if fast and t == 1:
            new += [np.array([x], dtype=np.int64) for x in decode.greedy(int(nxt[0]), int(max_new_tokens) - 2,
                                                                          stops, on_token)]
            break
        if one_column is None:
            full[rows, column + t] = 1
        else:
            full[:, one_column + t] = 1
        pos = positions[t]
        inputs, last = nxt[:, None], None
    return np.concatenate([ids, np.stack(new, 1)], 1)


class Drafts:
    """Prompt lookup (Saxena, 2023; transformers' ``prompt_lookup_num_tokens``): the tokens that
    followed the latest earlier occurrence of the text's last ``n`` tokens, for the longest
    ``n <= ngram`` that occurs. ``tokens`` is the text, a list the caller appends to; every
    n-gram that ends before its last token is indexed once, so a lookup costs a few dict reads."""

    def __init__(self, tokens: list[int], ngram: int = 3):
        self.tokens, self.ngram, self.end, self.indexed = tokens, ngram, {}, 1

    def __call__(self, k: int) -> list[int]:
        t, length = self.tokens, len(self.tokens)
        for e in range(self.indexed, length):   # n-grams t[e-n:e] that end before the last token
            for n in range(1, min(self.ngram, e) + 1):
                self.end[tuple(t[e - n:e])] = e
        self.indexed = max(self.indexed, length)
        for n in range(min(self.ngram, length - 1), 0, -1):
            e = self.end.get(tuple(t[length - n:]))
            if e is not None:
                return t[e:e + k]
        return []


def decode_lookup(decode, prompt: np.ndarray, max_new: int, k: int, stops: set[int],
                  on_token=None, on_logits=None) -> np.ndarray:
    """Greedy decoding of one row that drafts tokens by ``Drafts`` and verifies them in one call:
    a draft token is taken while it is the graph's own greedy choice, then the choice after the
    last one taken, so the tokens are greedy decoding's (up to the few-ulp difference of a wider
    call's arithmetic). Each drafted token costs a share of a step whether taken or not, so the
    draft is as long as the last one's taken part plus one, doubling while all is taken, at most
    ``k``. ``decode(ids, mask, pos)`` gives one position's logits, ``decode.every`` every
    position's; a rejected draft's cache entries lie beyond the next call's mask (the decodings
    cut them off or overwrite them). Returns the new ids."""
    n = len(prompt)
    tokens = [int(t) for t in prompt]
    drafts = Drafts(tokens)
    ones = np.ones((1, n + max_new), dtype=np.int64)
    rows, drafted, width = decode(prompt[None], ones[:, :n], np.arange(n)[None]), [], k
    while True:
        for i, row in enumerate(rows):
            tokens.append(int(row.argmax()))
            c = len(tokens) - n
            if on_logits is not None:
                on_logits(row[None].copy())
            if on_token is not None:
                on_token(np.array(tokens[-1:], dtype=np.int64))
            if c == max_new or tokens[-1] in stops:
                return np.array(tokens[n:], dtype=np.int64)
            if i == len(drafted) or drafted[i] != tokens[-1]:
                break
        if drafted:
            width = min(k, 2 * width) if i == len(drafted) else i + 1
        drafted = drafts(min(width, max_new - c - 1))
        fed = np.array([tokens[-1:] + drafted], dtype=np.int64)
        at = len(tokens) - 1
        pos, mask = np.arange(at, at + fed.shape[1])[None], ones[:, :at + fed.shape[1]]
        rows = decode.every(fed, mask, pos)[0] if drafted else decode(fed, mask, pos)


def decode_text(tokenizer, ids: np.ndarray, prompt_len: int) -> list[str]:
    return [tokenizer.decode(row[prompt_len:], skip_special_tokens=True) for row in ids]
