"""Generation bundles: one prefill/decode graph with an explicit KV cache, decoded by the runner.

Proof: greedy decoding from the ONNX Runtime bundle equals transformers' ``generate`` token for
token (64 tokens; EOS disabled so every token is compared), for every decoder family the tests
build, batched with left padding, and for the shipped reference LM through the CLI.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import tokopt
from tokopt.cli import main
from tokopt.optimizer.errors import UsageError
from tokopt.optimizer.generation import _pick, example_feed, generate_ids

from .conftest import REFERENCE_LM, _tiny

DECODERS = ("llama", "gpt2", "qwen2", "mistral", "phi", "gemma")


def _no_eos(model):
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def llama_bundle(tmp_path_factory):
    model = _no_eos(_tiny("llama").eval())
    res = tokopt.compile(model, out=tmp_path_factory.mktemp("gen") / "llama", generate=True, measure=False)
    return model, res


def _hf_greedy(model, ids, mask=None, n=64):
    with torch.no_grad():
        return model.generate(torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
                              max_new_tokens=n, do_sample=False, pad_token_id=0).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("family", DECODERS)
def test_greedy_equals_transformers(family, tmp_path):
    model = _no_eos(_tiny(family).eval())
    res = tokopt.compile(model, out=tmp_path / "b", generate=True, measure=False)
    ids = np.random.default_rng(3).integers(10, 256, (1, 9))
    got = tokopt.load(res.bundle).generate(input_ids=ids, max_new_tokens=64)
    assert got.shape == (1, 73)
    np.testing.assert_array_equal(got, _hf_greedy(model, ids))


def test_batched_left_padding_equals_transformers(llama_bundle):
    model, res = llama_bundle
    ids = np.random.default_rng(4).integers(10, 256, (3, 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    got = tokopt.load(res.bundle).generate(input_ids=ids, attention_mask=mask, max_new_tokens=24)
    np.testing.assert_array_equal(got, _hf_greedy(model, ids, mask, n=24))
    mask[2, :10] = 0   # a one-token row: the prompt's logits rows are 0 and 10, the steps' row 0
    got = tokopt.load(res.bundle).generate(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    np.testing.assert_array_equal(got, _hf_greedy(model, ids, mask, n=8))


def test_graph_structure(llama_bundle, tmp_path):
    """One graph, both modes: cache in, cache out, each layer's attention one GroupQueryAttention
    (RoPE fused, q/k/v one packed projection, no concatenation of the cache left), the norms fused
    without the optional outputs nothing reads (mean, inverse deviation); present length
    is past + new at prefill (empty cache), decode (one token) and a one-row chunk after a cache;
    a batch's chunk after a cache is refused by name (the kernel's limit)."""
    _, res = llama_bundle
    prog, spec = res.program, res.program.cache
    assert prog.input_names == ["input_ids", "attention_mask", "position_ids", "logits_index", *spec.input_names]
    assert prog.output_names == ["logits", *spec.output_names] and spec.layers == 2
    assert list(res.manifest["generation"]["cache"]["kv_heads"]) == [2, 2] and spec.eos_token_ids == ()
    assert res.manifest["lowering"]["decoder"] == {"cached_attention": [0, 1], "padding_side": "right"}
    gen = res.manifest["generation"]
    assert gen["shared_buffer"] and gen["one_row_chunks"] and gen["padding_side"] == "right"
    outs = {o["name"]: o["shape"] for o in res.manifest["outputs"]}
    assert outs["present_key_1"] == ["batch", 2, "past_sequence + sequence", 16]
    graph = onnx.load(str(res.bundle / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "Attention" not in ops
    # rows right-padded, no bias built or fed (genai's layout); each row's length (seqlens_k, the
    # mask's sum - 1) and the mask's width are the graph's inputs: no node computes them at a step
    assert [i.name for i in graph.input][:3] == ["input_ids", "seqlens_k", "total_sequence_length"]
    assert not {"ReduceSum", "Shape", "Where", "Greater"} & set(ops)
    assert res.manifest["lowering"]["lengths_inputs"] == 2
    assert all(len(n.input) < 11 or n.input[10] == "" for n in graph.node if n.op_type == "GroupQueryAttention")
    assert not [n for n in graph.node if n.op_type == "Concat" and any(i.startswith("past_") for i in n.input)]
    assert ops.count("MatMul") == 2 * 4 + 1  # per layer q/k/v packed, o, gate/up fused, down; the LM head
    norms = [n for n in graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert len(norms) == 2 * 2 and [len(n.output) for n in norms] == [4, 4, 4, 1], [n.output for n in norms]
    assert all(n.output[1] == n.output[2] == "" and n.output[3] for n in norms[:-1])
    run = tokopt.load(res.bundle)
    for batch, seq, past in ((1, 6, 0), (2, 1, 13), (1, 4, 5)):
        feed = {k: v.numpy() for k, v in example_feed(spec, batch, seq, past, seed=5).items()}
        got = run(**feed)
        ref = prog.run({k: torch.from_numpy(v) for k, v in feed.items()})
        assert got["logits"].shape == (batch, 1, 256)
        assert got["present_value_0"].shape == (batch, 2, past + seq, 16)
        assert np.abs(got["logits"] - ref["logits"].numpy()).max() < 1e-4  # float32 kernels differ
        assert np.abs(got["present_key_1"] - ref["present_key_1"].numpy()).max() < 1e-4
    with pytest.raises(UsageError, match="several new tokens after a cache for one row at a time"):
        run(**{k: v.numpy() for k, v in example_feed(spec, 3, 4, 5).items()})


def test_decoding_writes_the_cache_in_place(llama_bundle):
    """The runner's decoding binds one buffer per layer as past and present: after prefill and
    decode steps the graph's present outputs are those buffers (nothing copied), and the tokens
    equal a decode that feeds the cache back as plain arrays."""
    from tokopt.optimizer.generation import FeedDecoding
    run = tokopt.load(llama_bundle[1].bundle)
    ids = np.random.default_rng(6).integers(10, 256, (2, 7))
    mask, pos = np.ones_like(ids), np.arange(7)[None].repeat(2, 0)
    bound, plain = run.decoding(2, 12), FeedDecoding(lambda feed: run(**feed), run.cache_spec())
    for step in range(4):
        a, b = bound(ids, mask, pos), plain(ids, mask, pos)
        assert np.abs(a - b).max() < 1e-4
        outputs = bound.io.get_outputs()
        assert [o.data_ptr() for o in outputs] == [buf.data_ptr() for buf in bound.buffers]  # logits too
        ids, pos = a.argmax(-1)[:, None], pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    # the graph reads each row's length and the mask's width (no mask), from two buffers bound once
    # that each step writes (the last step's mask was 10 wide)
    assert bound.stepping and bound.lengths and bound.wide_mask is None
    assert bound.seqlens.tolist() == [mask.shape[1] - 2] * 2 and int(bound.total) == mask.shape[1] - 1
    bound(ids, mask, pos)  # 11 tokens
    full = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    bound(ids, full, pos + 1)  # 12: the buffer is full
    with pytest.raises(UsageError, match="the cache holds 12 tokens and this step would make it 13"):
        bound(ids, np.concatenate([full, np.ones((2, 1), np.int64)], 1), pos + 2)


def test_a_graph_that_reads_the_mask_decodes_the_same(llama_bundle, tmp_path):
    """A generation graph that computes the kernel's lengths from the mask (a bundle compiled
    before they were inputs; the graph genai export writes) decodes the same tokens through the
    runner, which then binds the mask at full capacity and marks a column a step: greedy (the
    decoding's own loop), a left-padded batch and prompt lookup."""
    import shutil

    from tokopt.backends.genai import _lengths_from_mask
    from tokopt.optimizer.bundle import file_sha256
    bundle = llama_bundle[1].bundle
    shutil.copytree(bundle, tmp_path / "mask")
    model = onnx.load(str(tmp_path / "mask" / "model.onnx"))
    _lengths_from_mask(model.graph)
    onnx.save(model, str(tmp_path / "mask" / "model.onnx"))
    manifest = json.loads((tmp_path / "mask" / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = file_sha256(tmp_path / "mask" / "model.onnx")   # as its compile wrote it
    (tmp_path / "mask" / "manifest.json").write_text(json.dumps(manifest))
    lengths, mask = tokopt.load(bundle), tokopt.load(tmp_path / "mask")
    assert "attention_mask" in mask.graph_inputs and "seqlens_k" not in mask.graph_inputs
    opened = mask.decoding(1, 40)
    assert opened.wide_mask.shape == (1, 40) and not opened.lengths
    ids = np.random.default_rng(4).integers(10, 256, (2, 11))
    pad = np.ones_like(ids)
    pad[1, :4] = 0
    for kw in ({"input_ids": ids[:1]}, {"input_ids": ids, "attention_mask": pad},
               {"input_ids": np.tile(ids[:1, :5], 3), "prompt_lookup": 3}):
        np.testing.assert_array_equal(mask.generate(max_new_tokens=20, **kw), lengths.generate(max_new_tokens=20, **kw))


def test_a_greedy_row_steps_in_its_decodings_own_loop(llama_bundle, monkeypatch):
    """One greedy row hands its steps after the first one-token step to the decoding's own loop
    (``BoundDecoding.greedy``): the same tokens, stops and streamed tokens as the general loop
    (which ``on_logits`` keeps), the row's length written a step, and misuse refused."""
    from tokopt.backends.onnxruntime import BoundDecoding
    run = tokopt.load(llama_bundle[1].bundle)
    spec = run.cache_spec()
    ids = np.random.default_rng(8).integers(10, 256, (1, 9))
    opened, greedy = [], BoundDecoding.greedy
    monkeypatch.setattr(BoundDecoding, "greedy", lambda self, *a, **k: opened.append(self) or greedy(self, *a, **k))
    for n in (1, 2, 3, 20):
        general = generate_ids(run, spec, ids, max_new_tokens=n, on_logits=lambda logits: None)
        np.testing.assert_array_equal(run.generate(input_ids=ids, max_new_tokens=n), general)
    assert len(opened) == 2   # n = 3 and 20: the first two tokens come from the general loop's calls
    assert int(opened[-1].total) == 9 + 19 and opened[-1].seqlens.tolist() == [9 + 18]   # a token a step
    stop = int(general[0, 9 + 6])
    streams = [], []
    for stream, kw in zip(streams, ({}, {"on_logits": lambda logits: None})):
        out = generate_ids(run, spec, ids, max_new_tokens=20, stop_tokens=[stop],
                           on_token=lambda t, stream=stream: stream.append(int(t[0])), **kw)
        assert out.shape[1] <= 9 + 7 and out[0, -1] == stop
    assert streams[0] == streams[1]
    fresh = run.decoding(1, 12)
    with pytest.raises(UsageError, match="continues one row's one-token steps"):
        fresh.greedy(5, 2, set())
    fresh(ids, np.ones_like(ids), np.arange(9)[None])
    fresh(ids[:, :1], np.ones((1, 10), np.int64), np.array([[9]]))
    with pytest.raises(UsageError, match="the cache holds 12 tokens and 3 more steps would make it 13"):
        fresh.greedy(5, 3, set())


def test_standard_targets_keep_the_standard_attention(llama_bundle, tmp_path):
    """A target without contrib ops (TensorRT) gets no GroupQueryAttention: the decoder stays
    ONNX's Attention with the cache concatenated."""
    from tokopt.backends.onnxruntime import OnnxRuntimeBackend
    from tokopt.backends.targets import TARGETS
    info = OnnxRuntimeBackend().lower(llama_bundle[1].program, tmp_path, TARGETS["tensorrt"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert "decoder" not in info and "GroupQueryAttention" not in ops and ops.count("Attention") == 2


def test_sampling_is_seeded(llama_bundle):
    run = tokopt.load(llama_bundle[1].bundle)
    ids = np.arange(10, 20)[None]
    kw = dict(input_ids=ids, max_new_tokens=12, do_sample=True, temperature=1.5)
    a, b, c = run.generate(**kw, seed=1), run.generate(**kw, seed=1), run.generate(**kw, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = run.generate(input_ids=ids, max_new_tokens=12)
    np.testing.assert_array_equal(run.generate(**kw, top_k=1, seed=3), greedy)


def test_pick_top_p_keeps_the_smallest_set():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    draws = {int(_pick(logits, rng, 1.0, 0, 0.7)[0]) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is never drawn


def test_stop_tokens_end_generation(llama_bundle):
    run = tokopt.load(llama_bundle[1].bundle)
    ids = np.arange(10, 20)[None]
    free = run.generate(input_ids=ids, max_new_tokens=8)
    stop = int(free[0, 13])
    got = run.generate(input_ids=ids, max_new_tokens=8, stop_tokens=[stop])
    assert got[0, -1] == stop and got.shape[1] <= 14


def test_a_stopped_row_is_padded_while_the_others_go_on(llama_bundle):
    """A batch where one row reaches a stop token first: that row's later tokens are padding, the
    other row's are its free continuation, and generation ends when every row has stopped."""
    run = tokopt.load(llama_bundle[1].bundle)
    ids = np.random.default_rng(8).integers(10, 256, (2, 9))
    free = run.generate(input_ids=ids, max_new_tokens=12)
    pad = run.cache_spec().pad_token_id

    def ends(stop):   # per row: the new tokens up to its first stop token
        firsts = [np.flatnonzero(row[9:] == stop) for row in free]
        return [int(f[0]) + 1 if len(f) else 12 for f in firsts]
    stop = next(int(t) for t in free[0, 9:] if ends(int(t))[0] < ends(int(t))[1] and int(t) != pad)
    end = ends(stop)
    got = run.generate(input_ids=ids, max_new_tokens=12, stop_tokens=[stop])
    assert got.shape[1] == 9 + max(end)
    for r in range(2):
        np.testing.assert_array_equal(got[r, 9:9 + end[r]], free[r, 9:9 + end[r]])
        assert (got[r, 9 + end[r]:] == pad).all()


@pytest.mark.slow
def test_bad_generation_requests(llama_bundle, tmp_path, model_dir):
    run = tokopt.load(llama_bundle[1].bundle)
    with pytest.raises(UsageError, match="cache holds at most 512 tokens.*at most 12 new"):
        run.generate(input_ids=np.ones((1, 500), np.int64), max_new_tokens=13)
    with pytest.raises(UsageError, match="max_new_tokens must be at least 1"):
        run.generate(input_ids=np.ones((1, 5), np.int64), max_new_tokens=0)
    with pytest.raises(UsageError, match="shape sampling, and this is greedy decoding: set do_sample=True"):
        run.generate(input_ids=np.ones((1, 5), np.int64), max_new_tokens=2, top_p=0.5)
    plain = tokopt.compile(model_dir("llama"), out=tmp_path / "plain", measure=False, generate=False)
    with pytest.raises(UsageError, match="no decode graph.*--generate"):
        tokopt.load(plain.bundle).generate(input_ids=np.ones((1, 5), np.int64))
    with pytest.raises(UsageError, match="needs a causal language model"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "x", generate=True)
    with pytest.raises(UsageError, match="token_prune cannot run on a --generate graph"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "y", generate=True, passes="token_prune:keep=0.5")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_causal_lms_compile_for_generation_by_default(tmp_path, model_dir, capsys):
    """`tokopt compile LM` gives a generation bundle whose plain call is the full-sequence forward:
    every position's logits, right padding included, equal to transformers' (1e-4: float32 kernels
    differ); left padding is refused by name (the kernel reads a row's length off the mask). Structurally the LM head runs on the positions asked for only: ``logits_index`` is one
    Gather on the sequence axis feeding the head's MatMul, and decoding asks for one row.
    --no-generate gives the forward alone; a pass that needs the full forward falls back to it and
    the report says why; a position outside the new tokens is refused by name."""
    from transformers import AutoModelForCausalLM
    src = model_dir("llama")
    assert main(["compile", str(src), "--out", str(tmp_path / "gen"), "--no-measure", "--quiet"]) == 0
    run = tokopt.load(tmp_path / "gen")
    assert run.manifest["generation"] and "logits_index" in run.inputs
    graph = onnx.load(str(tmp_path / "gen" / "model.onnx")).graph
    made = {o: n for n in graph.node for o in n.output}
    head = made["logits"]
    gather = made[head.input[0]]
    assert head.op_type == "MatMul" and gather.op_type == "Gather" and gather.attribute[0].i == 1
    assert gather.input[1] == "logits_index"   # read as it is: its flattening to the 1-D it is was dropped
    ids = np.random.default_rng(8).integers(10, 256, (3, 13))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0   # right padding: the decoder kernel reads a row's length off the mask
    got = run(input_ids=ids, attention_mask=mask)
    with pytest.raises(UsageError, match="rows take right padding.*padding_side='right'"):
        run(input_ids=ids, attention_mask=mask[:, ::-1])
    model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert got["logits"].shape == (3, 13, 256) and got["present_key_0"].shape == (3, 2, 13, 16)
    assert np.abs(got["logits"] - ref)[mask == 1].max() < 1e-4
    np.testing.assert_array_equal(run.generate(input_ids=ids[:1], max_new_tokens=8),
                                  _hf_greedy(_no_eos(model), ids[:1], n=8))
    with pytest.raises(UsageError, match="logits_index holds 13; .* must be in 0..12"):
        run(input_ids=ids, attention_mask=mask, logits_index=np.array([13]))

    assert main(["compile", str(src), "--out", str(tmp_path / "fwd"), "--no-generate", "--no-measure", "--quiet"]) == 0
    fwd = tokopt.load(tmp_path / "fwd")
    assert "generation" not in fwd.manifest and set(fwd.inputs) == {"input_ids", "attention_mask"}
    assert np.abs(fwd(input_ids=ids, attention_mask=mask)["logits"] - ref)[mask == 1].max() < 1e-4
    pruned = tokopt.compile(src, out=tmp_path / "pruned", passes="token_prune:keep=0.5,score=last", measure=False)
    assert "generation" not in pruned.manifest
    assert "full-sequence forward, without generate(): token_prune" in pruned.report["plan"][0]


def test_cli_generation_errors(llama_bundle, capsys):
    bundle = str(llama_bundle[1].bundle)
    assert main(["run", bundle, "--input-ids", "5,6,7", "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens must be at least 1" in capsys.readouterr().err
    assert main(["run", bundle, "--input-ids", "5,6,7", "--top-p", "0.5"]) == 2
    assert "(--sample)" in capsys.readouterr().err
    assert main(["run", bundle, "--input-ids", "5,6,7", "--max-new-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["new_ids"]) == 3
    assert main(["inspect", bundle]) == 0
    assert "KV cache 2 layers x 2 heads x 16 dims (float32), up to 512 tokens" in capsys.readouterr().out


@pytest.mark.slow
def test_reference_lm_generates_like_transformers(tmp_path, capsys):
    """Trained weights, real prompt, CLI end to end: the streamed text is transformers' greedy
    continuation; the report has the decode latency, the first token's at two prompt lengths and
    the cache size, each beside onnxruntime-genai's build of the same folder where it is installed
    (and a line saying why not where it is not)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "ref"
    assert main(["compile", str(REFERENCE_LM), "--generate", "--out", str(out), "--bench-runs", "5",
                 "--bench-len", "64", "--threads", "1", "--quiet"]) == 0
    report = capsys.readouterr().out
    assert "greedy match" in report and "decode step, 64 cached tokens" in report and "1K tokens 2.00 MiB" in report
    quality = json.loads((out / "report.json").read_text())["quality"]
    assert quality["prompt_lookup_match"] == 1.0 and quality["prompt_lookup_tokens_per_call"] >= 1   # text-dependent
    assert "decode tokens/s" in report and "first token, 64-token prompt" in report
    assert "first token, 256-token prompt" in report   # 4x the probe length: where prefill costs show
    timed = json.loads((out / "report.json").read_text())
    if importlib.util.find_spec("onnxruntime_genai"):
        assert report.count("median ms vs onnxruntime-genai fp32") == 3
        assert all(lat["others"]["onnxruntime-genai fp32"]["median_ms"] > 0
                   for lat in (timed["latency"], *timed["first_token"]))
    else:
        assert "not timed: onnxruntime-genai is not installed (pip install -e '.[bench]')" in report
    prompt = "def read_config(path):\n    "
    assert main(["run", str(out), "--text", prompt, "--max-new-tokens", "64"]) == 0
    streamed = capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_LM, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(REFERENCE_LM, local_files_only=True)
    ids = tok(prompt, return_tensors="np")["input_ids"]
    ref = _hf_greedy(model, ids)
    got = tokopt.load(out).generate(input_ids=ids, max_new_tokens=64)
    np.testing.assert_array_equal(got, ref)
    # prompt lookup on trained weights: the same greedy tokens (its drafts come from the text)
    np.testing.assert_array_equal(tokopt.load(out).generate(input_ids=ids, max_new_tokens=64, prompt_lookup=8), ref)
    assert streamed.rstrip("\n") == prompt + tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


def test_partial_rotary_is_fused_where_the_kernel_takes_it(tmp_path):
    """Phi rotates part of each head (here 16 of 32 dims): the lowering fuses it into the
    decoder kernel, and greedy decoding still equals transformers'. Where the rotated part is
    narrower than the kernel takes (the tiny Phi's 8 dims), the layer stays standard and says why."""
    import transformers as tf
    torch.manual_seed(0)
    model = _no_eos(tf.PhiForCausalLM(tf.PhiConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, vocab_size=256,
                                                   max_position_embeddings=512)).eval())
    res = tokopt.compile(model, out=tmp_path / "phi", generate=True, measure=False)
    assert res.manifest["lowering"]["decoder"] == {"cached_attention": [0, 1], "padding_side": "right"}
    ids = np.random.default_rng(7).integers(10, 256, (1, 9))
    np.testing.assert_array_equal(tokopt.load(res.bundle).generate(input_ids=ids, max_new_tokens=32),
                                  _hf_greedy(model, ids, n=32))
    narrow = tokopt.compile(_tiny("phi").eval(), out=tmp_path / "narrow", generate=True, measure=False)
    assert "fused rotary needs a multiple of 16" in narrow.manifest["lowering"]["decoder"]["kept"][0]
    assert not narrow.manifest["generation"]["shared_buffer"] and narrow.manifest["generation"]["padding_side"] == "left"


def test_peer_feeds_past_its_context_are_left_out():
    """The report's peer times only what onnxruntime-genai can run within the model's context (it
    needs room for the token it picks): a 1024-token prefill of a 1024-token model has no peer
    line; a decode step after 1000 cached tokens still has one (fewer steps per generator)."""
    from tokopt.backends import genai
    calls = genai.step_calls(None, vocab=100, context=1024)

    def feed(new, past):
        return {"input_ids": np.zeros((1, new), np.int64), "attention_mask": np.ones((1, new + past), np.int64)}
    assert calls(feed(1024, 0)) is None and callable(calls(feed(1023, 0)))
    assert calls(feed(1, 1023)) is None and callable(calls(feed(1, 1000)))


def test_report_says_why_the_peer_is_not_timed(monkeypatch, tmp_path):
    """Without onnxruntime-genai the peer's row is a line naming the package and how to install it
    (CI has no [bench] extra, so this is the line a fresh install prints)."""
    import sys

    from tokopt.backends import genai
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)   # as if it were not installed
    why = genai.build(REFERENCE_LM, "fp32", tmp_path / "genai", threads=1)
    assert why == "onnxruntime-genai is not installed (pip install -e '.[bench]')"
    assert not (tmp_path / "genai").exists()


def test_right_padded_rows_match_the_kernel(llama_bundle):
    """The lowered program's op (its torch reference, what every check of the lowering runs;
    the program before lowering appends after the whole cache, and takes left padding) and ONNX
    Runtime's GroupQueryAttention agree on ragged right-padded rows: a prefill where one
    row is shorter, then a decode step where each row writes after its own length (1e-4 on the
    logits and the cache entries each row holds; a padding position's output is unspecified)."""
    from tokopt.backends.decoder import lower_decoder
    _, res = llama_bundle
    prog, info = lower_decoder(res.program)   # what the bundle's ONNX was exported from
    spec = prog.cache
    assert info == {"cached_attention": [0, 1], "padding_side": "right"}
    run = tokopt.load(res.bundle)
    ids = np.random.default_rng(9).integers(10, 256, (2, 7))
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.cumsum(mask, 1) - 1,
            "logits_index": np.arange(7), **{k: v.numpy() for k, v in spec.empty(2).items()}}

    def both(feed):
        want = {k: v.numpy() for k, v in prog.run({k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}).items()}
        return want, run(**feed)
    want, got = both(feed)
    lengths = mask.sum(1)
    for b, n in enumerate(lengths):
        assert np.abs(got["logits"][b, :n] - want["logits"][b, :n]).max() < 1e-4
        assert np.abs(got["present_key_1"][b, :, :n] - want["present_key_1"][b, :, :n]).max() < 1e-4
    step = np.concatenate([mask, np.zeros((2, 1), np.int64)], 1)
    step[np.arange(2), lengths] = 1
    feed = {"input_ids": got["logits"][np.arange(2), lengths - 1].argmax(-1)[:, None], "attention_mask": step,
            "position_ids": lengths[:, None], "logits_index": np.array([0]),
            **{p: got[o] for p, o in zip(spec.input_names, spec.output_names)}}
    want, got = both(feed)
    assert np.abs(got["logits"] - want["logits"]).max() < 1e-4
    for b, n in enumerate(lengths + 1):
        assert np.abs(got["present_value_0"][b, :, :n] - want["present_value_0"][b, :, :n]).max() < 1e-4


@pytest.mark.parametrize("arch", ["Gemma2", "Gemma3"])
def test_sliding_window_decoders_generate_past_their_window(arch, tmp_path, capsys):
    """Gemma 2 (a class without SDPA attention: loaded eager) and Gemma 3 attend through an 8-token
    window; the prompt and the new tokens run well past it. The graph takes the whole cache and the
    window is the decoder kernel's ``local_window_size`` (transformers' cache trims it, a branch on
    the cache length that export would specialise); Gemma 2's attention logit soft cap (tanh(s / 50)
    * 50) is recognised and goes on the kernel too (its ``softcap``), and passes that do not model
    it refuse it by name. Greedy decoding equals transformers'. The same model without the window
    decodes differently, so the window is there. The windowed layers' buffers hold the window and a
    slack, not the whole decoding (ONNX Runtime's windowed cache, evicting inside the kernel)."""
    import transformers as tf
    torch.manual_seed(0)
    config_cls = tf.Gemma3TextConfig if arch == "Gemma3" else tf.Gemma2Config
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, vocab_size=256, max_position_embeddings=512)
    model = _no_eos(getattr(tf, f"{arch}ForCausalLM")(config_cls(**kw, sliding_window=8)).eval())
    model.save_pretrained(tmp_path / "m")
    res = tokopt.compile(tmp_path / "m", out=tmp_path / "b", measure=False)
    assert res.manifest["source"]["attn_implementation"] == ("eager" if arch == "Gemma2" else "sdpa")
    # Gemma 2 alternates sliding and full layers, Gemma 3 slides five in six
    assert list(res.manifest["generation"]["cache"]["windows"]) == ([8, 0] if arch == "Gemma2" else [8, 8])
    # Gemma 3's q and k norms, Gemma 2's soft cap and the windows go on the decoder kernel
    assert res.manifest["lowering"]["decoder"]["cached_attention"] == [0, 1]
    assert res.manifest["lowering"]["decoder"]["windowed_cache"] == ({"0": 8} if arch == "Gemma2" else {"0": 8, "1": 8})
    gqa = [n for n in onnx.load(res.bundle / "model.onnx").graph.node if n.op_type == "GroupQueryAttention"]
    assert [a.i for n in gqa for a in n.attribute if a.name == "local_window_size"] == (
        [8, -1] if arch == "Gemma2" else [8, 8])
    caps = [a.f for n in gqa for a in n.attribute if a.name == "softcap"]
    assert caps == ([50.0, 50.0] if arch == "Gemma2" else [0.0, 0.0])
    if arch == "Gemma2":
        from tokopt.cli import main
        from tokopt.optimizer.errors import UsageError
        assert main(["inspect", str(tmp_path / "m")]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[2].split()[-1] == "softcap" and table[3].split()[-1] == "50.0"   # the index shows the cap
        with pytest.raises(UsageError, match=r"token_prune does not model an attention logit soft cap"):
            tokopt.compile(tmp_path / "m", out=tmp_path / "pruned", passes="token_prune", generate=False,
                           measure=False)
    # a windowed layer's node keeps a window-sized cache: the runner's buffers hold the window and a
    # slack (8 + sqrt(16) rows, not the 44 tokens), the whole decoding where drafts may be taken back
    assert [next((a.i for a in n.attribute if a.name == "sliding_window_cache"), 0) for n in gqa] == (
        [1, 0] if arch == "Gemma2" else [1, 1])
    run = tokopt.load(res.bundle)
    # the windowed kernel also reads each row's new tokens (min(its length, S)): an input as the lengths are
    assert {"seqlens_k", "query_seqlens"} <= run.graph_inputs and "attention_mask" not in run.graph_inputs
    assert run.decoding(1, 44).new_tokens is not None
    rows = [run.decoding(1, 44, drafts=drafts).cache["past_key_1"].shape[2] for drafts in (False, True)]
    assert run.decoding(1, 44).cache["past_key_0"].shape[2] == 12
    assert rows == ([44, 44] if arch == "Gemma2" else [12, 44])
    ids = np.random.default_rng(5).integers(10, 256, (1, 20))
    got = run.generate(input_ids=ids, max_new_tokens=24)
    np.testing.assert_array_equal(got, _hf_greedy(model, ids, n=24))
    np.testing.assert_array_equal(run.generate(input_ids=ids, max_new_tokens=24, prompt_lookup=3), got)
    two = np.random.default_rng(2).integers(10, 256, (2, 21))
    pad = np.ones_like(two)
    pad[1, :6] = 0   # a ragged batch: the windowed kernel takes each row's new tokens (query_seqlens)
    np.testing.assert_array_equal(run.generate(input_ids=two, attention_mask=pad, max_new_tokens=24),
                                  _hf_greedy(model, two, pad, n=24))
    with pytest.raises(tokopt.UsageError, match="not opened for drafts"):   # drafts taken back need every row
        run.decoding(1, 44).every(ids[:, :3], np.ones((1, 3), np.int64), np.arange(3)[None])
    wide = _no_eos(getattr(tf, f"{arch}ForCausalLM")(config_cls(**kw, sliding_window=512)).eval())
    wide.load_state_dict(model.state_dict())
    assert (_hf_greedy(wide, ids, n=24) != got).any()


def test_an_onnx_runtime_without_windowed_caches_keeps_the_whole_cache(tmp_path, monkeypatch):
    """Where ONNX Runtime's GroupQueryAttention lacks ``sliding_window_cache`` (before 2026), a
    window layer's node leaves it out, the manifest lists no windowed layers, the runner's buffers
    hold the whole decoding and greedy decoding still equals transformers' past the window."""
    import transformers as tf
    from tokopt.backends import decoder
    from tokopt.optimizer.ops import gqa
    monkeypatch.setattr(gqa, "windowed_cache_supported", lambda: False)
    monkeypatch.setattr(decoder, "windowed_cache_supported", lambda: False)
    torch.manual_seed(0)
    model = _no_eos(tf.Gemma2ForCausalLM(tf.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=256, max_position_embeddings=512, sliding_window=8)).eval())
    res = tokopt.compile(model, out=tmp_path / "b", generate=True, measure=False)
    assert "windowed_cache" not in res.manifest["lowering"]["decoder"]
    nodes = [n for n in onnx.load(res.bundle / "model.onnx").graph.node if n.op_type == "GroupQueryAttention"]
    assert not [a for n in nodes for a in n.attribute if a.name == "sliding_window_cache" and a.i]
    run = tokopt.load(res.bundle)
    assert run.decoding(1, 44).cache["past_key_0"].shape[2] == 44
    ids = np.random.default_rng(5).integers(10, 256, (1, 20))
    np.testing.assert_array_equal(run.generate(input_ids=ids, max_new_tokens=24), _hf_greedy(model, ids, n=24))


def test_qk_norm_decoders_go_on_the_decoder_kernel(tmp_path):
    """Qwen3 normalises each head's q and k before RoPE: the normed heads are viewed token-major
    and packed for the decoder kernel (GroupQueryAttention, the cache shared in place), and
    greedy decoding equals transformers'."""
    import transformers as tf
    torch.manual_seed(0)
    model = _no_eos(tf.Qwen3ForCausalLM(tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                       vocab_size=256, max_position_embeddings=512)).eval())
    res = tokopt.compile(model, out=tmp_path / "b", generate=True, measure=False)
    assert res.manifest["lowering"]["decoder"] == {"cached_attention": [0, 1], "padding_side": "right"}
    assert res.manifest["generation"]["shared_buffer"]
    ids = np.random.default_rng(2).integers(10, 256, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    got = tokopt.load(res.bundle).generate(input_ids=ids, attention_mask=mask, max_new_tokens=24)
    np.testing.assert_array_equal(got, _hf_greedy(model, ids, mask, n=24))


def test_a_window_the_kernel_would_get_wrong_is_caught(tmp_path, monkeypatch):
    """Mistral-style: every layer slides through a 16-token window, longer than the lowering's
    usual check feeds reach. Greedy decoding past it equals transformers'; and the lowering's check
    steps once after a cache longer than the window, so a window the kernel would apply wrongly (here
    told 32) fails the compile instead of decoding wrongly past it."""
    import transformers as tf
    from tokopt.optimizer import generation
    from tokopt.optimizer.errors import BackendError
    torch.manual_seed(0)
    model = _no_eos(tf.MistralForCausalLM(tf.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=256, max_position_embeddings=512, sliding_window=16)).eval())
    res = tokopt.compile(model, out=tmp_path / "b", generate=True, measure=False)
    assert res.manifest["lowering"]["decoder"]["cached_attention"] == [0, 1]
    ids = np.random.default_rng(4).integers(10, 256, (1, 30))
    np.testing.assert_array_equal(tokopt.load(res.bundle).generate(input_ids=ids, max_new_tokens=16),
                                  _hf_greedy(model, ids, n=16))
    monkeypatch.setattr(generation, "_windows", lambda *a: (32, 32))
    with pytest.raises(BackendError, match="decoder lowering changed the graph's outputs"):
        tokopt.compile(model, out=tmp_path / "wrong", generate=True, measure=False)
