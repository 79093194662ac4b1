"""The report: what a compile cost in quality and bought in speed and size, measured.

Quality compares the bundle, run by its own runtime, with the captured (unrewritten) graph on a
probe set: real text through the model's tokenizer when the folder has one (with padding, so
masks are exercised), else token ids or images synthesised from the config. Metrics: max abs
error per output; for LM logits the KL divergence, top-1 agreement and perplexity on the text;
for encoders the cosine of mean-pooled embeddings.

A generation bundle (``--generate``) is measured on what a user of it sees: prompts prefilled
and decoded for several steps with the original's tokens fed to both (logit KL and top-1
agreement at every step), whether the bundle's own greedy continuation equals the original's,
the decode-step latency at a given context, and the KV-cache bytes per sequence.

Speed and size compare against the baseline a user would build instead: the same captured model
through a plain ``torch.onnx.export(ep, dynamo=True)`` with default options, on the same
runtime, providers and threads, in the same run.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from .generation import example_feed, generate_ids, open_decoding
from .program import Program
from .resources import page_out, release_heap
from .runtime import load_tokenizer

__all__ = ["Bench", "probe_inputs", "quality", "quality_rows", "time_calls", "format_report", "bench_inputs",
           "verification_feeds", "generation_prompts", "generation_quality", "float64_rows"]

# seconds a timing waits first: the last runtime's worker threads stop spinning (see time_calls)
SETTLE = 0.05
# float64 elements in one slice of log-probabilities (32 MiB): a handful of such temporaries at a time
SLICE_ELEMENTS = 2**22


def float64_rows(vocab: int) -> int:
    """How many positions' float64 log-softmax over ``vocab`` make one slice: 1024 for a 4K
    vocabulary, 27 for a 152K one (whose 256 rows held 0.3 GB per temporary, four at once: the
    peak of rsq's int8-compute check on a 0.5B model)."""
    return max(1, SLICE_ELEMENTS // vocab)


def _tokenize(program: Program, texts: list[str], max_len: int) -> dict[str, torch.Tensor] | None:
    try:
        tok = load_tokenizer(program.tokenizer_dir)
    except Exception:
        return None
    enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {n: enc[n] for n in program.input_names if n in enc} | {
        n: torch.zeros_like(enc["input_ids"]) for n in program.input_names if n not in enc and n == "token_type_ids"}


def probe_inputs(program: Program, texts: list[str] | None = None, length: int = 128,
                 batch: int = 4) -> tuple[dict[str, torch.Tensor], str]:
    """Inputs for the quality probe, and a description of where they came from."""
    lo_hi = program.seq_range
    length = min(length, lo_hi[1]) if lo_hi and lo_hi[1] else length
    if texts and program.tokenizer_dir and "input_ids" in program.input_names:
        feed = _tokenize(program, texts[:batch], length)
        if feed is not None and set(feed) == set(program.input_names):
            return feed, f"{len(texts[:batch])} text passages, up to {length} tokens, padded"
    gen = torch.Generator().manual_seed(1)
    feed = {}
    for name in program.input_names:
        ex = program.probe[name]
        axes = program.dynamic_axes.get(name, {})
        shape = [batch if axes.get(i) == "batch" else length if axes.get(i) == "sequence" else s
                 for i, s in enumerate(ex.shape)]
        if name == "attention_mask":
            feed[name] = torch.ones(shape, dtype=ex.dtype)
        elif ex.is_floating_point():
            feed[name] = torch.randn(shape, dtype=ex.dtype, generator=gen)
        else:
            hi = int(ex.max()) + 1 if ex.numel() else 2
            feed[name] = torch.randint(0, max(hi, 2), shape, dtype=ex.dtype, generator=gen)
    return feed, f"synthetic inputs (batch {batch}" + (f", {length} tokens)" if "sequence" in
                                                         str(program.dynamic_axes) else ")")


def quality(program: Program, reference: dict[str, torch.Tensor], got: dict[str, np.ndarray],
            feed: dict[str, torch.Tensor]) -> dict:
    mask = feed.get("attention_mask")

    def err(ref: torch.Tensor, new) -> float:
        diff = np.abs(np.asarray(new) - ref.numpy())
        if mask is not None and diff.ndim >= 2 and tuple(diff.shape[:2]) == tuple(mask.shape):
            diff = diff[mask.bool().numpy()]  # padded positions carry no contract
        return float(diff.max()) if diff.size else 0.0

    out = {"max_abs_error": {k: err(reference[k], got[k]) for k in reference if reference[k].is_floating_point()}}
    if program.task == "causal-lm" and "logits" in reference:
        logits = torch.from_numpy(np.asarray(got["logits"]))
        valid = mask.bool() if mask is not None else torch.ones(logits.shape[:2], dtype=torch.bool)
        kl, agree, nll = [], [], {"original": [], "bundle": []}
        t = logits.shape[1]
        # a slice of a row at a time: [T, vocab] in float64 is 0.6 GB per copy for a 152K vocabulary at T=512
        rows = float64_rows(logits.shape[-1])
        for row, i in ((row, i) for row in range(logits.shape[0]) for i in range(0, t, rows)):
            at = slice(i, i + rows)
            lp, lq = reference["logits"][row, at].double().log_softmax(-1), logits[row, at].double().log_softmax(-1)
            kl.append((lp.exp() * (lp - lq)).sum(-1)[valid[row, at]])
            agree.append((lp.argmax(-1) == lq.argmax(-1))[valid[row, at]])
            if "input_ids" in feed:
                j = torch.arange(i, min(i + rows, t - 1))   # positions with a next token
                pair = valid[row, j + 1] & valid[row, j]
                for name, logp in (("original", lp), ("bundle", lq)):
                    nll[name].append(-logp[:len(j)].gather(-1, feed["input_ids"][row, j + 1, None])[:, 0][pair])
        out["logit_kl"] = float(torch.cat(kl).mean())
        out["top1_agreement"] = float(torch.cat(agree).double().mean())
        for name, parts in nll.items():
            if parts:
                out[f"perplexity_{name}"] = float(math.exp(torch.cat(parts).mean()))
    key = "last_hidden_state" if "last_hidden_state" in reference else None
    if key is not None and program.task in ("encoder", "vision"):
        ref = reference[key].double()
        new = torch.from_numpy(np.asarray(got[key])).double()
        if program.task == "vision" or mask is None:
            a, b = ref[:, 0], new[:, 0]
        else:
            m = mask[..., None].double()
            a, b = (ref * m).sum(1) / m.sum(1), (new * m).sum(1) / m.sum(1)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        out["embedding_cosine"] = float(cos.mean())
        out["embedding_cosine_min"] = float(cos.min())
    return out


def quality_rows(program: Program, run_bundle, feed: dict[str, torch.Tensor]) -> dict:
    """Quality when the bundle changes the token count (token pruning): each probe row is run
    alone, unpadded, and compared on what the contract keeps: the last position's logits for a
    causal LM, the mean-pooled embedding for an encoder."""
    mask = feed.get("attention_mask")
    rows, run = [], program.runner()
    for i in range(next(iter(feed.values())).shape[0]):
        n = int(mask[i].sum()) if mask is not None else None
        row = {k: v[i:i + 1, :n] if v.dim() >= 2 and n is not None else v[i:i + 1] for k, v in feed.items()}
        ref = run(row)
        got = {k: torch.from_numpy(np.asarray(v)).double() for k, v in run_bundle(row).items()}
        r = {"tokens_kept": got[program.output_names[0]].shape[1] / ref[program.output_names[0]].shape[1]}
        if program.task == "causal-lm" and "logits" in ref:
            lp, lq = ref["logits"][0, -1].double().log_softmax(-1), got["logits"][0, -1].log_softmax(-1)
            r["last_logit_kl"] = float((lp.exp() * (lp - lq)).sum())
            r["last_top1_agreement"] = float(lp.argmax() == lq.argmax())
        if "last_hidden_state" in ref:
            a, b = ref["last_hidden_state"][0].double().mean(0), got["last_hidden_state"][0].mean(0)
            r["embedding_cosine"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        rows.append(r)
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    if "embedding_cosine" in out:
        out["embedding_cosine_min"] = min(r["embedding_cosine"] for r in rows)
    out["max_abs_error"] = {}
    return out


def bench_inputs(program: Program, length: int, batch: int = 1, prefill: bool = False) -> dict[str, np.ndarray]:
    """A latency feed of ``length`` tokens; for a generation graph, one decode step with
    ``length`` tokens already in the cache, or with ``prefill`` a prompt of ``length`` into an
    empty one (the first token's cost)."""
    if program.cache is not None:
        feed = example_feed(program.cache, batch, length, 0) if prefill else example_feed(program.cache, batch, 1, length)
    else:
        feed, _ = probe_inputs(program, None, length=length, batch=batch)
    return {k: v.numpy() for k, v in feed.items()}


def verification_feeds(program: Program) -> list[dict[str, np.ndarray]]:
    """The probe, plus shapes the export never saw: a larger batch at another length, or for a
    generation graph a prefill into an empty cache and a decode step."""
    feeds = [{k: v.numpy() for k, v in program.probe.items()}]
    if program.cache is not None:
        for batch, seq, past in ((1, 7, 0), (3, 1, 9)):
            feeds.append({k: v.numpy() for k, v in example_feed(program.cache, batch, seq, past, seed=1).items()})
    elif program.seq_range:
        feeds.append(bench_inputs(program, min(program.seq_range[1] or 23, 23), batch=3))
    return feeds


def generation_prompts(program: Program, texts: list[str] | None, length: int,
                       batch: int = 4) -> tuple[np.ndarray, np.ndarray, str]:
    """Left-padded prompts of at most ``length`` tokens from ``texts``, else random ids."""
    if texts and program.tokenizer_dir:
        tok = load_tokenizer(program.tokenizer_dir, padding_side="left")
        enc = tok(texts[:batch], padding=True, truncation=True, max_length=length, return_tensors="np")
        return enc["input_ids"], enc["attention_mask"], f"{len(texts[:batch])} text prompts, up to {length} tokens"
    ids = example_feed(program.cache, batch, length, 0, seed=1)["input_ids"].numpy()
    return ids, np.ones_like(ids), f"synthetic prompts (batch {batch}, {length} tokens)"


def generation_quality(program: Program, open_bundle, ids: np.ndarray, mask: np.ndarray, steps: int,
                       bundle_spec=None) -> tuple[dict, object]:
    """Prefill + ``steps`` decode steps, the original's greedy tokens fed to both; and the bundle's
    runner, which ``open_bundle()`` opens once the original has run and its weights have left
    memory (one copy of the weights resident at a time). ``bundle_spec``: the bundle's cache, where
    it differs from the original's (a compacting one)."""
    run = program.runner(release_mapped=True)

    def reference_step(feed):
        out = run({k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()})
        return {k: v.numpy() for k, v in out.items()}

    ref_logits, got_logits = [], []
    ref = generate_ids(reference_step, program.cache, ids, mask, max_new_tokens=steps, on_logits=ref_logits.append)
    run = None   # the original's module goes before its weights are paged out
    page_out(program)
    release_heap()   # and the heap its activations left, before the bundle's weights come in
    bundle_step = open_bundle()
    spec = bundle_spec or program.cache
    generate_ids(bundle_step, spec, ids, mask, max_new_tokens=steps, forced=ref[:, ids.shape[1]:],
                 on_logits=got_logits.append)
    own = generate_ids(bundle_step, spec, ids, mask, max_new_tokens=steps)
    lookup = {} if spec.index else _lookup_check(bundle_step, spec, ids, mask, own, steps)
    kl, top1 = [], []
    for a, b in zip(ref_logits, got_logits):   # a step at a time: all steps in float64 were 0.4 GB at a 152K vocabulary
        lp, lq = torch.from_numpy(a).double().log_softmax(-1), torch.from_numpy(b).double().log_softmax(-1)
        kl.append((lp.exp() * (lp - lq)).sum(-1))
        top1.append(lp.argmax(-1) == lq.argmax(-1))
    kl = torch.stack(kl)
    return {"max_abs_error": {"logits": max(float(np.abs(a - b).max()) for a, b in zip(ref_logits, got_logits))},
            "decode_steps": len(ref_logits),
            "logit_kl": float(kl.mean()),
            "top1_agreement": float(torch.stack(top1).double().mean()),
            "greedy_match": float(np.mean([np.array_equal(a, b) for a, b in zip(ref, own)])),
            "leading_tokens_equal": float(np.mean([_leading_equal(a[ids.shape[1]:], b[ids.shape[1]:])
                                                   for a, b in zip(ref, own)])),
            **lookup, "logit_kl_per_step": [float(x) for x in kl.mean(-1)]}, bundle_step


def _lookup_check(step, spec, ids: np.ndarray, mask: np.ndarray, own: np.ndarray, steps: int) -> dict:
    """Prompt lookup (4 drafted tokens at most, each prompt alone): the fraction of prompts it
    continues as the bundle's greedy decoding does, and the new tokens per graph call after the
    prefill (1 without it)."""
    opened = []

    def decoding(batch, capacity, drafts=False):
        opened.append(_Counted(open_decoding(step, spec, batch, capacity, drafts)))
        return opened[-1]
    counting = SimpleNamespace(decoding=decoding)
    same, new = [], 0
    for row, m, want in zip(ids, mask, own[:, ids.shape[1]:]):
        got = generate_ids(counting, spec, row[m == 1][None], max_new_tokens=steps, prompt_lookup=4)[0, int(m.sum()):]
        same.append(np.array_equal(got, want[:len(got)]))
        new += len(got) - 1   # the prefill's call gives the first
    return {"prompt_lookup_match": float(np.mean(same)),
            "prompt_lookup_tokens_per_call": new / max(sum(d.calls - 1 for d in opened), 1)}


class _Counted:
    """A decoding that counts its graph calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args):
        self.calls += 1
        return self.inner(*args)

    def every(self, *args):
        self.calls += 1
        return self.inner.every(*args)


def _leading_equal(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two continuations share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


@dataclass(frozen=True)
class Bench:
    """How the report times: at most ``runs`` calls per candidate and length, stopping after
    ``seconds`` of them (at least 3 calls); the plain-export ``baseline`` beside the bundle or not."""
    runs: int = 20
    seconds: float | None = 10.0
    baseline: bool = True
    prefill: tuple[int, ...] = ()   # a generation graph's prompts timed as prefills, after the lengths


def time_calls(fn, runs: int, warmup: int = 2, settle: float = SETTLE, budget: float | None = None) -> dict:
    """Median and p90 ms of ``runs`` calls of ``fn`` (fewer when they pass ``budget`` seconds, at
    least 3). It first waits ``settle`` seconds: ONNX Runtime's and OpenVINO's worker threads spin
    after a call, and a candidate timed right after another runtime's would pay for them (measured:
    8.3 -> 12.0 ms for an int8 MiniLM)."""
    time.sleep(settle)
    started = time.perf_counter()
    for _ in range(warmup):
        fn()
        if budget is not None and time.perf_counter() - started > budget / 4:
            break   # one call that slow has warmed what it needs
    times = []
    started = time.perf_counter()
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        if budget is not None and len(times) >= 3 and time.perf_counter() - started > budget:
            break
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "runs": len(times)}


def time_interleaved(calls: dict, per_round: int, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of each zero-argument call in ``calls``, timed in ``rounds`` rounds of ``per_round``
    calls each, every candidate in every round, so this machine's drift hits them alike."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(time_calls(fn, per_round, warmup=warmup)["median_ms"])
    return {name: float(statistics.median(t)) for name, t in times.items()}


def time_lengths(program: Program, lengths: list[int], bench: Bench, ours, baseline, baseline_bytes: int | None,
                 others: dict | None = None, **fields) -> list[dict]:
    """The report's latency entries: at each length, on one feed (``bench_inputs``) in one run,
    the bundle's call ``ours(feed)`` and the no-pass baseline's ``baseline(feed)`` (None: not
    measured) timed (each returns the zero-argument call to time, its feed already prepared), then
    any ``others`` (runtime name -> the same), plus ``fields`` as given."""
    def timed(call):
        return time_calls(call, bench.runs, budget=bench.seconds)
    results = []
    for length, prefill in [*((n, False) for n in lengths), *((n, True) for n in bench.prefill)]:
        feed = bench_inputs(program, length, prefill=prefill)
        result = {"feed": {k: list(v.shape) for k, v in feed.items()}, **fields, "tokopt": timed(ours(feed))}
        if baseline is not None:
            result.update(baseline=timed(baseline(feed)), size_bytes={"baseline": baseline_bytes})
            result["speedup_median"] = result["baseline"]["median_ms"] / result["tokopt"]["median_ms"]
        if others:   # a call that cannot take this feed (a peer's context) is None
            calls = {name: call(feed) for name, call in others.items()}
            result["others"] = {name: timed(c) for name, c in calls.items() if c is not None}
        results.append(result)
    return results


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.4f}".rstrip("0").rstrip(".")
    return str(x)


def format_report(report: dict) -> str:
    lines = [f"tokopt report  {report['source']}  ->  {report['backend']} / {report['target']}"]
    if report.get("converted"):
        lines.append(f"weights converted {report['converted']} (the lowering's check and CPU kernels run fp32)")
    q = report.get("quality")
    if q:
        lines.append(f"quality vs the original model ({q['probe']}):")
        for name, err in q["max_abs_error"].items():
            lines.append(f"  max abs error [{name}]".ljust(38) + _fmt(err))
        for key in ("tokens_kept", "decode_steps", "logit_kl", "top1_agreement", "greedy_match", "leading_tokens_equal",
                    "prompt_lookup_match", "prompt_lookup_tokens_per_call", "last_logit_kl",
                    "last_top1_agreement", "perplexity_original", "perplexity_bundle", "embedding_cosine",
                    "embedding_cosine_min"):
            if key in q:
                lines.append(f"  {key.replace('_', ' ')}".ljust(38) + _fmt(q[key]))
    if report.get("checked_on"):
        lines.append(f"where: {report['checked_on']}")
    for lat in (report.get("latency"), report.get("latency_long"), *report.get("first_token", [])):
        if not lat:
            continue
        shape = lat.get("label") or ", ".join(f"{k} {v}" for k, v in lat["feed"].items())
        base = lat.get("baseline")
        # both sides compiled for this feed's shapes (static, or specialized as a runner's frequent ones)
        static = f"; shapes {lat['shapes'].split(':')[0]}" if lat.get("shapes") else ""
        lines.append(f"latency ({shape}; {lat['tokopt']['runs']} runs, {lat['threads'] or 'default'} "
                     f"threads{static})".ljust(38) + "tokopt".rjust(10) + ("baseline".rjust(10) + "ratio".rjust(8) if base else ""))
        for key in ("median_ms", "p90_ms"):
            a = lat["tokopt"][key]
            lines.append(f"  {key.replace('_', ' ')}".ljust(38) + f"{a:10.2f}"
                         + (f"{base[key]:10.2f}{base[key] / a:7.2f}x" if base else ""))
        if "decode" in shape:
            lines.append("  decode tokens/s (1000 / median ms)".ljust(38) + f"{1e3 / lat['tokopt']['median_ms']:10.0f}"
                         + (f"{1e3 / base['median_ms']:10.0f}" if base else ""))
        for name, other in lat.get("others", {}).items():   # the same feed through another runtime (a peer)
            a, b = lat["tokopt"]["median_ms"], other["median_ms"]
            lines.append(f"  median ms vs {name}".ljust(38) + f"{a:10.2f}{b:10.2f}{b / a:7.2f}x")
        if lat.get("peer_skipped") and lat is report.get("latency"):
            lines.append(f"  not timed: {lat['peer_skipped']}")
    if report.get("latency_skipped"):
        lines.append(f"latency not measured: {report['latency_skipped']}")
    if report.get("baseline_skipped"):
        lines.append(f"baseline not measured: {report['baseline_skipped']}")
    if (report.get("latency") or {}).get("baseline"):
        a, b = report["size_bytes"]["tokopt"], report["latency"]["size_bytes"]["baseline"]
        lines.append("size MB".ljust(38) + f"{a / 1e6:10.2f}{b / 1e6:10.2f}{a / b:7.2f}x")
    kv, full = report.get("kv_cache_bytes"), report.get("kv_cache_bytes_full", {})
    if kv:
        lines.append("kv cache per sequence".ljust(38) + ", ".join(
            f"{int(n) // 1024}K tokens {b / 2**20:.2f} MiB"
            + (f" ({b / full[n]:.2f}x of the full cache)" if n in full else "") for n, b in kv.items()))
    sr = report.get("search")
    if sr:
        lines.append(f"search ({sr['budget']}, {sr['optimize']}): {sr['trials']} trials, {sr['candidates']} recipes in "
                     f"{sr['seconds']} s; chosen {sr['chosen']}")
        if sr.get("no_pass_met_it"):
            lines.append(f"  {sr['no_pass_met_it']}")
        for split in ("search", "held_out"):
            if sr.get(f"{split}_drops"):
                lines.append(f"  drops on the {split.replace('_', '-')} split".ljust(38) + ", ".join(
                    f"{k} {_fmt(v)}" for k, v in sr[f"{split}_drops"].items()))
    st = report.get("stages")
    if st:
        lines.append(f"cost per stage (weights {st['weights_bytes'] / 2**30:.2f} GiB; peak resident memory "
                     f"{st['peak_rss']})")
        for row in st["rows"]:
            peak = row["peak_rss_bytes"]
            lines.append(f"  {row['stage']}".ljust(38) + f"{row['seconds']:8.1f} s {peak / 2**30:8.2f} GiB"
                         + (f" {peak / st['weights_bytes']:5.1f}x the weights" if st["weights_bytes"] > 2**30 else ""))
    for p in report.get("passes", []):
        stats = ", ".join(f"{k}={_fmt(v)}" for k, v in p["stats"].items())
        lines.append(f"pass {p['name']}: {stats or 'no changes'}")
    for r in report.get("attention_refused", []):
        lines.append(f"attention not recognised in {r['module']}: {r['reason']}")
    return "\n".join(lines)
