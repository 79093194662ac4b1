"""Decode loops alone: a compiled generation bundle's ``generate`` against onnxruntime-genai's generator.

    python benchmarks/decode_loop.py BUNDLE [--model models/reference-lm] [--precision fp32|int4|int8]
                                     [--prompts 256 896] [--new 128] [--threads 2] [--rounds 40]

BUNDLE is compiled beforehand (``tokopt compile MODEL --out BUNDLE ...``), and this process does
nothing else before timing, as a deployment runs it (``benchmarks/decode.py`` compiles its bundles
and runs the eager model in the process it times in). Three loops decode the same prompt (the end
of the held-out text cut to each length) greedily for ``--new`` tokens, batch 1:
    tokopt          ``runner.generate`` on BUNDLE
    genai           onnxruntime-genai's generator on its own build of MODEL at ``--precision``
                    (the peer; default: the precision of BUNDLE's weights)
    genai on tokopt genai's generator on BUNDLE exported for it (``tokopt export --to genai``): the
                    same graph in genai's C++ loop
Each round times the three back to back in rotating order; reported: decode tokens/s (median),
each loop's ratio to the peer as the median of the per-round ratios with its interquartile range,
and the leading tokens each shares with tokopt's. Prints a table, writes bench-out/decode-loop.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from decode import ROOT, _Clock, _genai_decode


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--model", default=str(ROOT / "models" / "reference-lm"))
    ap.add_argument("--precision", choices=["fp32", "int4", "int8"])
    ap.add_argument("--prompts", type=int, nargs="+", default=[256, 896])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", default="bench-out/decode-loop.json")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    import tokopt
    from tokopt.backends import genai
    from tokopt.optimizer.report import SETTLE
    from tokopt.optimizer.runtime import read_manifest

    why = genai.missing()
    if why:
        raise SystemExit(why)
    precision = args.precision or genai.precision_of(read_manifest(Path(args.bundle))["passes"])
    work = Path(tempfile.mkdtemp(prefix="tokopt-decode-loop-"))
    peer = genai.build(Path(args.model), precision, work / f"genai-{precision}", args.threads)
    if isinstance(peer, str):
        raise SystemExit(peer)
    runner = tokopt.load(args.bundle, threads=args.threads)
    loops = {"tokopt": lambda ids, n, clock: runner.generate(input_ids=ids, max_new_tokens=n, on_token=clock.tick),
             f"genai-{precision}": _genai_decode(peer),
             "genai on tokopt": _genai_decode(genai.load(tokopt.export(args.bundle, work / "ours", to="genai"),
                                                         args.threads))}
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    text = (ROOT / "models" / "reference-lm" / "heldout.txt").read_text()
    all_ids = tok(text)["input_ids"][-(max(args.prompts) + 10):]
    rows, order = [], list(loops.items())
    for length in args.prompts:
        ids = np.array([all_ids[:length]], dtype=np.int64)
        for run in loops.values():
            run(ids, 2, _Clock())
        rates, tokens = {name: [] for name in loops}, {}
        for r in range(args.rounds):
            for name, run in order[r % len(order):] + order[:r % len(order)]:
                time.sleep(SETTLE)
                clock = _Clock()
                tokens[name] = np.asarray(run(ids, args.new, clock))[0, length:]
                rates[name].append(clock.result(args.new)["decode_tok_s"])
        base = np.array(rates[f"genai-{precision}"])
        for name, rate in rates.items():
            ratio = np.array(rate) / base
            same = tokens[name] == tokens["tokopt"]
            rows.append({"prompt": length, "loop": name, "decode_tok_s": float(np.median(rate)),
                         "vs_peer": float(np.median(ratio)),
                         "vs_peer_iqr": [float(np.percentile(ratio, 25)), float(np.percentile(ratio, 75))],
                         "leading_tokens_equal_tokopt": int(same.argmin()) if not same.all() else len(same)})
    print(f"{'prompt':>6}  {'loop':<18}{'decode tok/s':>13}{'vs peer':>9}{'IQR':>14}{'same tokens':>12}")
    for r in rows:
        print(f"{r['prompt']:>6}  {r['loop']:<18}{r['decode_tok_s']:>13.1f}{r['vs_peer']:>8.3f}x"
              f"{'{:.3f}-{:.3f}'.format(*r['vs_peer_iqr']):>14}{r['leading_tokens_equal_tokopt']:>12}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundle": args.bundle, "model": args.model, "precision": precision,
                               "threads": args.threads, "new_tokens": args.new, "rounds": args.rounds,
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
