"""``--max-drop``: the fastest (or smallest) bundle within a quality budget, found by search.

    tokopt compile MODEL --max-drop cosine=0.002 [--optimize latency|size] [--search-time 20m]

The knobs searched are those of the passes that apply to the model, jointly: for an encoder,
token pruning (keep, the layer of the cut, the score) and rsq (none, int8 weights on int8
compute, W8A8, W8A8 with token-adaptive outliers, int4); for a causal LM, rsq (int4 or int8,
group size) and TCA's tolerance; and the backend (ONNX Runtime, OpenVINO where installed). Optuna's
TPE sampler proposes recipes with the budget as a constraint (``seed``: the same seed and the same
measurements propose the same recipes). The first trials are fixed: the no-pass recipe (so there is
always one within budget), then each pass setting alone on each backend, which is where a person
starts and whose calibrations the stacks proposed next reuse. Each candidate is compiled (calibration results are cached on disk
and shared by every candidate whose graph before the pass is the same), and scored on the search
split: the first passages of the shipped calibration split (of ``--calib`` where it is text). The
feasible candidates within 15% of the fastest are timed again, interleaved round by round with the
no-pass bundle; the chosen one is then measured on the held-out split, the shipped evaluation
passages, which neither calibration nor the search read. If it misses the budget there, the next
feasible candidate is tried, down to the no-pass bundle. The bundle keeps ``search.json`` (every
candidate), ``recipe.yaml`` (replays with ``--recipe``) and, where matplotlib is installed,
``search.png`` (the candidates, the front, the chosen point).

Metrics (drops are against the original model): ``cosine=D`` mean cosine of mean-pooled embeddings
at least 1 - D; ``spearman=S`` the Spearman correlation of all pairwise embedding similarities at
least S (encoders); ``ppl=P%`` perplexity at most P% above the original's; ``kl=K`` mean next-token
KL at most K nats; ``top1=A%`` next-token top-1 agreement at least A% (causal LMs).
"""
from __future__ import annotations

import functools
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TokoptError, UsageError, did_you_mean
from .report import time_calls, time_interleaved
from .runtime import load

__all__ = ["Budget", "parse_budget", "parse_duration", "search", "new_study", "Space", "METRICS", "format_front",
           "spearman", "bench_feed"]


@dataclass(frozen=True)
class Metric:
    task: str
    what: str
    floor: bool = False     # the budget is a least value of the metric (1 - it is the drop)


METRICS = {
    "cosine": Metric("encoder", "1 - mean cosine of mean-pooled embeddings"),
    "spearman": Metric("encoder", "Spearman of all pairwise embedding similarities", floor=True),
    "ppl": Metric("causal-lm", "relative perplexity increase"),
    "kl": Metric("causal-lm", "mean next-token KL divergence (nats)"),
    "top1": Metric("causal-lm", "next-token top-1 agreement", floor=True),
}


@dataclass(frozen=True)
class Budget:
    metric: str
    limit: float            # the largest drop allowed
    text: str

    def ok(self, drops: dict) -> bool:
        return drops[self.metric] <= self.limit + 1e-12


def parse_budget(text: str, task: str | None = None) -> Budget:
    """``"cosine=0.002"``, ``"ppl=2%"``, ``"top1=99%"`` -> a Budget; refuses unknown metrics and
    metrics the model's task has no measure of, by name."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or name not in METRICS:
        raise UsageError(f"--max-drop {text!r}: give metric=value with a metric of {', '.join(METRICS)}."
                         + (did_you_mean(name, METRICS) if name and name not in METRICS else ""))
    metric = METRICS[name]
    if task is not None and task != metric.task:
        fits = [m for m, spec in METRICS.items() if spec.task == task]
        raise UsageError(f"--max-drop {name}: this model is a {task}, which has no {metric.what}; use "
                         f"{', '.join(fits) or 'nothing: tokopt has no quality metric for it yet'}.")
    value = value.strip()
    try:
        number = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
    except ValueError:
        raise UsageError(f"--max-drop {text!r}: {value!r} is not a number (e.g. {name}=0.01 or {name}=1%).") from None
    limit = 1 - number if metric.floor else number
    if not 0 <= limit < 1:
        raise UsageError(f"--max-drop {text!r}: {'the floor must be in (0, 1]' if metric.floor else 'the drop must be in [0, 1)'}.")
    return Budget(name, limit, text)


def parse_duration(text) -> float:
    """``"20m"``, ``"90s"``, ``"1h"``, or seconds -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise UsageError(f"--search-time {text!r}: give a duration such as 20m, 90s or 1h.")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


