"""Decoding speed of --generate bundles against what a user would run instead, in one run.

    python benchmarks/decode.py [MODEL] [--prompts 256 896] [--new 128] [--threads 2] [--passes SPEC ...]
                                [--genai fp32 int4 int8] [--genai-runs-ours] [--no-eager] [--no-plain]
                                [--rounds 3] [--lookup K ...]

MODEL defaults to the shipped reference LM. Each candidate decodes the same prompt (held-out
text cut to each length) greedily for ``--new`` tokens, batch 1, the same thread count:
    eager           transformers' generate() in PyTorch eager (sdpa), torch.no_grad
    onnx-plain      torch.onnx.export(ep, dynamo=True) defaults of the same prefill/decode graph,
                    run by tokopt's decoding loop in ONNX Runtime
    tokopt          the `tokopt compile --generate` bundle run by ``runner.generate`` (decoder
                    attention on GroupQueryAttention, the cache in bound buffers)
    tokopt <passes> the same with each of ``--passes`` (default: rsq int4 and int8, int4 without
                    the online rotation, TCA; calibrated on the held-out text's start)
    ... lookup=K    with ``--lookup``: each tokopt bundle again, drafting up to K tokens a step
                    from earlier in the text (``runner.generate(prompt_lookup=K)``); each genai
                    build again with its own n-gram speculative decoding (``ngram_size``
                    ``--genai-ngram``, ``max_draft_tokens`` K)
    genai-fp32/int4/int8
                    onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder
                    -p fp32|int4|int8 -e cpu``) run by its own generator, where it is installed
                    (``pip install -e ".[bench]"``); a row says why where it is not
    genai runs tokopt [<passes>]
                    with ``--genai-runs-ours``: each tokopt bundle exported for genai (``tokopt
                    export --to genai``) run by genai's generator (its C++ loop on tokopt's graph)
Reported: time to the first token (prefill), decode tokens/s after it, ratios to the fp32
tokopt bundle, how many leading tokens each candidate shares with the fp32 tokopt bundle
(which must equal eager's and plain ONNX's: checked), and, where genai is timed, each tokopt
candidate's decode speed against genai's build at its weights' precision as the median of the
per-round ratios with its interquartile range. Each candidate first runs once (2 new
tokens) so allocation and first-call costs are not timed, then candidates take turns for
``--rounds`` rounds (medians reported), each turn after a short pause and each round starting one
candidate later, so a neighbour's busy threads favour nobody.
Prints a table, writes bench-out/decode.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from paired import ratio_stats, rotated

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]


class _Clock:
    """Token timestamps: the first marks the end of prefill."""

    def __init__(self):
        self.start, self.times = time.perf_counter(), []

    def tick(self, *_):
        self.times.append(time.perf_counter())

    def result(self, new: int) -> dict:
        first = self.times[0] - self.start
        rate = (len(self.times) - 1) / (self.times[-1] - self.times[0])
        assert len(self.times) == new, (len(self.times), new)
        return {"first_token_ms": first * 1e3, "decode_tok_s": rate}


class _Streamer:
    """transformers calls put() with the prompt first, then with each new token."""

    def __init__(self, clock):
        self.clock, self.seen_prompt = clock, False

    def put(self, value):
        if self.seen_prompt:
            self.clock.tick()
        self.seen_prompt = True

    def end(self):
        pass


def _genai(model_dir: str, precision: str, work: Path, threads: int):
    """A decode function over onnxruntime-genai's build of the model, or the reason there is none."""
    from tokopt.backends import genai
    model = genai.build(Path(model_dir), precision, work / f"genai-{precision}", threads)
    return model if isinstance(model, str) else _genai_decode(model)


def _genai_runs(bundle: Path, out: Path, threads: int):
    """A decode function of genai's generator over ``tokopt export --to genai`` of ``bundle``, or
    why there is none (a bundle the export refuses: tca's)."""
    import tokopt
    from tokopt.backends import genai
    why = genai.missing()
    if why:
        return why
    try:
        return _genai_decode(genai.load(tokopt.export(bundle, out, to="genai"), threads))
    except tokopt.UsageError as e:
        return str(e)


