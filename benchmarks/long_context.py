"""TCA-Attention and STILL at long context: attention time, error, whole-forward time and quality, one run.

    python benchmarks/long_context.py [--parts tca decode still] [--lengths 1024 4096 8192 16384] [--threads 2]

TCA (``--parts tca``):

On the shipped reference LM, with head budgets calibrated by the `tca` pass on the first 4
windows of its held-out text (tolerance ``--tolerance``):

attention   at each length, the real q/k/v of every layer (the model run on held-out text; past
            the 1024 it was trained on, RoPE simply continues): time of all layers' attention for
            dense causal SDPA (torch), the TCA op's torch reference, ONNX Runtime's standard
            ``Attention`` op (dense) and the TCA op's ONNX lowering; and TCA's relative output
            error per layer, ||O_tca - O|| / ||O||.
forward     the whole model at its full context (1024 tokens), ONNX Runtime: the dense tokopt
            bundle (canonicalize) vs the TCA bundle.
quality     perplexity on held-out windows the calibration did not see: dense; TCA; a uniform
            per-head budget plus a 64-token window, and sinks + a sliding window, both with
            TCA's mean number of keys per query.

TCA decode (``--parts decode``): ``--generate`` bundles (ONNX Runtime) of the reference LM: dense;
TCA with budgets calibrated on the generation graph, cache compacted at every step, chosen once
after the prefill (``select=prefill``: decode on GroupQueryAttention over the kept entries) and
not compacted (``compact=false``); and sinks + a sliding window whose compacted cache is as large as TCA's
(StreamingLLM's cache, at equal KV bytes). On held-out windows the calibration did not see: a
prefill of ``--prompt`` tokens, then every later token of the 1024-token window decoded one step
at a time (teacher-forced): perplexity of those tokens, time per decode step, and the KV-cache
bytes each bundle holds after a prefill of 1024 tokens (measured on what it returns) and of 4096
(past the model's context: the pass's count of the entries the op keeps).

STILL (``--parts still``): the ``still`` pass with its defaults (layers 1 and 2 of 4, chunk 64,
top 4 per chunk, NP-Map, attention transfer then LoRA where it pays) distilled on the first 16
windows of the held-out text, and, distilled the same way, at the same mean number of exact
keys per query: a sliding window alone (``feature=none,top_k=0``) and elu+1 linear attention
beside that window (``feature=elu,top_k=0``); and pure linear attention with Hedgehog's feature
map (``feature=hedgehog,top_k=0,exact_window=0``, no exact keys at all). Perplexity on the
last 4 x 1024 tokens (held out); whole-forward time of the dense and the STILL bundles in ONNX
Runtime at each length up to ``--ort-dense-max`` (ORT's dense Attention, kept in the first and
last layers, forms the full N x N map), and time(4L)/time(L) from L = 1024, the model's context.
Prints tables and writes bench-out/long_context.json (and still.json beside it).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
LM = ROOT / "models" / "reference-lm"


def _attention_inputs(program, ids):
    """Every canonical attention's (q, k, v, mask, scale, causal) on one forward."""
    from tokopt.optimizer.ops import ATTENTION
    got = []

    class Grab(torch.fx.Interpreter):
        def run_node(self, node):
            if ATTENTION.matches(node):
                got.append(self.fetch_args_kwargs_from_env(node)[0])
            return super().run_node(node)

    with torch.no_grad():
        Grab(program.unlifted()).run(ids, torch.ones_like(ids))
    return got


def _dense_onnx(heads: int, kv_heads: int, d: int) -> bytes:
    from onnx import TensorProto as T
    from onnx import helper as h
    ins = [h.make_tensor_value_info(n, T.FLOAT, [1, hh, "n", d]) for n, hh in (("q", heads), ("k", kv_heads),
                                                                               ("v", kv_heads))]
    node = h.make_node("Attention", ["q", "k", "v"], ["o"], is_causal=1, scale=d ** -0.5)
    graph = h.make_graph([node], "dense", ins, [h.make_tensor_value_info("o", T.FLOAT, None)])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 23)]).SerializeToString()


