"""onnxruntime-genai: the peer a generation bundle is timed against, where it is installed.

Its model builder (``python -m onnxruntime_genai.models.builder -i FOLDER -p fp32|int4|int8 -e cpu``)
converts the same Hugging Face folder at the precision of the bundle's weights, and its own
generator is timed on what the report times tokopt on: the first token after a prompt (prefill)
and decode steps after a cache of the report's length. It is a package of its own
(``pip install -e ".[bench]"``); without it the report says so.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

__all__ = ["PEER", "build", "generator", "precision_of", "step_calls"]

PEER = "onnxruntime-genai"


def precision_of(passes: list[dict]) -> str:
    """The builder precision matching a bundle's passes (manifest entries): the weight width of a
    quantizing pass, fp32 otherwise."""
    for p in passes:
        bits = p["options"].get("bits") if p["name"] == "rsq" else p["options"].get("w_bits") \
            if p["name"] == "edgeqat" else None
        if bits in (4, 8):
            return f"int{bits}"
    return "fp32"


def build(folder: Path, precision: str, out: Path, threads: int | None):
    """onnxruntime-genai's model of ``folder`` built into ``out``, or why there is none (a string)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return f"{PEER} is not installed (pip install -e '.[bench]')"
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
                          "-p", precision, "-e", "cpu"], capture_output=True, text=True)
    if run.returncode != 0:
        lines = (run.stderr or run.stdout).strip().splitlines() or ["no output"]
        return f"{PEER} {precision}: its model builder failed: {lines[-1][:200]}"
    if threads:
        config = json.loads((out / "genai_config.json").read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        (out / "genai_config.json").write_text(json.dumps(config, indent=1))
    return og.Model(str(out))


def generator(model, ids: np.ndarray, total: int, speculative: dict | None = None):
    """A greedy generator that has read ``ids`` and runs to exactly ``total`` tokens;
    ``speculative``: its speculative decoding options (``ngram_size``, ``max_draft_tokens``: n-gram
    lookup in the tokens so far, the peer of ``runner.generate(prompt_lookup=K)``)."""
    import onnxruntime_genai as og
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    if speculative:
        params.set_speculative_options(**speculative)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.astype(np.int32))
    return gen


def step_calls(model, vocab: int, context: int | None, headroom: int = 64):
    """``call(feed) -> zero-argument call`` over the report's feeds, or None where the peer cannot
    take the feed within its ``context`` (it must have room for the token it picks): a prompt
    without a cache is timed as its first token (prefill, then the pick); a feed after a cache of
    P tokens as one decode step of a generator that has read P tokens (each call the next step:
    P, P+1, ...; a fresh generator every ``headroom`` steps, the first call after it its warm-up)."""
    rng = np.random.default_rng(0)
    room = context if context is not None else 2**31

    def call(feed):
        new = feed["input_ids"].shape[1]
        past = feed["attention_mask"].shape[1] - new
        if past == 0:
            if new + 1 > room:
                return None
            ids = feed["input_ids"][:1]

            def first():
                generator(model, ids, new + 1).generate_next_token()
            return first
        steps = min(headroom, room - past)
        if steps < 2:
            return None
        prompt = rng.integers(10, vocab, (1, past))
        state = {}

        def step():
            gen = state.get("gen")
            if gen is None or gen.is_done():
                gen = state["gen"] = generator(model, prompt, past + steps)
                gen.generate_next_token()   # the prompt's own token: the steps after it decode
            gen.generate_next_token()
        return step
    return call
