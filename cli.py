"""``tokopt`` on the command line: a thin face over the Python API.

    tokopt compile MODEL [--passes …] [--recipe …] [--backend …] [--target …] [--out DIR] …
    tokopt compile MODEL --max-drop cosine=0.002 [--optimize latency|size] [--search-time 20m]
    tokopt run BUNDLE --text "…" | --input-ids 1,2,3 [--max-new-tokens N [--sample … | --prompt-lookup K]]
    tokopt inspect MODEL|BUNDLE
    tokopt verify BUNDLE [--emulate] | --setup
    tokopt passes | targets | backends

Errors print one paragraph and exit with the error's code (2 usage, 3 unreadable model,
4 unsupported model, 5 pass failed, 6 backend, 7 bundle, 1 internal; ``tokopt verify`` exits 8
when the bundle disagrees); ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import warnings
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tokopt", description="Compile trained transformers to do less work per token.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="capture, rewrite, lower and measure a model into a bundle")
    c.add_argument("model", help="Hugging Face folder, .pt2 file, or package.module:callable")
    c.add_argument("--passes", default=None, help="e.g. 'canonicalize' or 'name:opt=value,opt2=v,other'")
    c.add_argument("--recipe", default=None, help="YAML file with a 'passes:' list")
    c.add_argument("--backend", default=None, help="onnxruntime (default), openvino, inductor, tensorrt; with "
                                                   "--max-drop, the search's choice unless given")
    c.add_argument("--target", default="x86-cpu")
    c.add_argument("--precision", default="auto", help="auto | fp32 | bf16 (OpenVINO: bf16 where the CPU has it)")
    c.add_argument("--calib", default=None, help="calibration data: text file, JSONL of texts, or .npy ids")
    c.add_argument("--out", default=None, help="bundle folder (default: ./<model name>.tokopt)")
    c.add_argument("--force", action="store_true", help="replace an existing --out folder")
    c.add_argument("--verify-each", action="store_true", help="lint, verify and check numerics after every pass")
    c.add_argument("--seq-len", type=int, default=16, help="example sequence length used for export")
    c.add_argument("--max-seq-len", type=int, default=None, help="longest sequence the bundle accepts")
    c.add_argument("--trust-pickle", action="store_true", help="allow .bin/.pt pickle weights")
    c.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation to load")
    c.add_argument("--no-measure", action="store_true", help="skip the quality and latency report")
    c.add_argument("--bench-runs", type=int, default=20,
                   help="calls timed per candidate and length, at most (0: quality only, no timing)")
    c.add_argument("--max-memory", metavar="SIZE", help="memory the compile may hold, e.g. 16GB (default: what is "
                   "available); a model that cannot fit is refused before it is read")
    c.add_argument("--bench-time", type=float, default=10.0, metavar="SECONDS",
                   help="stop timing a candidate after this many seconds of calls (at least 3 calls)")
    c.add_argument("--bench-len", type=int, default=128, help="tokens per sequence for the latency probe")
    c.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    c.add_argument("--static-shapes", action="store_true",
                   help="OpenVINO: the runner compiles one model per input shape on first use (that call pays "
                        "the compile); faster calls where lengths repeat (padded buckets). A causal LM then "
                        "compiles its full-sequence forward")
    c.add_argument("--generate", action=argparse.BooleanOptionalAction, default=None,
                   help="causal LMs compile to one prefill/decode graph with a KV cache by default (runner.generate, "
                        "`tokopt run --max-new-tokens`; a plain call still gives every position's logits); "
                        "--no-generate: the full-sequence forward only")
    c.add_argument("--max-drop", default=None, help="search the passes for the fastest bundle within a quality "
                                                    "budget: cosine=0.002, spearman=0.995, ppl=2%%, kl=0.01, top1=99%%")
    c.add_argument("--optimize", default="latency", choices=("latency", "size"), help="with --max-drop")
    c.add_argument("--search-time", default="20m", help="with --max-drop: how long to search (20m, 90s, 1h)")
    c.add_argument("--search-trials", type=int, default=None, help="with --max-drop: at most this many trials")
    c.add_argument("--seed", type=int, default=0, help="with --max-drop: the sampler's seed")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--quiet", action="store_true", help="no progress lines")

    r = sub.add_parser("run", help="run a bundle on text or token ids")
    r.add_argument("bundle")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--text")
    g.add_argument("--input-ids", help="comma-separated token ids")
    r.add_argument("--show-top", type=int, default=5, help="how many next-token candidates to show")
    r.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (a --generate bundle; default 32); the text streams as it comes")
    r.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    r.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this mass")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--stop", default=None, help="comma-separated extra stop token ids")
    r.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                   help="greedy: draft up to K tokens a step from earlier in the text and verify them in one "
                        "call (same tokens, fewer calls where the text repeats itself)")
    r.add_argument("--json", action="store_true")

    i = sub.add_parser("inspect", help="show a model's attention index, or a bundle's manifest and report")
    i.add_argument("target", metavar="MODEL|BUNDLE")
    i.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    i.add_argument("--trust-pickle", action="store_true")
    i.add_argument("--json", action="store_true")

    v = sub.add_parser("verify", help="run a bundle here and against its original model; --emulate runs an ARM "
                                      "bundle on ARM code under qemu")
    v.add_argument("bundle", nargs="?", help="the bundle folder (omit with --setup)")
    v.add_argument("--emulate", action="store_true", help="also run it on emulated aarch64 ONNX Runtime")
    v.add_argument("--setup", action="store_true", help="download the emulated aarch64 Python and ONNX Runtime "
                                                        "(once; about 50 MB from Debian and PyPI)")
    v.add_argument("--json", action="store_true")
    e = sub.add_parser("export", help="write a bundle for another runtime's loader (genai: onnxruntime-genai)")
    e.add_argument("bundle")
    e.add_argument("--to", default="genai", help="the runtime: genai")
    e.add_argument("--out", required=True)
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    sub.add_parser("passes", help="list the passes and their options")
    sub.add_parser("targets", help="list the deployment targets")
    sub.add_parser("backends", help="list the backends and the targets each can compile for here")
    return ap


def _cmd_compile(args) -> int:
    import tokopt
    out = args.out or f"{Path(args.model.rstrip('/')).name.replace(':', '_')}.tokopt"
    result = tokopt.compile(
        args.model, out=out, passes=args.passes, recipe=args.recipe, backend=args.backend, target=args.target,
        calib=args.calib, force=args.force, verify_each=args.verify_each, seq_len=args.seq_len,
        max_seq_len=args.max_seq_len, trust_pickle=args.trust_pickle, attn_implementation=args.attn,
        measure=not args.no_measure, bench_runs=args.bench_runs, bench_time=args.bench_time, max_memory=args.max_memory, bench_len=args.bench_len,
        threads=args.threads, generate=args.generate, progress=not (args.quiet or args.json),
        precision=args.precision, max_drop=args.max_drop, optimize=args.optimize, search_time=args.search_time,
        search_trials=args.search_trials, seed=args.seed, static_shapes=args.static_shapes)
    if args.json:
        print(json.dumps(result.report, indent=1, default=float))
    else:
        print(result)
        print(f"bundle written to {result.bundle}")
    return 0


def _ids(text: str, flag: str) -> list[int]:
    from .optimizer.errors import UsageError
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, e.g. 1,2,3.") from None


def _cmd_generate(args, runner, tok, ids: list[int]) -> int:
    import numpy as np
    stream = (lambda piece: print(piece, end="", flush=True)) if tok is not None and not args.json else None
    if stream is not None:
        print(args.text if args.text is not None else tok.decode(ids), end="", flush=True)
    out = runner.generate(input_ids=np.array([ids], dtype=np.int64), max_new_tokens=args.max_new_tokens,
                          do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop_tokens=_ids(args.stop or "", "--stop"),
                          on_text=stream, prompt_lookup=args.prompt_lookup)
    new = [int(t) for t in out[0, len(ids):]]
    if args.json:
        print(json.dumps({"prompt_tokens": len(ids), "new_ids": new,
                          **({"text": tok.decode(new, skip_special_tokens=True)} if tok else {})}, indent=1))
    elif stream is not None:
        print()
    else:
        print(",".join(str(t) for t in new))
    return 0


def _cmd_run(args) -> int:
    import numpy as np
    import tokopt
    from .optimizer.errors import UsageError
    runner = tokopt.load(args.bundle)
    m = runner.manifest
    if "input_ids" not in runner.inputs:
        raise UsageError(f"this bundle takes {', '.join(runner.inputs)}, not text; run it from Python "
                         "with tokopt.load(BUNDLE)(**inputs).")
    if args.max_new_tokens is None and m.get("generation"):
        args.max_new_tokens = 32
    sampling = args.sample or args.top_k or args.top_p != 1.0 or args.temperature != 1.0 or args.stop \
        or args.prompt_lookup
    if args.max_new_tokens is None and sampling:
        raise UsageError("--sample, --temperature, --top-k, --top-p, --stop and --prompt-lookup apply to generation; "
                         "add --max-new-tokens N (the bundle must be compiled for generation, the default for causal LMs).")
    tok = runner.tokenizer() if args.text is not None or m.get("tokenizer") else None
    ids = tok(args.text)["input_ids"] if args.text is not None else _ids(args.input_ids, "--input-ids")
    if not ids:
        raise UsageError("the input is empty: give at least one token.")
    if args.max_new_tokens is not None:
        runner.cache_spec()  # refuses a bundle without a decode graph before the prompt is echoed
        return _cmd_generate(args, runner, tok, ids)
    feed = {"input_ids": np.array([ids], dtype=np.int64)}
    for name in runner.inputs:
        if name != "input_ids":
            feed[name] = np.ones_like(feed["input_ids"]) if name == "attention_mask" else np.zeros_like(feed["input_ids"])
    out = runner(**feed)
    summary = {"tokens": len(ids), "outputs": {k: list(v.shape) for k, v in out.items()}}
    if "logits" in out:
        last = out["logits"][0, -1]
        top = np.argsort(-last)[: args.show_top]
        p = np.exp(last - last.max())
        p /= p.sum()
        summary["next_token"] = [{"id": int(t), "p": float(p[t]), **({"text": tok.decode([int(t)])} if tok else {})}
                                 for t in top]
    elif "last_hidden_state" in out:
        emb = out["last_hidden_state"][0].mean(0)
        summary["embedding"] = {"dim": int(emb.shape[0]), "norm": float(np.linalg.norm(emb)),
                                "head": [round(float(x), 4) for x in emb[:8]]}
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{len(ids)} tokens -> " + ", ".join(f"{k} {v}" for k, v in summary["outputs"].items()))
    for t in summary.get("next_token", []):
        print(f"  next token {t['id']:>6}  p={t['p']:.3f}  {t.get('text', '')!r}")
    if "embedding" in summary:
        e = summary["embedding"]
        print(f"  mean-pooled embedding: dim {e['dim']}, norm {e['norm']:.4f}, first values {e['head']}")
    return 0


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _cmd_inspect(args) -> int:
    target = Path(args.target)
    if (target / "manifest.json").exists():
        from .optimizer.bundle import verify_bundle
        from .optimizer.report import format_report
        manifest = verify_bundle(target)
        report = json.loads((target / "report.json").read_text()) if (target / "report.json").exists() else {}
        if args.json:
            print(json.dumps({"manifest": manifest, "report": report}, indent=1))
            return 0
        print(f"bundle {target}: {manifest['backend']} / {manifest['target']}, task {manifest.get('task')}")
        print(f"  source  {manifest['source'].get('path', manifest['source'].get('class'))}")
        print(f"  passes  {', '.join(p['name'] for p in manifest['passes'])}")
        for io in ("inputs", "outputs"):
            print(f"  {io:<7} " + "; ".join(f"{x['name']} {x['dtype']} {x['shape']}" for x in manifest[io]))
        gen = manifest.get("generation")
        if gen:
            c = gen["cache"]
            print(f"  generate {gen['graph']}; KV cache {c['layers']} layers x {c['kv_heads'][0]} heads x "
                  f"{c['head_dim'][0]} dims ({c['dtype']}), up to {c['max_length']} tokens")
        if report:
            print(format_report(report))
        if (target / "search.json").exists():
            from .optimizer.search import format_front
            print(format_front(json.loads((target / "search.json").read_text())))
        return 0
    import tokopt
    from .passes.token_prune import per_token_heads
    prog = tokopt.capture(args.target, attn_implementation=args.attn, trust_pickle=args.trust_pickle)
    rows = [b.row() for b in prog.attention]
    heads = per_token_heads(prog)
    if args.json:
        print(json.dumps({"attention": rows, "refused": [r.__dict__ for r in prog.rejected],
                          "inputs": prog.input_names, "outputs": prog.output_names, "task": prog.task,
                          "per_token_outputs": heads}, indent=1))
        return 0
    print(f"{args.target}: {prog.source.get('class', '')} ({prog.task}), inputs {prog.input_names}, "
          f"outputs {prog.output_names}")
    print(f"{len(rows)} attention blocks recognised")
    if rows:
        for r in rows:
            r["projections"] = "fused qkv" if r["fused_qkv"] else ("q/k/v" if r["q_proj"] else "?")
            r["o"] = "yes" if r["o_proj"] else "?"
        capped = ["softcap"] if any(r["softcap"] for r in rows) else []   # Gemma 2's logit soft cap
        print(_table(rows, ["layer", "module", "spelling", "heads", "kv_heads", "head_dim", "causal",
                            "rope", "projections", "o", *capped]))
    for r in prog.rejected:
        print(f"not recognised: {r.module} ({r.node}): {r.reason}")
    if heads:
        print(f"per-token outputs {', '.join(heads)}: token_prune needs restore=true (else it is refused)")
    return 0


def _cmd_verify(args) -> int:
    from .optimizer.errors import UsageError
    if args.setup:
        from .backends.emulate import setup
        setup(progress=lambda line: print(f"tokopt: {line}", file=sys.stderr))
        if args.bundle is None:
            return 0
    if args.bundle is None:
        raise UsageError("tokopt verify needs a bundle folder (or --setup alone to prepare the emulator).")
    from .backends.verify import format_verification, verify
    result = verify(args.bundle, emulate=args.emulate)
    print(json.dumps(result, indent=1) if args.json else format_verification(result))
    return 0 if result["ok"] else 8


def _cmd_export(args) -> int:
    from . import export
    out = export(args.bundle, args.out, to=args.to, force=args.force)
    print(f"written to {out}: load it with onnxruntime_genai.Model('{out}')")
    return 0


def _cmd_passes(args) -> int:
    import tokopt
    from .optimizer.pass_manager import PASSES, describe_options
    for name, summary in tokopt.list_passes().items():
        print(f"{name}: {summary}")
        for o in describe_options(PASSES[name]):
            default = o["default"]
            default = "/".join(map(str, default)) if isinstance(default, tuple) else \
                str(default).lower() if isinstance(default, bool) else default
            values = f"; values: {o['values']}" if o["values"] else ""
            print(f"    {o['name']}={default}  {o['help']}{values}")
    return 0


def _cmd_targets(args) -> int:
    import tokopt
    for name, desc in tokopt.list_targets().items():
        print(f"{name:<12} {desc}")
    return 0


def _cmd_backends(args) -> int:
    import tokopt
    for name, info in tokopt.list_backends().items():
        print(f"{name:<12} {info['summary']}")
        print(f"{'':<12} targets on this machine: {', '.join(info['targets']) or 'none'}")
    return 0


def _quiet_libraries():
    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _paragraph(text: str) -> str:
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        _quiet_libraries()
    from .optimizer.errors import TokoptError
    handler = {"compile": _cmd_compile, "run": _cmd_run, "inspect": _cmd_inspect, "verify": _cmd_verify,
               "export": _cmd_export, "passes": _cmd_passes, "targets": _cmd_targets,
               "backends": _cmd_backends}[args.command]
    try:
        return handler(args)
    except TokoptError as e:
        if args.debug:
            raise
        print(_paragraph(f"tokopt: error: {e}"), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        resumes = (" rsq's finished layers are kept in its cache: the same command resumes from them."
                   if "rsq" in str(getattr(args, "passes", None) or "") else "")
        print(f"tokopt: interrupted; no bundle was written.{resumes}", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(_paragraph(f"tokopt: internal error: {type(e).__name__}: {e}. This is a bug in tokopt; "
                         "rerun with --debug for the traceback and report it."), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