def _tca_onnx(path: Path, example, budgets, windows, sinks, obs) -> None:
    from torch.export import Dim
    from tokopt.optimizer.ops import OPSET, onnx_translation_table

    class Op(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.tokopt.tca_attention(q, k, v, None, example[4], True, budgets, windows, sinks, obs)

    dyn = tuple({2: Dim.AUTO} for _ in range(3))
    ep = torch.export.export(Op(), tuple(example[:3]), dynamic_shapes=dyn, strict=False)
    torch.onnx.export(ep, dynamo=True, opset_version=OPSET, optimize=False, input_names=["q", "k", "v"],
                      custom_translation_table=onnx_translation_table()).save(str(path))


def _forward_times(bundles: dict, text_ids, lengths, threads: int, rounds: int = 3, runs: int | None = None) -> dict:
    """Median whole-forward ms of each bundle's model.onnx at each length (interleaved rounds of
    ``runs`` calls each; default 2, 1 past 4096 tokens)."""
    from tokopt.backends.onnxruntime import make_session
    from tokopt.optimizer.report import time_calls
    sessions = {name: make_session(b / "model.onnx", ["CPUExecutionProvider"], threads) for name, b in bundles.items()}
    out = {name: {} for name in bundles}
    for n in lengths:
        ids = text_ids[None, :n].numpy()
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        times = {name: [] for name in sessions}
        for _ in range(rounds):  # a noisy neighbour slows both, not one
            for name, s in sessions.items():
                calls = runs or (2 if n <= 4096 else 1)
                times[name].append(time_calls(lambda: s.run(None, feed), calls, 1)["median_ms"])
        for name in sessions:
            out[name][n] = float(np.median(times[name]))
        print(f"{n:>6} tokens whole forward (ORT, {threads} threads): "
              + ", ".join(f"{name} {out[name][n]:.1f} ms" for name in sessions), flush=True)
    return out


def still_part(args, work: Path, text_ids) -> dict:
    import tokopt
    from tokopt.passes.still import exact_keys
    calib = str(LM / "heldout.txt")
    budget = exact_keys(1024, 64, 4)
    window = min(range(16, 257), key=lambda w: abs(exact_keys(1024, w, 0) - budget))
    variants = {"STILL (NP-Map, top 4 of 64)": "still", "STILL, layers 1-3": "still:layers=1/2/3",
                f"sliding window {window}": f"still:feature=none,top_k=0,chunk={window}",
                f"elu+1 linear + window {window}": f"still:feature=elu,top_k=0,chunk={window}",
                "pure linear (Hedgehog)": "still:feature=hedgehog,top_k=0,exact_window=0"}
    if args.still_layers:  # STILL and the window, converting these layers (the default keeps the first and last dense)
        variants = {f"{name}, layers {args.still_layers}": f"{spec}{',' if ':' in spec else ':'}layers={args.still_layers}"
                    for name, spec in variants.items() if name.startswith(("STILL (", "sliding"))}
    quality, bundles = {}, {}
    for name, spec in variants.items():
        res = tokopt.compile(LM, generate=False, out=work / f"still-{len(quality)}", passes=spec, calib=calib, measure=False,
                             threads=args.threads)
        st = res.program.history[-1]["stats"]
        quality[name] = {k: st.get(k) for k in ("exact_keys_per_query", "perplexity_original", "perplexity_stage1",
                                                "perplexity_stage2", "perplexity_still", "train_seconds",
                                                "passkey_original", "passkey_still", "passkey_logprob_original",
                                                "passkey_logprob_still")}
        quality[name]["stages"] = st["stages"]
        if name.startswith("STILL"):
            bundles[name] = res.bundle
        print(f"  {name:<34} exact keys/query {st['exact_keys_per_query']:6.1f}  perplexity {st['perplexity_still']:.3f} "
              f"({(st['perplexity_still'] / st['perplexity_original'] - 1) * 100:+.2f}% vs {st['perplexity_original']:.3f}; "
              f"stage 1 {st['perplexity_stage1']:.3f}, stage 2 {st.get('perplexity_stage2') or float('nan'):.3f}), "
              f"passkey log-prob {st['passkey_logprob_still']:.2f} (original {st['passkey_logprob_original']:.2f}), "
              f"trained in {st['train_seconds']:.0f} s", flush=True)
    if args.no_forward:
        return {"quality": quality, "equal_budget_window": window}
    bundles = {"dense": tokopt.compile(LM, generate=False, out=work / "still-dense", measure=False, threads=args.threads).bundle,
               **bundles}
    lengths = [n for n in args.lengths if n <= args.ort_dense_max]
    times = _forward_times(bundles, text_ids, lengths, args.threads)
    growth = {}
    if 1024 in lengths and 4096 in lengths:
        growth = {name: t[4096] / t[1024] for name, t in times.items()}
        print("time(4096)/time(1024): " + ", ".join(f"{name} {g:.2f} ({g / growth['dense']:.2f} of dense)"
                                                   for name, g in growth.items()))
    return {"quality": quality, "equal_budget_window": window, "forward_ms": times, "growth_4x": growth}


def decode_part(args, work: Path) -> dict:
    import time

    from transformers import AutoTokenizer

    import tokopt
    from tokopt.optimizer.data import token_windows
    from tokopt.calibration.lm_eval import decode_perplexity
    from tokopt.optimizer.generation import CacheSpec, example_feed

    calib = LM / "heldout.txt"
    tok = AutoTokenizer.from_pretrained(LM, local_files_only=True)
    windows = token_windows(calib, tok, seq_len=1024, count=8)[4:]
    spec = f"tca:tolerance={args.tolerance},eval_windows=0"
    variants = {"dense": None, "tca": spec + ",select=step", "tca, chosen at prefill": spec,
                "tca, full cache": spec + ",compact=false"}
    compiled = {name: tokopt.compile(LM, out=work / f"gen-{i}", generate=True, passes=passes, calib=calib,
                                     measure=False, threads=args.threads)
                for i, (name, passes) in enumerate(variants.items())}
    kv_tca = compiled["tca"].program.history[-1]["stats"]["kv_cache_bytes"]
    # the window whose compacted cache (sinks + window per layer) holds as many bytes as TCA's at 1024
    cache = compiled["tca"].program.cache
    per_entry = sum(cache.entry_bytes(layer) for layer in range(cache.layers))
    window = round(kv_tca["1024"]["compacted"] / per_entry) - 4
    name = f"sinks + window {window}"
    compiled[name] = tokopt.compile(LM, out=work / "gen-window", generate=True, measure=False, threads=args.threads,
                                    passes=f"tca:uniform=0,window={window}")
    rows = {}
    for name, res in compiled.items():
        runner = tokopt.load(res.bundle, threads=args.threads)
        spec_ = CacheSpec.from_json(runner.manifest["generation"]["cache"])
        t = time.perf_counter()
        ppl = decode_perplexity(runner, spec_, windows, args.prompt)   # the runner's own decoding loop
        step_ms = (time.perf_counter() - t) * 1e3 / (len(windows) * (1024 - args.prompt))
        held = spec_.held_bytes(runner(**{k: v.numpy() for k, v in example_feed(spec_, 1, 1024, 0).items()}))
        stats = res.program.history[-1]["stats"] if res.program.history else {}
        at_4k = stats.get("kv_cache_bytes", {}).get("4096", {}).get("compacted", spec_.nbytes(4096))
        rows[name] = {"decode_perplexity": ppl, "ms_per_step": step_ms, "kv_bytes_1024": held, "kv_bytes_4096": at_4k}
    dense = rows["dense"]
    print(f"decode on {len(windows)} held-out windows: prefill {args.prompt} tokens, then {1024 - args.prompt} "
          "teacher-forced decode steps each (ONNX Runtime bundles)")
    print(f"  {'cache':<24}{'perplexity':>11}{'vs dense':>10}{'KV @1K':>10}{'KV @4K':>10}{'ms/step':>9}")
    for name, r in rows.items():
        rel = (r["decode_perplexity"] / dense["decode_perplexity"] - 1) * 100
        print(f"  {name:<24}{r['decode_perplexity']:11.3f}{rel:+9.2f}%"
              f"{r['kv_bytes_1024'] / dense['kv_bytes_1024']:9.2f}x{r['kv_bytes_4096'] / dense['kv_bytes_4096']:9.2f}x"
              f"{r['ms_per_step']:9.2f}")
    return {"prompt": args.prompt, "windows": len(windows), "equal_kv_window": window,
            "budgets": compiled["tca"].program.artifacts["budgets.json"]["heads"], "decode": rows}


def _write(out: Path, args, result: dict) -> None:
    """A part's JSON, with the thread count and the versions it ran on."""
    import onnxruntime as ort
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, **result, "onnxruntime": ort.__version__,
                               "torch": torch.__version__}, indent=1) + "\n")
    print(f"wrote {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["tca", "decode", "still"], choices=["tca", "decode", "still"])
    ap.add_argument("--prompt", type=int, default=768, help="decode part: prefill length; the rest of each 1024-token "
                                                             "window is decoded")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    ap.add_argument("--still-layers", default="", help="STILL part: STILL and the window alone, converting these layers (e.g. 0/1/2/3)")
    ap.add_argument("--no-forward", action="store_true", help="STILL part: quality only, no timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=0.2)
    ap.add_argument("--ort-dense-max", type=int, default=8192,
                    help="longest length for ORT's dense Attention op (it forms the full N x N map)")
    ap.add_argument("--out", default="bench-out/long_context.json")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    from transformers import AutoTokenizer

    import tokopt
    from tokopt.backends.onnxruntime import make_session
    from tokopt.optimizer.data import token_windows
    from tokopt.calibration.lm_eval import perplexity
    from tokopt.optimizer.compile import plan_passes
    from tokopt.optimizer.generation import cache_spec
    from tokopt.optimizer.ops import attention_reference
    from tokopt.optimizer.pass_manager import PassManager, resolve
    from tokopt.optimizer.report import time_calls
    from tokopt.optimizer.ops.tca import tca_reference

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tokopt-long-"))
    if "still" in args.parts:
        tok = AutoTokenizer.from_pretrained(LM, local_files_only=True)
        text_ids = torch.tensor(tok((LM / "heldout.txt").read_text())["input_ids"])
        result = still_part(args, work, text_ids)
        suffix = "-layers-" + args.still_layers.replace("/", "") if args.still_layers else ""
        _write(Path(args.out).with_name(f"still{suffix}.json"), args, result)
    if "decode" in args.parts:
        _write(Path(args.out).with_name("tca-decode.json"), args, decode_part(args, work))
    if "tca" not in args.parts:
        return
    calib = str(LM / "heldout.txt")
    spec = f"tca:tolerance={args.tolerance}"
    res = tokopt.compile(LM, generate=False, out=work / "tca", passes=spec, calib=calib, measure=False, threads=args.threads)
    dense_bundle = tokopt.compile(LM, generate=False, out=work / "dense", measure=False, threads=args.threads)
    stats = res.program.history[-1]["stats"]
    table = res.program.artifacts["budgets.json"]
    sinks, obs = table["sinks"], table["obs"]
    budgets = {}
    for row in table["heads"]:
        budgets.setdefault(row["layer"], []).append((row["window"], row["budget"]))
    cost = stats["mean_keys_per_query"]
    print(f"TCA heads (tolerance {args.tolerance}), (window, budget) per KV head: "
          + "; ".join(f"layer {layer}: {cfg}" for layer, cfg in sorted(budgets.items()))
          + f"; mean keys per query at 1024 tokens {cost:.0f}")

    # --- attention at long context, real activations
    tok = AutoTokenizer.from_pretrained(LM, local_files_only=True)
    text_ids = torch.tensor(tok((LM / "heldout.txt").read_text())["input_ids"])
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(LM, local_files_only=True, attn_implementation="sdpa").eval()
    model.config.max_position_embeddings = max(args.lengths)
    example = {"input_ids": text_ids[None, :16], "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    long_prog = PassManager(resolve(plan_passes())).run(tokopt.capture(model, example))
    rows = []
    for n in args.lengths:
        start = 8192 if len(text_ids) > 8192 + n else 0
        inputs = _attention_inputs(long_prog, text_ids[None, start:start + n])
        t = {"dense_torch": 0.0, "tca_torch": 0.0, "dense_ort": 0.0, "tca_ort": 0.0}
        errors = []
        runs = 5 if n <= 4096 else 2
        for layer, (q, k, v, mask, scale, _) in enumerate(inputs):
            cfg = budgets.get(layer, [(64, 1.0)] * k.shape[1])
            fs, ws = [f for _, f in cfg], [w for w, _ in cfg]
            with torch.no_grad():
                dense = attention_reference(q, k, v, None, scale, True)
                approx = tca_reference(q, k, v, None, scale, True, fs, ws, sinks, obs)
                errors.append(float((approx - dense).norm() / dense.norm()))
                t["dense_torch"] += time_calls(lambda: attention_reference(q, k, v, None, scale, True),
                                               runs, 1)["median_ms"]
                t["tca_torch"] += time_calls(lambda: tca_reference(q, k, v, None, scale, True, fs, ws, sinks, obs),
                                             runs, 1)["median_ms"]
            feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
            path = work / f"tca_{layer}.onnx"
            if not path.exists():
                _tca_onnx(path, (q, k, v, None, scale), fs, ws, sinks, obs)
            s_tca = make_session(path, ["CPUExecutionProvider"], args.threads)
            t["tca_ort"] += time_calls(lambda: s_tca.run(None, feed), runs, 1)["median_ms"]
            if n <= args.ort_dense_max:
                so = ort.SessionOptions()
                so.intra_op_num_threads = args.threads
                s_dense = ort.InferenceSession(_dense_onnx(q.shape[1], k.shape[1], q.shape[-1]), so,
                                               providers=["CPUExecutionProvider"])
                t["dense_ort"] += time_calls(lambda: s_dense.run(None, feed), runs, 1)["median_ms"]
            else:
                t["dense_ort"] = None
        row = {"tokens": n, **t, "tca_rel_error_per_layer": errors,
               "speedup_torch": t["dense_torch"] / t["tca_torch"],
               "speedup_ort": t["dense_ort"] / t["tca_ort"] if t["dense_ort"] else None}
        rows.append(row)
        print(f"{n:>6} tokens  attention ms: dense torch {t['dense_torch']:.1f}, TCA torch {t['tca_torch']:.1f} "
              f"({row['speedup_torch']:.2f}x); dense ORT {t['dense_ort'] or float('nan'):.1f}, TCA ORT "
              f"{t['tca_ort']:.1f} ({(row['speedup_ort'] or float('nan')):.2f}x); error per layer "
              + ", ".join(f"{e:.3f}" for e in errors), flush=True)

    # --- whole forward at full context, ONNX Runtime bundles
    times = _forward_times({"dense": dense_bundle.bundle, "tca": res.bundle}, text_ids, [1024], args.threads,
                           rounds=5, runs=4)
    forward = {name: t[1024] for name, t in times.items()}
    print(f"  TCA {forward['dense'] / forward['tca']:.2f}x faster than dense")

    # --- quality at equal average budget
    windows = token_windows(calib, tok, seq_len=1024, count=8)[4:]
    captured = tokopt.capture(LM)
    uniform = max(cost - 64, 0) / 1024
    variants = {"dense": "canonicalize", "tca": spec,
                f"uniform {uniform:.3f} + window 64": f"tca:uniform={uniform:.4f},window=64",
                f"window {round(cost)}": f"tca:uniform=0,window={round(cost)}"}
    quality = {}
    for name, passes in variants.items():
        prog = PassManager(resolve(plan_passes(passes))).run(captured) if name != "tca" else res.program
        quality[name] = perplexity(prog, windows)
    print("perplexity on held-out windows the calibration did not see (4 x 1024 tokens):")
    for name, ppl in quality.items():
        print(f"  {name:<16} {ppl:8.3f}  ({(ppl / quality['dense'] - 1) * 100:+.2f}%)")
    kv = cache_spec(model, None).nbytes(1024)  # a full cache; --parts decode measures the compacted one
    _write(Path(args.out), args, {"tolerance": args.tolerance, "budgets": budgets, "mean_keys_per_query_1024": cost,
                                  "attention": rows, "forward_1024_ms": forward, "perplexity": quality,
                                  "kv_cache_bytes_per_1k": kv})


if __name__ == "__main__":
    main()