class Judge:
    """Every metric's drop for a bundle, on one split's texts, against the original model (whose
    outputs are computed once)."""

    def __init__(self, program, texts: list[str], length: int = 128, windows: int = 8):
        from .runtime import load_tokenizer
        self.task = program.task
        self.names = program.input_names
        tok = load_tokenizer(program.tokenizer_dir)
        if self.task == "encoder":
            self.feeds = [{k: v.astype(np.int64) for k, v in tok(t, truncation=True, max_length=length,
                                                                 return_tensors="np").items() if k in self.names}
                          for t in texts]
            for f in self.feeds:
                f.update({n: np.zeros_like(f["input_ids"]) for n in self.names if n not in f})
        else:
            ids = np.concatenate([tok(t, return_tensors="np")["input_ids"][0] for t in texts])
            n = min(windows, len(ids) // length)
            if n < 1:
                raise UsageError(f"the search texts hold {len(ids)} tokens, fewer than one window of {length}.")
            ids = ids[: n * length].reshape(n, length).astype(np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            if "position_ids" in self.names:
                feed["position_ids"] = np.broadcast_to(np.arange(length), ids.shape).copy()
            self.feeds = [feed]
        import torch
        run = program.runner()
        self.reference = self._outputs(lambda f: {k: v.numpy() for k, v in run(
            {k: torch.from_numpy(v) for k, v in f.items()}).items()})

    def _outputs(self, run) -> list[np.ndarray]:
        key = "last_hidden_state" if self.task == "encoder" else "logits"
        return [np.asarray(run(f)[key], dtype=np.float64) for f in self.feeds]

    def drops(self, runner) -> dict[str, float]:
        got = self._outputs(lambda f: runner(**f))
        if self.task == "encoder":
            a = _unit(np.stack([r[0].mean(0) for r in self.reference]))
            b = _unit(np.stack([g[0].mean(0) for g in got]))   # pruned bundles: the kept tokens
            cos = float((a * b).sum(1).mean())
            iu = np.triu_indices(len(a), 1)
            return {"cosine": 1 - cos, "spearman": 1 - spearman((a @ a.T)[iu], (b @ b.T)[iu])}
        ref, new = self.reference[0], got[0]
        lp, lq = _log_softmax(ref), _log_softmax(new)
        ids = self.feeds[0]["input_ids"][:, 1:, None]
        ppl = [float(np.exp(-np.take_along_axis(x[:, :-1], ids, -1).mean())) for x in (lp, lq)]
        return {"ppl": ppl[1] / ppl[0] - 1, "kl": float((np.exp(lp) * (lp - lq)).sum(-1).mean()),
                "top1": 1 - float((ref.argmax(-1) == new.argmax(-1)).mean())}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two 1-D arrays (ties broken by position)."""
    ra, rb = a.argsort().argsort().astype(float), b.argsort().argsort().astype(float)
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 1 else 1.0


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class Space:
    """The recipes that apply to ``program``, as Optuna parameters."""

    def __init__(self, program, backends: list[str]):
        self.task, self.layers, self.backends = program.task, len(program.attention), backends

    def recipe(self, trial) -> tuple[str, str]:
        """(passes, backend) for an Optuna trial (or FixedTrial)."""
        parts = []
        if self.task == "encoder":
            keep = trial.suggest_categorical("prune_keep", [1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
            if keep < 1:
                layer = trial.suggest_int("prune_layer", 1, max(1, self.layers - 2))
                score = trial.suggest_categorical("prune_score", ["cls", "head_weighted"])
                parts.append(f"token_prune:keep={keep},layers={layer},score={score}")
            quant = trial.suggest_categorical("quant", ["none", "int8_compute", "w8a8", "w8a8_outliers", "int4"])
            parts.append({"none": "", "int8_compute": "rsq:bits=8,compute=int8", "w8a8": "rsq:bits=8,act_bits=8",
                          "w8a8_outliers": "rsq:bits=8,act_bits=8,outlier_tokens=2,smooth=0.5",
                          "int4": "rsq:bits=4"}[quant])
        else:
            tol = trial.suggest_categorical("tca_tolerance", [0.0, 0.1, 0.2, 0.3])
            if tol > 0:
                parts.append(f"tca:tolerance={tol}")
            quant = trial.suggest_categorical("quant", ["none", "int8", "int4_g32", "int4_g128"])
            parts.append({"none": "", "int8": "rsq:bits=8", "int4_g32": "rsq:bits=4,group_size=32",
                          "int4_g128": "rsq:bits=4,group_size=128"}[quant])
        backend = trial.suggest_categorical("backend", self.backends)
        return ",".join(p for p in parts if p) or "canonicalize", backend

    def anchors(self) -> list[dict]:
        """The first trials: the no-pass recipe, then each pass setting alone on each backend (what a
        person tries first; their calibrations are shared by the stacks the sampler then proposes)."""
        if self.task == "encoder":
            off, singles = {"prune_keep": 1.0, "quant": "none"}, [{"quant": q} for q in
                                                                   ("w8a8", "int8_compute", "w8a8_outliers", "int4")]
        else:
            off = {"tca_tolerance": 0.0, "quant": "none"}
            singles = [{"quant": q} for q in ("int4_g32", "int8", "int4_g128")] + \
                [{"tca_tolerance": t} for t in (0.2, 0.3, 0.1)]
        return [{**off, "backend": self.backends[0]}] + [{**off, **one, "backend": b} for one in singles
                                                           for b in self.backends]


def new_study(space: Space, seed: int):
    """A two-objective (cost, drop) Optuna study whose TPE sampler treats the budget as a
    constraint (a trial's ``excess`` attribute, the drop past the limit), the anchors queued first."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    anchors = space.anchors()
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=len(anchors) + 2,
                                         constraints_func=lambda t: [t.user_attrs.get("excess", 1.0)])
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for params in anchors:
        study.enqueue_trial(params)
    return study


def _backends(task: str) -> list[str]:
    import importlib.util
    found = ["onnxruntime"]
    if task == "encoder" and importlib.util.find_spec("openvino") is not None:
        found.append("openvino")
    return found


def _search_texts(calib) -> list[str]:
    from .data import default_texts, load_texts
    if calib is not None and Path(calib).suffix not in (".npy", ".pt"):
        return load_texts(calib)
    return default_texts("calib")


def search(model, max_drop: str, *, out, optimize: str = "latency", search_time="20m", trials: int | None = None,
           seed: int = 0, backend: str | None = None, target: str = "x86-cpu", calib=None, force: bool = False,
           bench_len: int = 128, bench_runs: int = 20, threads: int | None = None, texts: int = 32,
           progress: bool = False, measure: bool = True, **compile_kw):
    """Search recipes for the fastest (``optimize="latency"``) or smallest bundle within
    ``max_drop``, compile it to ``out`` and return its CompileResult; see the module docstring."""
    import optuna

    from .bundle import check_out
    from .capture import capture
    from .compile import compile as compile_one   # compile() calls search(): imported here
    from .data import default_texts
    if optimize not in ("latency", "size"):
        raise UsageError(f"--optimize {optimize!r}: use latency or size.")
    if bench_runs < 1:
        raise UsageError(f"--bench-runs {bench_runs}: --max-drop times every candidate, so give at least 1 run.")
    if trials is not None and trials < 1:
        raise UsageError(f"--search-trials {trials}: give at least 1.")
    budget_seconds = parse_duration(search_time)
    parse_budget(max_drop)   # a bad budget is refused before the model is read
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="tokopt-")) / "bundle"
    check_out(out, force)
    program = capture(model, attn_implementation=compile_kw.get("attn_implementation", "sdpa"),
                      trust_pickle=compile_kw.get("trust_pickle", False))
    budget = parse_budget(max_drop, program.task)
    if program.tokenizer_dir is None:
        raise UsageError("--max-drop measures quality on text, and this model folder has no tokenizer.")
    space = Space(program, [backend] if backend else _backends(program.task))
    say = print if progress else (lambda *a, **k: None)
    judge = Judge(program, _search_texts(calib)[:texts], length=bench_len)
    held = Judge(program, default_texts("eval")[:max(texts, 40)], length=bench_len)
    work = Path(tempfile.mkdtemp(prefix="tokopt-search-"))
    study = new_study(space, seed)
    candidates: dict[tuple[str, str], dict] = {}
    started, done = time.perf_counter(), 0
    try:
        while time.perf_counter() - started < budget_seconds and (trials is None or done < trials):
            done += 1   # (study.trials also lists the queued anchors)
            trial = study.ask()
            passes, be = space.recipe(trial)
            key = (passes, be)
            if key not in candidates:
                candidates[key] = _evaluate(compile_one, model, passes, be, work / f"c{len(candidates)}", judge, budget,
                                            target, calib, bench_len, bench_runs, threads, compile_kw)
                c = candidates[key]
                say(f"tokopt: search {len(candidates)}: {be} {passes}: "
                    + (f"error: {c['error']}" if "error" in c else
                       f"{budget.metric} drop {c['drops'][budget.metric]:.4g}, {c['latency_ms']:.2f} ms, "
                       f"{c['size_bytes'] / 1e6:.1f} MB"), flush=True)
            c = candidates[key]
            if "error" in c:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            trial.set_user_attr("excess", c["drops"][budget.metric] - budget.limit)
            study.tell(trial, [c["latency_ms"] if optimize == "latency" else c["size_bytes"], c["drops"][budget.metric]])
        chosen, timing = _choose(candidates, budget, optimize, judge, held, bench_len, bench_runs, threads)
    finally:
        searched = time.perf_counter() - started
        for c in candidates.values():
            c.pop("_dir", None)
    record = {"budget": {"metric": budget.metric, "limit": budget.limit, "text": budget.text},
              "optimize": optimize, "seed": seed, "seconds": round(searched, 1), "trials": done,
              "search_split": f"{len(judge.feeds if program.task == 'encoder' else judge.feeds[0]['input_ids'])} "
                              f"{'passages' if program.task == 'encoder' else 'windows'} of the calibration text",
              "held_out_split": "the shipped evaluation passages",
              "candidates": [{"passes": p, "backend": b, **c} for (p, b), c in candidates.items()],
              "chosen": {"passes": chosen[0], "backend": chosen[1], **candidates[chosen]}, "retimed": timing}
    files = {"search.json": record,
             "recipe.yaml": _recipe_yaml(chosen[0], chosen[1], budget)}
    png = _plot(record, budget, optimize)
    if png is not None:
        files["search.png"] = png
    try:
        result = compile_one(model, out=out, passes=chosen[0], backend=chosen[1], target=target, calib=calib,
                             force=force, bench_len=bench_len, bench_runs=bench_runs, threads=threads,
                             extra_files=files, extra_report={"search": _summary(record)}, progress=progress,
                             measure=measure, **compile_kw)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _evaluate(compile_one, model, passes, backend, out, judge, budget, target, calib, length, runs, threads,
              compile_kw) -> dict:
    """One candidate: compiled (not measured), its drops on the search split, its latency at
    ``length`` tokens and its size; its bundle kept (``_dir``) where it is within the budget."""
    start = time.perf_counter()
    try:
        # an LM is searched on its full forward (perplexity needs every position's logits); the
        # chosen recipe is then compiled as the user asked (--generate)
        result = compile_one(model, out=out, passes=passes, backend=backend, target=target, calib=calib, measure=False,
                             force=True, threads=threads, **{**compile_kw, "generate": False})
        runner = load(out, threads=threads)
        drops = judge.drops(runner)
    except TokoptError as e:
        return {"error": str(e).splitlines()[0][:300], "seconds": round(time.perf_counter() - start, 1)}
    feed = bench_feed(judge, length)
    lat = time_calls(lambda: runner(**feed), runs)["median_ms"]
    keep = budget.ok(drops) or passes == "canonicalize"   # the no-pass recipe is within any budget
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return {"drops": drops, "latency_ms": lat, "size_bytes": result.report["size_bytes"]["tokopt"],
            "seconds": round(time.perf_counter() - start, 1), **({"_dir": str(out)} if keep else {})}


