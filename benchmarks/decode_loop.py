"""Decode loops alone: compiled generation bundles' ``generate`` against onnxruntime-genai's generator.

    python benchmarks/decode_loop.py BUNDLE [BUNDLE ...] [--model models/reference-lm]
                                     [--precision fp32|int4|int8] [--prompts 256 896] [--new 128]
                                     [--threads 2] [--rounds 40] [--general-loop]

The bundles are compiled beforehand (``tokopt compile MODEL --out BUNDLE ...``), and this process
does nothing else before timing, as a deployment runs them (``benchmarks/decode.py`` compiles its
bundles and runs the eager model in the process it times in). The loops decode the same prompt
(the end of the held-out text cut to each length) greedily for ``--new`` tokens, batch 1:
    BUNDLE          ``runner.generate`` on each bundle
    genai-<p>       onnxruntime-genai's generator on its own build of MODEL at ``--precision``
                    (the peer; default: the precision of the first bundle's weights)
    genai on BUNDLE genai's generator on the first bundle exported for it (``tokopt export --to
                    genai``): the same graph in genai's C++ loop (where the bundle exports)
    BUNDLE, general loop   (``--general-loop``) the first bundle stepped by ``generate``'s general
                    loop, not its decoding's own greedy loop (``BoundDecoding.greedy``): what that loop saves
Each round times them back to back in rotating order; reported: decode tokens/s (median), each
loop's ratio to the peer and to the first bundle as the median of the per-round ratios with its
interquartile range, and the leading tokens each shares with the first bundle's. Prints a table,
writes bench-out/decode-loop.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from decode import ROOT, _Clock, _genai_decode
from paired import ratio_stats, rotated


class _GeneralLoop:
    """A runner whose decodings have no greedy loop of their own: ``generate_ids`` steps them
    through its general loop."""

    def __init__(self, runner):
        self.runner = runner

    def decoding(self, batch: int, capacity: int, drafts: bool = False):
        decoding = self.runner.decoding(batch, capacity, drafts)
        decoding.greedy = None
        return decoding


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--model", default=str(ROOT / "models" / "reference-lm"))
    ap.add_argument("--precision", choices=["fp32", "int4", "int8"])
    ap.add_argument("--prompts", type=int, nargs="+", default=[256, 896])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--general-loop", action="store_true")
    ap.add_argument("--out", default="bench-out/decode-loop.json")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    import tokopt
    from tokopt.backends import genai
    from tokopt.optimizer.errors import UsageError
    from tokopt.optimizer.report import SETTLE
    from tokopt.optimizer.runtime import read_manifest

    why = genai.missing()
    if why:
        raise SystemExit(why)
    first = args.bundles[0]
    precision = args.precision or genai.precision_of(read_manifest(Path(first))["passes"])
    work = Path(tempfile.mkdtemp(prefix="tokopt-decode-loop-"))
    peer = genai.build(Path(args.model), precision, work / f"genai-{precision}", args.threads)
    if isinstance(peer, str):
        raise SystemExit(peer)
    loops, runners = {}, {b: tokopt.load(b, threads=args.threads) for b in args.bundles}
    for b, runner in runners.items():
        loops[b] = lambda ids, n, clock, r=runner: r.generate(input_ids=ids, max_new_tokens=n, on_token=clock.tick)
    if args.general_loop:   # the first bundle's session, stepped by the general loop
        from tokopt.optimizer.generation import generate_ids
        general, spec = _GeneralLoop(runners[first]), runners[first].cache_spec()
        loops[f"{first}, general loop"] = lambda ids, n, clock: generate_ids(general, spec, ids, max_new_tokens=n,
                                                                            on_token=clock.tick)
    peer_name = f"genai-{precision}"
    loops[peer_name] = _genai_decode(peer)
    try:
        loops[f"genai on {first}"] = _genai_decode(genai.load(tokopt.export(first, work / "ours", to="genai"),
                                                              args.threads))
    except UsageError as e:   # a bundle genai cannot run (tca's compacted cache): its row says so
        print(f"genai on {first}: {e}")
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
            for name, run in rotated(order, r):
                time.sleep(SETTLE)
                clock = _Clock()
                tokens[name] = np.asarray(run(ids, args.new, clock))[0, length:]
                rates[name].append(clock.result(args.new)["decode_tok_s"])
        peer_rate, ours = np.array(rates[peer_name]), np.array(rates[first])
        for name, rate in rates.items():
            same = tokens[name] == tokens[first]
            rows.append({"prompt": length, "loop": name, "decode_tok_s": float(np.median(rate)),
                         **ratio_stats("vs_peer", np.array(rate) / peer_rate),
                         **ratio_stats("vs_first", np.array(rate) / ours),
                         "leading_tokens_equal_first": int(same.argmin()) if not same.all() else len(same)})
    width = max(len(r["loop"]) for r in rows) + 2
    print(f"{'prompt':>6}  {'loop':<{width}}{'decode tok/s':>13}{'vs peer':>9}{'IQR':>14}{'vs first':>10}{'IQR':>14}"
          f"{'same tokens':>12}")
    for r in rows:
        print(f"{r['prompt']:>6}  {r['loop']:<{width}}{r['decode_tok_s']:>13.1f}{r['vs_peer']:>8.3f}x"
              f"{'{:.3f}-{:.3f}'.format(*r['vs_peer_iqr']):>14}{r['vs_first']:>9.3f}x"
              f"{'{:.3f}-{:.3f}'.format(*r['vs_first_iqr']):>14}{r['leading_tokens_equal_first']:>12}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundles": args.bundles, "model": args.model, "precision": precision,
                               "threads": args.threads, "new_tokens": args.new, "rounds": args.rounds,
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
