"""Decoding speed of a --generate bundle against what a user would run instead, in one run.

    python benchmarks/decode.py [MODEL] [--prompts 256 2048] [--new 64] [--threads 2]

MODEL defaults to the shipped reference LM. Each candidate decodes the same prompt (held-out
text cut to each length) greedily for ``--new`` tokens, batch 1, the same thread count:
    eager           transformers' generate() in PyTorch eager (sdpa), torch.no_grad
    onnx-plain      torch.onnx.export(ep, dynamo=True) defaults of the same prefill/decode graph,
                    run by tokopt's decoding loop in ONNX Runtime
    tokopt          the `tokopt compile --generate` bundle (canonicalize: ONNX Attention + ORT
                    fusions) run by ``runner.generate``
Reported: time to the first token (prefill), decode tokens/s after it, and ratios to tokopt;
each candidate first runs once at the same prompt length (2 new tokens) so allocation and
first-call costs are not timed, then candidates take turns for ``--rounds`` rounds (medians
reported), so a neighbour's busy threads do not favour whoever runs first.
All three must produce the same tokens (checked). The reference LM was trained on 1024-token
windows; prompts past that are timed with its RoPE extended (a speed measurement only).
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "models" / "reference-lm"))
    ap.add_argument("--prompts", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench-out/decode.json")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tokopt
    from tokopt.backends.onnxruntime import export_baseline, make_session
    from tokopt.optimizer.generation import generate_ids

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    longest = max(args.prompts) + args.new
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, longest)
    model.generation_config.eos_token_id = None  # every candidate decodes exactly --new tokens
    work = Path(tempfile.mkdtemp(prefix="tokopt-decode-"))
    res = tokopt.compile(model, out=work / "bundle", generate=True, measure=False, threads=args.threads)
    runner = tokopt.load(res.bundle, threads=args.threads)
    export_baseline(tokopt.capture(model, generate=True), work / "plain.onnx")
    plain = make_session(work / "plain.onnx", ["CPUExecutionProvider"], args.threads)
    spec = res.program.cache
    names = [i.name for i in plain.get_inputs()]

    def plain_step(feed):
        outs = plain.run(None, {n: feed[n] for n in names})
        return dict(zip(["logits", *spec.output_names], outs))

    text = (ROOT / "models" / "reference-lm" / "heldout.txt").read_text()
    all_ids = tok(text)["input_ids"]
    rows = []
    for length in args.prompts:
        ids = np.array([all_ids[:length]], dtype=np.int64)
        candidates = {
            "eager": lambda n, clock: model.generate(torch.from_numpy(ids), max_new_tokens=n, do_sample=False,
                                                     pad_token_id=0, streamer=_Streamer(clock)).numpy(),
            "onnx-plain": lambda n, clock: generate_ids(plain_step, spec, ids, max_new_tokens=n, on_token=clock.tick),
            "tokopt": lambda n, clock: runner.generate(input_ids=ids, max_new_tokens=n, on_token=clock.tick)}
        rounds, tokens = {name: [] for name in candidates}, {}
        with torch.no_grad():
            for name, run in candidates.items():
                run(2, _Clock())
            for _ in range(args.rounds):
                for name, run in candidates.items():
                    clock = _Clock()
                    tokens[name] = run(args.new, clock)
                    rounds[name].append(clock.result(args.new))
        timings = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for name, rs in rounds.items()}
        for name, t in tokens.items():
            assert np.array_equal(t, tokens["tokopt"]), f"{name} decoded different tokens at {length}"
        ours = timings["tokopt"]
        for name, t in timings.items():
            rows.append({"prompt": length, "candidate": name, **t,
                         "tokopt_speedup_decode": ours["decode_tok_s"] / t["decode_tok_s"],
                         "tokopt_speedup_first_token": t["first_token_ms"] / ours["first_token_ms"]})

    print(f"{'prompt':>6}  {'candidate':<11}{'1st token ms':>13}{'decode tok/s':>13}{'tokopt x (decode)':>19}"
          f"{'tokopt x (1st)':>16}")
    for r in rows:
        print(f"{r['prompt']:>6}  {r['candidate']:<11}{r['first_token_ms']:>13.1f}{r['decode_tok_s']:>13.1f}"
              f"{r['tokopt_speedup_decode']:>18.2f}x{r['tokopt_speedup_first_token']:>15.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "threads": args.threads, "new_tokens": args.new,
                               "rounds": args.rounds,
                               "onnxruntime": ort.__version__, "torch": torch.__version__,
                               "kv_cache_bytes": {str(n): spec.nbytes(n) for n in (1024, 4096)},
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
