"""``tokopt verify BUNDLE [--emulate]``: does a bundle compute what it should, where it will run?

The bundle is run here on a few of the shipped evaluation passages (a prefill into an empty cache
for a generation bundle) and compared with the original model, re-captured from the source the
manifest names where it is still on disk. With ``emulate``, an ARM bundle is also run on ARM code
(``backends/emulate.py``: the aarch64 ONNX Runtime under qemu). It passes when:
- a graph without rounding ops: the ARM outputs equal the ones here to ``allclose(rtol=1e-3,
  atol=1e-4)`` (the same graph on the other CPU's kernels);
- a graph with rounding ops (int8 activations, where float noise between kernels flips rounding
  steps and the flips compound over layers): the ARM outputs are as faithful to the original model
  as the ones here, per output a mean error at most 1.5x theirs and a cosine at most 0.001 below;
  without the original, within 2% mean error of the outputs here and a cosine of 0.999.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..optimizer.errors import TokoptError, UsageError

__all__ = ["verify", "format_verification", "compare"]

_TEXT_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}


def compare(ours: list[np.ndarray], theirs: list[np.ndarray], names: list[str]) -> dict:
    """Per output of the same shape and a float dtype: max/mean abs error and cosine."""
    stats = {}
    for name, a, b in zip(names, ours, theirs):
        if a.shape != b.shape or a.dtype.kind != "f":
            continue
        err = np.abs(a.astype(np.float64) - b)
        x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        stats[name] = {"max_abs_error": float(err.max(initial=0)), "mean_abs_error": float(err.mean()) if err.size else 0.0,
                       "cosine": float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-30)),
                       "allclose": bool(np.allclose(a, b, rtol=1e-3, atol=1e-4)),
                       "mean_magnitude": float(np.abs(a).mean()) if a.size else 0.0}
    return stats


def _emulation_agrees(vs_here: dict, vs_original: dict | None, here_vs_original: dict | None, rounding: bool) -> bool:
    if not rounding:
        return all(s["allclose"] for s in vs_here.values())
    for name, s in vs_here.items():
        if vs_original and here_vs_original and name in vs_original and name in here_vs_original:
            o, h = vs_original[name], here_vs_original[name]
            if o["mean_abs_error"] > 1.5 * h["mean_abs_error"] + 1e-6 or o["cosine"] < h["cosine"] - 1e-3:
                return False
        elif s["mean_abs_error"] > 0.02 * s["mean_magnitude"] + 1e-6 or s["cosine"] < 0.999:
            return False
    return True


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
    from ..optimizer.capture import capture
    from .onnxruntime import program_reference
    path = manifest["source"].get("path")
    if not path or not Path(path).exists():
        return None, "the source model is not on disk here (the manifest names none, or it moved)"
    try:
        program = capture(path, generate=bool(manifest.get("generation")),
                          attn_implementation=manifest["source"].get("attn_implementation", "sdpa"))
    except TokoptError as e:
        return None, f"the source could not be captured again: {e}"
    reference = program_reference(program)
    return [reference(feed) for feed in feeds], None


def verify(bundle, *, emulate: bool = False, texts: list[str] | None = None) -> dict:
    """Run ``bundle`` here (and on emulated ARM code with ``emulate``) and compare; see the module
    docstring. Returns a dict with "ok" (the emulated run agrees, where there is one)."""
    from ..optimizer.data import default_texts
    from ..optimizer.runtime import load
    from .targets import get_target
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
    here_vs_original = None
    if original is None:
        result["original"] = {"skipped": why}
    else:   # outputs a pass reshapes (pruned tokens) are left out
        here_vs_original = compare(original[0], here[0], names)
        result["original"] = {"vs_bundle_here": here_vs_original}
    if emulate:
        from . import emulate as emu
        from .onnxruntime import bundle_model
        outs, info = emu.run(path / bundle_model(manifest), feeds)
        rounding = manifest.get("rounding", True)
        vs_here = compare(here[0], outs[0], names)
        vs_original = compare(original[0], outs[0], names) if original is not None else None
        ok = _emulation_agrees(vs_here, vs_original, here_vs_original, rounding)
        result["emulated"] = {"info": info, "vs_bundle_here": vs_here, "vs_original": vs_original, "agrees": ok,
                              "criterion": "allclose(rtol=1e-3, atol=1e-4) to the bundle here" if not rounding else
                              "as faithful to the original as the bundle here: mean error <= 1.5x, cosine within 0.001"
                              if vs_original else "mean error <= 2% of the mean magnitude, cosine >= 0.999"}
        result["ok"] = ok
    return result


def format_verification(r: dict) -> str:
    lines = [f"tokopt verify  {r['bundle']}  ({r['target']}; {r['feeds']})"]

    def table(title: str, stats: dict) -> None:
        lines.append(title)
        for name, s in stats.items():
            lines.append(f"  {name:<24}max abs {s['max_abs_error']:.3g}  mean abs {s['mean_abs_error']:.3g}  "
                         f"cosine {s['cosine']:.6f}")
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
        if e["vs_original"]:
            table("emulated vs the original model:", e["vs_original"])
        lines.append("  kernels run on ARM: " + ", ".join(f"{k} x{v}" for k, v in i["kernels"].items()))
        lines.append(f"  load {i['load_s']:.1f} s, run {i['run_s']:.1f} s under emulation (not the device's speed)")
    return "\n".join(lines)