def _genai_decode(model):
    from tokopt.backends import genai

    def decode(ids: np.ndarray, n: int, clock, speculative: dict | None = None) -> np.ndarray:
        gen = genai.generator(model, ids, ids.shape[1] + n, speculative)
        new = []
        while not gen.is_done() and len(new) < n:   # a sliding-window build may run on to its window
            gen.generate_next_token()
            new.append(int(gen.get_next_tokens()[0]))
            clock.tick()
        return np.concatenate([ids, np.array([new])], 1)
    return decode


def _paired(rounds: dict, name: str, peer: str | None) -> dict:
    """Decode speed against ``peer``, per round (``paired``)."""
    if peer is None or peer not in rounds or peer == name:
        return {}
    ratio = np.array([a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(rounds[name], rounds[peer])])
    return {"peer": peer, **ratio_stats("vs_peer", ratio)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "models" / "reference-lm"))
    ap.add_argument("--prompts", type=int, nargs="+", default=[256, 896])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", nargs="*", default=["rsq:bits=4", "rsq:bits=4,online=false", "rsq:bits=8", "tca",
                                                       "tca:select=step"])
    ap.add_argument("--no-eager", action="store_true", help="leave out transformers' generate (the slowest)")
    ap.add_argument("--no-plain", action="store_true", help="leave out the plain torch.onnx.export graph")
    ap.add_argument("--genai", nargs="*", default=["fp32", "int4", "int8"], choices=["fp32", "int4", "int8"],
                    help="onnxruntime-genai builds to time (none: leave the peer out)")
    ap.add_argument("--lookup", type=int, nargs="*", default=[],
                    help="also time each tokopt bundle with prompt lookup drafting up to K tokens a step")
    ap.add_argument("--genai-runs-ours", action="store_true",
                    help="also time each tokopt bundle exported for onnxruntime-genai (tokopt export --to "
                         "genai) on genai's own generator")
    ap.add_argument("--genai-ngram", type=int, default=2,
                    help="with --lookup: the n-gram size of onnxruntime-genai's own lookup (its speculative "
                         "ngram_size), timed with the same K")
    ap.add_argument("--out", default="bench-out/decode.json")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tokopt
    from tokopt.backends import genai as genai_peer
    from tokopt.backends.onnxruntime import export_baseline, make_session
    from tokopt.optimizer.generation import generate_ids
    from tokopt.optimizer.report import SETTLE

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    longest = max(args.prompts) + args.new
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, longest)
    model.generation_config.eos_token_id = None  # every candidate decodes exactly --new tokens
    work = Path(tempfile.mkdtemp(prefix="tokopt-decode-"))
    heldout = ROOT / "models" / "reference-lm" / "heldout.txt"
    res = tokopt.compile(model, out=work / "bundle", generate=True, measure=False, threads=args.threads)
    runner = tokopt.load(res.bundle, threads=args.threads)
    quantized = {f"tokopt {spec}": tokopt.load(tokopt.compile(args.model, out=work / f"q{i}", generate=True,
                                                              passes=spec, calib=heldout, measure=False).bundle,
                                               threads=args.threads)
                 for i, spec in enumerate(args.passes)}
    spec = res.program.cache
    if not args.no_plain:
        export_baseline(tokopt.capture(model, generate=True), work / "plain.onnx")
        plain = make_session(work / "plain.onnx", ["CPUExecutionProvider"], args.threads)
        names = [i.name for i in plain.get_inputs()]
    genai = {f"genai-{p}": _genai(args.model, p, work, args.threads) for p in args.genai}
    if args.genai_runs_ours:
        bundles = {"tokopt": res.bundle, **{name: r.bundle for name, r in quantized.items()}}
        genai.update({f"genai runs {name}": _genai_runs(b, work / f"genai-ours-{i}", args.threads)
                      for i, (name, b) in enumerate(bundles.items())})

    # each candidate's peer: genai's own build at its weights' precision (a lookup candidate's: that
    # build with n-gram drafting of the same K), for the paired per-round ratio
    precision = {"tokopt": "fp32", **{name: genai_peer.precision_of(r.manifest["passes"]) for name, r in quantized.items()}}
    peer_of = {}
    for name, p in precision.items():
        for who in (name, f"genai runs {name}"):
            peer_of[who] = f"genai-{p}"
            peer_of.update({f"{who} lookup={k}": f"genai-{p} ngram={k}" for k in args.lookup})

    def plain_step(feed):
        outs = plain.run(None, {n: feed[n] for n in names})
        return dict(zip(["logits", *spec.output_names], outs))

    text = heldout.read_text()
    all_ids = tok(text)["input_ids"][-(max(args.prompts) + 10):]   # the end of the held-out text
    rows = []
    for length in args.prompts:
        ids = np.array([all_ids[:length]], dtype=np.int64)
        candidates = {
            "eager": lambda n, clock: model.generate(torch.from_numpy(ids), max_new_tokens=n, do_sample=False,
                                                     pad_token_id=0, streamer=_Streamer(clock)).numpy(),
            "onnx-plain": lambda n, clock: generate_ids(plain_step, spec, ids, max_new_tokens=n, on_token=clock.tick),
            "tokopt": lambda n, clock: runner.generate(input_ids=ids, max_new_tokens=n, on_token=clock.tick),
            **{name: (lambda n, clock, r=r: r.generate(input_ids=ids, max_new_tokens=n, on_token=clock.tick))
               for name, r in quantized.items()},
            **{f"{name} lookup={k}": (lambda n, clock, r=r, k=k: r.generate(input_ids=ids, max_new_tokens=n,
                                                                          on_token=clock.tick, prompt_lookup=k))
               for name, r in {"tokopt": runner, **quantized}.items() for k in args.lookup},
            **{name: (lambda n, clock, g=g: g(ids, n, clock)) for name, g in genai.items() if callable(g)},
            **{f"{name} ngram={k}": (lambda n, clock, g=g, k=k: g(ids, n, clock, {"ngram_size": args.genai_ngram,
                                                                                 "max_draft_tokens": k}))
               for name, g in genai.items() if callable(g) for k in args.lookup}}
        if args.no_eager:
            del candidates["eager"]
        if args.no_plain:
            del candidates["onnx-plain"]
        rounds, tokens = {name: [] for name in candidates}, {}
        with torch.no_grad():
            for name, run in candidates.items():
                run(2, _Clock())
            order = list(candidates.items())
            for r in range(args.rounds):
                for name, run in rotated(order, r):
                    time.sleep(SETTLE)   # the last candidate's runtime threads stop spinning first
                    clock = _Clock()
                    tokens[name] = run(args.new, clock)
                    rounds[name].append(clock.result(args.new))
        timings = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for name, rs in rounds.items()}
        for name in ("eager", "onnx-plain"):
            if name in tokens:
                assert np.array_equal(tokens[name], tokens["tokopt"]), f"{name} decoded different tokens at {length}"
        ours = timings["tokopt"]
        for name, t in timings.items():
            same = tokens[name][0, length:] == tokens["tokopt"][0, length:]
            rows.append({"prompt": length, "candidate": name, **t,
                         "vs_tokopt_decode": t["decode_tok_s"] / ours["decode_tok_s"],
                         "leading_tokens_equal": int(same.argmin()) if not same.all() else len(same),
                         **_paired(rounds, name, peer_of.get(name))})
        rows += [{"prompt": length, "candidate": name, "unavailable": why} for name, why in genai.items()
                 if not callable(why)]

    width = max(len(r["candidate"]) for r in rows) + 2
    print(f"{'prompt':>6}  {'candidate':<{width}}{'1st token ms':>13}{'decode tok/s':>13}{'vs tokopt':>10}"
          f"{'same tokens':>12}  vs genai at its precision, per round (IQR)")
    for r in rows:
        if "unavailable" in r:
            print(f"{r['prompt']:>6}  {r['candidate']:<{width}}{'unavailable: ' + r['unavailable']}")
            continue
        print(f"{r['prompt']:>6}  {r['candidate']:<{width}}{r['first_token_ms']:>13.1f}{r['decode_tok_s']:>13.1f}"
              f"{r['vs_tokopt_decode']:>9.2f}x{r['leading_tokens_equal']:>12}"
              + (f"  {r['vs_peer']:.3f}x ({r['vs_peer_iqr'][0]:.3f}-{r['vs_peer_iqr'][1]:.3f}) {r['peer']}"
                 if "vs_peer" in r else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "threads": args.threads, "new_tokens": args.new,
                               "rounds": args.rounds, "lookup": args.lookup,
                               "onnxruntime": ort.__version__, "torch": torch.__version__,
                               "kv_cache_bytes": {str(n): spec.nbytes(n) for n in (1024, 4096)},
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
