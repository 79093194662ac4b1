"""``tokopt verify BUNDLE [--emulate]``: does a bundle compute what it should, where it will run?

The bundle is run here on a few of the shipped evaluation passages (a prefill into an empty cache
for a generation bundle) and compared with the original model, re-captured from the source the
manifest names where it is still on disk. With ``emulate``, an ARM bundle is also run on ARM code
(``backends/emulate.py``: the aarch64 ONNX Runtime under qemu) and compared with the run here: the
same graph on the other CPU's kernels must agree, to ``allclose(rtol=1e-3, atol=1e-4)`` for a
graph without rounding ops, and for one with them (int8 activations: float noise between kernels
may flip a rounding step) to a mean error within 2% of the mean magnitude and a cosine of at least
0.999 per output.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import TokoptError, UsageError

__all__ = ["verify", "format_verification", "agreement"]

_TEXT_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}


def agreement(ours: list[np.ndarray], theirs: list[np.ndarray], names: list[str], rounding: bool) -> tuple[bool, dict]:
    """(whether ``theirs`` reproduces ``ours``, per output: max/mean abs error and cosine)."""
    ok, stats = True, {}
    for name, a, b in zip(names, ours, theirs):
        if a.shape != b.shape or a.dtype.kind != "f":
            if a.shape != b.shape:
                ok, stats[name] = False, {"shape": [list(a.shape), list(b.shape)]}
            continue
        err = np.abs(a.astype(np.float64) - b)
        x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        cos = float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-30))
        stats[name] = {"max_abs_error": float(err.max(initial=0)), "mean_abs_error": float(err.mean()) if err.size else 0.0,
                       "cosine": cos}
        good = (err.mean() <= 0.02 * np.abs(a).mean() + 1e-6 and cos >= 0.999) if rounding else \
            np.allclose(a, b, rtol=1e-3, atol=1e-4)
        ok = ok and bool(good)
    return ok, stats


def _feeds(runner, texts: list[str]) -> tuple[list[dict], str]:
    """Feeds a bundle takes: two passages (one for a generation bundle), at most 64 tokens."""
    names = set(runner.inputs)
    gen = runner.manifest.get("generation")
    if not gen and not names <= _TEXT_INPUTS:
        raise UsageError(f"verify feeds text, and this bundle takes {', '.join(sorted(names - _TEXT_INPUTS))}.")
    tok = runner.tokenizer(padding_side="left" if gen else "right")
    rows = texts[:1] if gen else texts[:2]
    enc = tok(rows, return_tensors="np", padding=True, truncation=True, max_length=64)
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(ids)
    if "position_ids" in names:
        feed["position_ids"] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    if gen:
        feed.update({k: v.numpy() for k, v in runner.cache_spec().empty(ids.shape[0]).items()})
    return [feed], f"{len(rows)} shipped evaluation passage(s), {ids.shape[1]} tokens" + \
        (", prefill into an empty cache" if gen else "")


def _original(manifest: dict, feeds: list[dict]) -> tuple[list[list[np.ndarray]] | None, str | None]:
    """The original model's outputs on ``feeds``, or (None, why not)."""
    import torch

    from .capture import capture
    path = manifest["source"].get("path")
    if not path or not Path(path).exists():
        return None, "the source model is not on disk here (the manifest names none, or it moved)"
    try:
        program = capture(path, generate=bool(manifest.get("generation")),
                          attn_implementation=manifest["source"].get("attn_implementation", "sdpa"))
    except TokoptError as e:
        return None, f"the source could not be captured again: {e}"
    outs = []
    for feed in feeds:
        got = program.run({k: torch.from_numpy(v) for k, v in feed.items() if k in program.input_names})
        outs.append([got[n].numpy() for n in program.output_names])
    return outs, None


def verify(bundle, *, emulate: bool = False, texts: list[str] | None = None) -> dict:
    """Run ``bundle`` here (and on emulated ARM code with ``emulate``) and compare; see the module
    docstring. Returns a dict with "ok" (the emulated run agrees, where there is one)."""
    from ..backends.targets import get_target
    from .data import default_texts
    from .runtime import load
    path = Path(bundle)
    runner = load(path)
    manifest = runner.manifest
    target = get_target(manifest["target"])
    if emulate and target.arch != "aarch64":
        raise UsageError(f"--emulate runs ARM bundles on ARM code; this one is for {target.name}, which "
                         f"{'runs on this machine as it is' if target.arch == 'x86_64' else 'is not an ARM CPU target'}.")
    if emulate and manifest["backend"] != "onnxruntime":
        raise UsageError(f"--emulate runs ONNX Runtime bundles; this one is for {manifest['backend']}.")
    feeds, desc = _feeds(runner, texts or default_texts("eval"))
    feeds = [runner._feed(f) for f in feeds]
    names = runner.output_names
    here = [runner._run(f) for f in feeds]
    result = {"bundle": str(path), "target": target.name, "feeds": desc, "outputs": names, "ok": True}
    original, why = _original(manifest, feeds)
    if original is None:
        result["original"] = {"skipped": why}
    else:
        # outputs a pass reshapes (pruned tokens) are left out
        keep = [i for i, (a, b) in enumerate(zip(original[0], here[0])) if a.shape == b.shape]
        _, stats = agreement([original[0][i] for i in keep], [here[0][i] for i in keep], [names[i] for i in keep],
                             rounding=True)
        result["original"] = {"vs_bundle_here": stats}
    if emulate:
        from ..backends import emulate as emu
        from ..backends.onnxruntime import bundle_model
        outs, info = emu.run(path / bundle_model(manifest), feeds)
        rounding = manifest.get("rounding", True)
        ok, stats = agreement(here[0], outs[0], names, rounding)
        result["emulated"] = {"info": info, "vs_bundle_here": stats, "agrees": ok,
                              "criterion": "mean error <= 2% of the mean magnitude, cosine >= 0.999" if rounding
                              else "allclose(rtol=1e-3, atol=1e-4)"}
        result["ok"] = ok
    return result


def format_verification(r: dict) -> str:
    lines = [f"tokopt verify  {r['bundle']}  ({r['target']}; {r['feeds']})"]

    def table(title: str, stats: dict) -> None:
        lines.append(title)
        for name, s in stats.items():
            lines.append(f"  {name:<24}" + (f"shapes differ {s['shape']}" if "shape" in s else
                                            f"max abs {s['max_abs_error']:.3g}  mean abs {s['mean_abs_error']:.3g}  "
                                            f"cosine {s['cosine']:.6f}"))
    o = r["original"]
    if "skipped" in o:
        lines.append(f"original model: not compared ({o['skipped']})")
    else:
        table("bundle here vs the original model:", o["vs_bundle_here"])
    e = r.get("emulated")
    if e:
        i = e["info"]
        table(f"emulated {i['machine']} (qemu, ONNX Runtime {i['onnxruntime']}) vs the bundle here: "
              f"{'agrees' if e['agrees'] else 'DISAGREES'} ({e['criterion']})", e["vs_bundle_here"])
        lines.append("  kernels run on ARM: " + ", ".join(f"{k} x{v}" for k, v in i["kernels"].items()))
        lines.append(f"  load {i['load_s']:.1f} s, run {i['run_s']:.1f} s under emulation (not the device's speed)")
    return "\n".join(lines)
