"""onnxruntime-genai: the peer a generation bundle is timed against, where it is installed.

Its model builder (``python -m onnxruntime_genai.models.builder -i FOLDER -p fp32|int4|int8 -e cpu``)
converts the same Hugging Face folder at the precision of the bundle's weights, and its own
generator is timed on what the report times tokopt on: the first token after a prompt (prefill)
and decode steps after a cache of the report's length. It is a package of its own
(``pip install -e ".[bench]"``); without it the report says so.

``export`` goes the other way: a tokopt generation bundle as a folder genai loads (its
``genai_config.json`` beside the graph), so a genai user runs tokopt's passes on genai's own loop.
"""
from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np

__all__ = ["PEER", "build", "export", "generator", "load", "missing", "precision_of", "step_calls"]

PEER = "onnxruntime-genai"
CONFIG = "genai_config.json"
# a loaded model -> the tokens its generator's cache must hold at least: a sliding-window build's
# window (genai's runtime refuses a smaller cache)
_ROOM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def precision_of(passes: list[dict]) -> str:
    """The builder precision matching a bundle's passes (manifest entries): the weight width of a
    quantizing pass, fp32 otherwise."""
    for p in passes:
        bits = p["options"].get("bits") if p["name"] == "rsq" else p["options"].get("w_bits") \
            if p["name"] == "edgeqat" else None
        if bits in (4, 8):
            return f"int{bits}"
    return "fp32"


def missing() -> str | None:
    """Why genai cannot run here, or None."""
    import importlib.util
    return None if importlib.util.find_spec("onnxruntime_genai") else f"{PEER} is not installed (pip install -e '.[bench]')"


def build(folder: Path, precision: str, out: Path, threads: int | None):
    """onnxruntime-genai's model of ``folder`` built into ``out``, or why there is none (a string)."""
    why = missing()
    if why:
        return why
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
                          "-p", precision, "-e", "cpu"], capture_output=True, text=True)
    if run.returncode != 0:
        lines = (run.stderr or run.stdout).strip().splitlines() or ["no output"]
        return f"{PEER} {precision}: its model builder failed: {lines[-1][:200]}"
    return load(out, threads)


def load(folder: Path, threads: int | None):
    """genai's model of a folder it loads (its builder's or ``export``'s), on ``threads`` threads."""
    import onnxruntime_genai as og
    config = json.loads((folder / CONFIG).read_text())
    if threads:
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        (folder / CONFIG).write_text(json.dumps(config, indent=1))
    model = og.Model(str(folder))
    window = (config["model"]["decoder"].get("sliding_window") or {}).get("window_size") or 0
    if window > 0:
        _ROOM[model] = int(window)
    return model


def generator(model, ids: np.ndarray, total: int, speculative: dict | None = None):
    """A greedy generator that has read ``ids`` and runs to at least ``total`` tokens: exactly that
    many, but where a sliding-window build's cache must hold its window, to the window (the caller
    stops at ``total``); ``speculative``: its speculative decoding options (``ngram_size``,
    ``max_draft_tokens``: n-gram lookup in the tokens so far, the peer of
    ``runner.generate(prompt_lookup=K)``)."""
    import onnxruntime_genai as og
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(total, _ROOM.get(model, 0)), min_length=total, do_sample=False)
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
            if state.get("left", 0) == 0:
                state["gen"] = generator(model, prompt, past + steps)
                state["gen"].generate_next_token()   # the prompt's own token: the steps after it decode
                state["left"] = steps - 1
            state["gen"].generate_next_token()
            state["left"] -= 1
        return step
    return call


