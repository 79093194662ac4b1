"""What a compile of a deployment-sized model costs: wall time and peak resident memory per stage
against the checkpoint's size.

    python benchmarks/scale.py [--sizes 0.5B 1.1B 3B] [--recipes none rsq:bits=4] [--work DIR]

Config-built Llama-family models with random weights (Qwen2.5-0.5B's shape, TinyLlama-1.1B's,
Llama-3.2-3B's, Llama-3-8B's; ``3B-bf16``/``8B-bf16`` are saved in bfloat16), written once under
``--work`` and reused (calibrating passes read random token ids: memory and time, not quality). Each recipe is compiled by ``tokopt compile`` in its own process (so one
compile's memory is not the next one's), as a user runs it; the stages come from the bundle's
report (its per-stage high-water marks), the whole process's peak the largest of them and the
kernel's (``wait4``; the per-stage reset resets it too).
A compile that fails (refused as too large, out of memory) is a row saying so. Prints a table;
writes bench-out/scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# hidden, layers, intermediate, heads, kv heads, vocab, tied embeddings
SHAPES = {"0.5B": (896, 24, 4864, 14, 2, 151936, True), "1.1B": (2048, 22, 5632, 32, 4, 32000, False),
          "3B": (3072, 28, 8192, 24, 8, 128256, True), "8B": (4096, 32, 14336, 32, 8, 128256, False)}


def build(size: str, work: Path) -> Path:
    """The config-built model's folder (written on first use)."""
    import torch
    import transformers
    shape, _, dtype = size.partition("-")
    folder = work / f"llama-{size}"
    if (folder / "config.json").exists():
        return folder
    hidden, layers, inter, heads, kv, vocab, tied = SHAPES[shape]
    dtype = {"": torch.float32, "bf16": torch.bfloat16}[dtype]
    config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                      tie_word_embeddings=tied, max_position_embeddings=4096, dtype=dtype)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # built in its dtype: an 8B model never exists in fp32 here
    try:
        model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    return folder


def _checkpoint(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _calibration_ids(folder: Path) -> Path:
    """Random token ids for the calibrating passes (random weights: the calibration proves the
    memory and time, not the quality)."""
    import numpy as np
    path = folder / "calib-ids.npy"
    if not path.exists():
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        np.save(path, np.random.default_rng(0).integers(10, vocab, 40_000))
    return path


def run(folder: Path, recipe: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tokopt.cli", "compile", str(folder), "--out", str(out), "--force", *extra]
    if recipe != "none":
        cmd += ["--passes", recipe, "--calib", str(_calibration_ids(folder))]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    row = {"recipe": recipe, "seconds": round(time.perf_counter() - started, 1),
           "peak_rss_bytes": usage.ru_maxrss * 1024, "exit": os.waitstatus_to_exitcode(status)}
    if row["exit"] != 0:
        row["error"] = next((line for line in text.splitlines() if line.startswith("tokopt: error")),
                            text.strip().splitlines()[-1] if text.strip() else "killed")
        return row
    report = json.loads((out / "report.json").read_text())
    row["stages"] = report["stages"]["rows"]
    # the report resets the kernel's high-water mark per stage, which wait4's figure is too
    row["peak_rss_bytes"] = max([row["peak_rss_bytes"], *(st["peak_rss_bytes"] for st in row["stages"])])
    row["bundle_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model."))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["0.5B", "1.1B", "3B"])
    ap.add_argument("--recipes", nargs="+", default=["none", "rsq:bits=4"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/tokopt-scale"), help="where the models and bundles go")
    ap.add_argument("--extra", default="--bench-runs 5", help="more tokopt compile options")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "scale.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        folder = build(size, args.work)
        ckpt = _checkpoint(folder)
        for recipe in args.recipes:
            row = {"model": size, "checkpoint_bytes": ckpt,
                   **run(folder, recipe, args.work / f"bundle-{size}", args.extra.split())}
            rows.append(row)
            _print(row)
            args.out.parent.mkdir(exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1) + "\n")


def _print(row: dict) -> None:
    ckpt = row["checkpoint_bytes"]
    head = (f"{row['model']:>8} {row['recipe']:<14} checkpoint {ckpt / 2**30:5.2f} GiB  total {row['seconds']:7.1f} s  "
            f"peak {row['peak_rss_bytes'] / 2**30:6.2f} GiB = {row['peak_rss_bytes'] / ckpt:4.2f}x checkpoint")
    print(head if row["exit"] == 0 else f"{head}  FAILED: {row['error']}")
    for st in row.get("stages", []):
        print(f"{'':>24}{st['stage']:<22}{st['seconds']:8.1f} s {st['peak_rss_bytes'] / 2**30:7.2f} GiB "
              f"{st['peak_rss_bytes'] / ckpt:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