def bench_feed(judge, length: int) -> dict:
    """The latency feed: one row of ``length`` tokens (an LM's first window; an encoder's passages'
    tokens repeated)."""
    if judge.task == "causal-lm":
        return {k: v[:1] for k, v in judge.feeds[0].items()}
    ids = np.concatenate([f["input_ids"][0] for f in judge.feeds])
    ids = np.resize(ids, length)[None].astype(np.int64)
    return {n: ids if n == "input_ids" else np.ones_like(ids) if n == "attention_mask" else np.zeros_like(ids)
            for n in judge.names}


def _choose(candidates: dict, budget: Budget, optimize: str, judge: Judge, held: Judge, length: int, runs: int,
            threads):
    """The chosen (passes, backend): the feasible candidates within 15% of the best are retimed
    interleaved (for latency), then the first of them in order that meets the budget on the
    held-out split; the no-pass recipe where none does."""
    feasible = [k for k, c in candidates.items() if "_dir" in c]
    cost = "latency_ms" if optimize == "latency" else "size_bytes"
    feasible.sort(key=lambda k: candidates[k][cost])
    timing = {}
    if optimize == "latency" and len(feasible) > 1:
        best = candidates[feasible[0]][cost]
        close = [k for k in feasible if candidates[k][cost] <= 1.15 * best][:4]
        if len(close) > 1:
            feed = bench_feed(judge, length)
            ms = time_interleaved({k: functools.partial(load(candidates[k]["_dir"], threads=threads), **feed)
                                   for k in close}, max(2, runs // 4), rounds=4)
            timing = {f"{k[1]}: {k[0]}": v for k, v in ms.items()}
            close.sort(key=ms.get)
            feasible = close + [k for k in feasible if k not in close]
    for key in feasible:
        c = candidates[key]
        if key[0] == "canonicalize":
            c["held_out"] = {"note": "the no-pass recipe: within any budget"}
            return key, timing
        drops = held.drops(load(c["_dir"], threads=threads))
        c["held_out"] = {"drops": drops, "within": budget.ok(drops)}
        if budget.ok(drops):
            return key, timing
    return next(k for k in candidates if k[0] == "canonicalize"), timing


def _recipe_yaml(passes: str, backend: str, budget: Budget) -> str:
    import yaml
    from .pass_manager import parse_pass_spec
    items = [s.name if not s.options else {s.name: dict(s.options)} for s in parse_pass_spec(passes)]
    return (f"# found by tokopt compile --max-drop {budget.text} (backend: {backend}); "
            f"replay: tokopt compile MODEL --recipe recipe.yaml --backend {backend}\n"
            + yaml.safe_dump({"passes": items}, sort_keys=False))


def _summary(record: dict) -> dict:
    chosen, metric = record["chosen"], record["budget"]["metric"]
    out = {"budget": record["budget"]["text"], "optimize": record["optimize"], "trials": record["trials"],
           "seconds": record["seconds"], "chosen": f"{chosen['backend']}: {chosen['passes']}",
           "search_drops": chosen.get("drops"), "held_out_drops": (chosen.get("held_out") or {}).get("drops"),
           "candidates": len(record["candidates"])}
    others = [c for c in record["candidates"] if "drops" in c and c["passes"] != "canonicalize"]
    if chosen["passes"] == "canonicalize" and others:   # no recipe with a pass met the budget: say how close one came
        best = min(others, key=lambda c: c["drops"][metric])
        out["no_pass_met_it"] = (f"no recipe with a pass met {record['budget']['text']}; the closest was "
                                 f"{best['backend']}: {best['passes']} at {metric} drop {best['drops'][metric]:.4g}, "
                                 f"{best['latency_ms']:.2f} ms")
    return out


def _plot(record: dict, budget: Budget, optimize: str) -> bytes | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io
    cost = "latency_ms" if optimize == "latency" else "size_bytes"
    pts = [(c[cost], c["drops"][budget.metric], c["backend"]) for c in record["candidates"] if "drops" in c]
    fig, ax = plt.subplots(figsize=(6, 4))
    for be in sorted({p[2] for p in pts}):
        xs, ys = zip(*[(x, y) for x, y, b in pts if b == be])
        ax.scatter(xs, ys, label=be, alpha=0.7)
    front = front_of(record, budget.metric, cost)
    if front:
        ax.plot([c[cost] for c in front], [c["drops"][budget.metric] for c in front], "k--", lw=1, label="front")
    ch = record["chosen"]
    ax.scatter([ch[cost]], [ch["drops"][budget.metric]], marker="*", s=250, c="red", label="chosen", zorder=5)
    ax.axhline(budget.limit, color="grey", lw=1, ls=":")
    ax.set_xlabel("median ms" if optimize == "latency" else "bytes")
    ax.set_ylabel(f"{budget.metric} drop (search split)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def front_of(record: dict, metric: str, cost: str) -> list[dict]:
    """The candidates no other beats on both cost and drop, by cost."""
    done = sorted((c for c in record["candidates"] if "drops" in c), key=lambda c: (c[cost], c["drops"][metric]))
    front, best = [], float("inf")
    for c in done:
        if c["drops"][metric] < best:
            front.append(c)
            best = c["drops"][metric]
    return front


def format_front(record: dict) -> str:
    metric = record["budget"]["metric"]
    cost = "latency_ms" if record["optimize"] == "latency" else "size_bytes"
    rows = [f"search: {record['budget']['text']}, {record['optimize']}, {record['trials']} trials in "
            f"{record['seconds']} s; front (search split):",
            f"  {'ms' if cost == 'latency_ms' else 'MB':>8}  {metric + ' drop':>12}  recipe"]
    for c in front_of(record, metric, cost):
        mark = "*" if (c["passes"], c["backend"]) == (record["chosen"]["passes"], record["chosen"]["backend"]) else " "
        value = c[cost] if cost == "latency_ms" else c[cost] / 1e6
        rows.append(f"{mark} {value:8.2f}  {c['drops'][metric]:12.4g}  {c['backend']}: {c['passes']}")
    return "\n".join(rows)