def export(bundle, out, force: bool = False) -> Path:
    """``bundle`` (a generation bundle lowered onto ONNX Runtime's GroupQueryAttention, its cache
    in shared buffers) written to ``out`` as a folder onnxruntime-genai loads: the same graph but
    for the logits, which genai reads at every prompt position of the prefill (the bundle's graph
    gathers the positions its runner asks for, ``logits_index``) and for the rows' lengths, which it
    computes from the mask genai feeds (see ``lengths.py``), ``genai_config.json`` naming
    the graph's inputs and outputs, and the tokenizer's files beside them."""
    import shutil

    import onnx

    from ..optimizer.bundle import atomic_bundle
    from ..optimizer.errors import UsageError
    from ..optimizer.generation import LOGITS_INDEX, CacheSpec
    from ..optimizer.runtime import read_manifest
    from .lengths import LENGTHS
    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle)
    gen = manifest.get("generation") or {}
    cache = CacheSpec.from_json(gen["cache"]) if gen.get("cache") else None
    why = ("it is not a generation bundle (compile a causal LM without --no-generate)" if cache is None else
           f"its backend is {manifest['backend']} (genai runs ONNX Runtime graphs)" if manifest["backend"] != "onnxruntime"
           else "its cache is not in shared buffers on GroupQueryAttention (a target with ONNX Runtime's contrib "
                "ops, e.g. cpu, lowers it so)" if not gen.get("shared_buffer") else
           "tca compacts its cache in tokopt's runner, which genai's generator does not do" if cache.index or cache.keeps
           else None)
    if why:
        raise UsageError(f"{bundle} cannot be exported for {PEER}: {why}.")
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    graph = model.graph
    uses = {}
    for node in graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    index = [n for n in graph.input if n.name == LOGITS_INDEX]
    if index:   # logits_index -> (Reshape ->) Gather(hidden, index, axis=1): the chain goes
        chain = [uses[LOGITS_INDEX][0]]
        while chain[-1].op_type != "Gather":
            chain.append(uses[chain[-1].output[0]][0])
        gather = chain[-1]
        for user in uses.get(gather.output[0], []):
            user.input[:] = [gather.input[0] if x == gather.output[0] else x for x in user.input]
        for node in chain:
            graph.node.remove(node)
        graph.input.remove(index[0])
    if any(i.name == LENGTHS[0] for i in graph.input):
        _lengths_from_mask(graph)
    gqa = next(n for n in graph.node if n.op_type == "GroupQueryAttention")
    heads = next(a.i for a in gqa.attribute if a.name == "num_heads")
    source = manifest.get("source", {})
    kind = source.get("class", "").replace("ForCausalLM", "").lower() or "llama"
    context = cache.max_length or 4096
    local = [i for i, w in enumerate(cache.windows) if w]
    if len({cache.windows[i] for i in local}) > 1:
        raise UsageError(f"{bundle} cannot be exported for {PEER}: its layers' sliding windows differ "
                         f"({sorted({cache.windows[i] for i in local})}), and genai's config takes one.")
    config = {"model": {
        "context_length": context,
        "decoder": {"session_options": {"log_id": PEER, "provider_options": []}, "filename": "model.onnx",
                    "head_size": cache.head_dim[0], "hidden_size": heads * cache.head_dim[0],
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                               "past_key_names": "past_key_%d", "past_value_names": "past_value_%d"},
                    "outputs": {"logits": "logits", "present_key_names": "present_key_%d",
                                "present_value_names": "present_value_%d"},
                    "num_attention_heads": heads, "num_hidden_layers": cache.layers,
                    "num_key_value_heads": cache.kv_heads[0],
                    # its runtime sizes these layers' buffers to the window, as for its own builds
                    **({"sliding_window": {"window_size": cache.windows[local[0]], "slide_key_value_cache": False,
                                           "slide_inputs": False, "layers": local, "cache_slack": 0}}
                       if local else {})},
        "eos_token_id": list(cache.eos_token_ids) if len(cache.eos_token_ids) > 1 else
        (cache.eos_token_ids[0] if cache.eos_token_ids else 0),
        "pad_token_id": cache.pad_token_id, "type": kind, "vocab_size": cache.vocab_size},
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "past_present_share_buffer": True, "top_k": 1, "top_p": 1.0, "temperature": 1.0}}
    with atomic_bundle(out, force) as tmp:
        for f in bundle.iterdir():   # the weights' external data, where the graph has it, under its own name
            if f.is_file() and f.name.startswith("model.onnx") and f.name != "model.onnx":
                shutil.copy2(f, tmp / f.name)
        onnx.save(model, str(tmp / "model.onnx"))
        for f in (bundle / (manifest.get("tokenizer") or "tokenizer")).glob("*"):
            shutil.copy2(f, tmp / f.name)
        (tmp / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return out


def _lengths_from_mask(graph) -> None:
    """The graph's lengths inputs (see ``lengths.py``) computed from an ``attention_mask`` input in
    their place, as genai's own builds compute them: its runtime feeds the mask."""
    from onnx import TensorProto, helper

    from .lengths import LENGTHS, NEW_TOKENS
    at = next(i for i, v in enumerate(graph.input) if v.name == LENGTHS[0])
    batch = graph.input[at].type.tensor_type.shape.dim[0]
    windowed = any(v.name == NEW_TOKENS for v in graph.input)
    for name in (*LENGTHS, *([NEW_TOKENS] if windowed else [])):
        graph.input.remove(next(v for v in graph.input if v.name == name))
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [None, "total_sequence_length"])
    mask.type.tensor_type.shape.dim[0].CopyFrom(batch)
    graph.input.insert(at, mask)
    one = helper.make_tensor("tokopt_one", TensorProto.INT64, [1], [1])
    graph.initializer.append(one)
    nodes = [helper.make_node("ReduceSum", ["attention_mask", "tokopt_one"], ["tokopt_lengths"], keepdims=0),
             helper.make_node("Sub", ["tokopt_lengths", "tokopt_one"], ["tokopt_seqlens"]),
             helper.make_node("Cast", ["tokopt_seqlens"], [LENGTHS[0]], to=TensorProto.INT32),
             helper.make_node("Shape", ["attention_mask"], ["tokopt_width"], start=1, end=2),
             helper.make_node("Squeeze", ["tokopt_width"], ["tokopt_total"]),
             helper.make_node("Cast", ["tokopt_total"], [LENGTHS[1]], to=TensorProto.INT32)]
    if windowed:   # each row's new tokens: min(its length, the call's tokens)
        nodes += [helper.make_node("Shape", ["input_ids"], ["tokopt_new"], start=1, end=2),
                  helper.make_node("Min", ["tokopt_lengths", "tokopt_new"], ["tokopt_query"]),
                  helper.make_node("Cast", ["tokopt_query"], [NEW_TOKENS], to=TensorProto.INT32)]
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
