"""RSQ: rotation invariance, the GPTQ solver, the low-bit ops and their lowerings, the pass on
trained weights (reference LM perplexity, MiniLM embeddings), bundle size, and bad requests."""
from __future__ import annotations

import csv
import functools
import math

import numpy as np
import onnx
import onnxscript.optimizer
import pytest
import torch
from torch.export import Dim

import tokopt
from tokopt.calibration.gptq import quantize_gptq, quantize_rtn
from tokopt.optimizer.compile import plan_passes
from tokopt.optimizer.errors import PassError, UsageError
from tokopt.backends.onnxruntime import for_onnx
from tokopt.optimizer.ops import OPSET, onnx_translation_table, standardize
from tokopt.optimizer.pass_manager import PassManager, resolve
from tokopt.optimizer.report import format_report
from tokopt.optimizer.ops import LINEAR_W8A8
from tokopt.optimizer.ops.nbits import EMBEDDING_Q8, MATMUL_NBITS, dequantize, pack
from tokopt.passes import rotation
from tokopt.passes.rotation import NotRotatable, hadamard, hadamard_factors, kron_right, random_hadamard_factors, \
    rotate

from .conftest import REFERENCE_LM, feed_for, onnx_ops


def _canonical(source):
    return PassManager(resolve(plan_passes("canonicalize"))).run(tokopt.capture(source))


def _random_hadamard(n: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The rotation's random orthogonal matrix, dense (by torch.kron), with its signs and factors."""
    signs, factors = random_hadamard_factors(n, torch.Generator().manual_seed(0))
    return functools.reduce(torch.kron, factors) * signs[:, None], signs, factors


def test_hadamards_are_orthogonal():
    for n in (16, 704, 96):
        q = _random_hadamard(n)[0]
        assert torch.allclose(q @ q.T, torch.eye(n, dtype=q.dtype), atol=1e-10)
    assert torch.allclose(hadamard(8) @ hadamard(8), torch.eye(8, dtype=torch.float64), atol=1e-12)
    # applied by its Kronecker factors, as the rotation applies it to weights: the same matrix
    assert torch.equal(torch.kron(hadamard(4), hadamard(8)), hadamard(32))   # Sylvester's H_ab = H_a x H_b
    assert torch.equal(torch.kron(*hadamard_factors(2048)), hadamard(2048))
    for n in (2048, 896, 7):
        dense, signs, factors = _random_hadamard(n)
        assert math.prod(len(f) for f in factors) == n and all(len(f) < n for f in factors[1:])
        x = torch.randn(5, n, dtype=torch.float64)
        assert torch.allclose(kron_right(x * signs, factors), x @ dense, atol=1e-12)


@pytest.mark.parametrize("source,factored", [("reference-lm", False), ("reference-lm", True), ("qwen2", False)])
def test_rotation_keeps_the_function(source, factored, model_dir, monkeypatch):
    """Trained reference LM (tied embeddings, GQA) and Qwen2 (q/k/v biases): folded norms,
    rotated stream, per-head V/O and online MLP rotations (their Hadamard dense, or by its two
    Kronecker factors as large models' are); the outputs stay the same in float32."""
    if factored:
        monkeypatch.setattr(rotation, "_FACTOR_FROM", 2)
    program = _canonical(REFERENCE_LM if source == "reference-lm" else model_dir(source))
    rw = program.rewrite()
    info = rotate(rw)
    rotated = rw.commit("rotate")
    layers = len(program.attention)
    assert info == {"hidden": info["hidden"], "norms_folded": 2 * layers + 1, "writers": 2 * layers,
                    "head_rotations": layers, "online_rotations": layers}
    # no norm weight multiplies left; one extra pair of matmuls per MLP, a third for the factored Hadamard
    assert rotated.count("aten.matmul.default") == program.count("aten.matmul.default") + (3 if factored else 2) * layers
    feed = feed_for("llama", 2, 37) if source != "reference-lm" else {
        "input_ids": torch.randint(0, 4096, (2, 37)), "attention_mask": torch.ones(2, 37, dtype=torch.long)}
    a, b = program.run(feed)["logits"], rotated.run(feed)["logits"]
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
    with pytest.raises(NotRotatable, match="3 embedding lookups"):  # BERT: word + position + type embeddings
        rotate(_canonical(model_dir("bert")).rewrite())


def test_gptq_beats_round_to_nearest():
    """On correlated inputs GPTQ's output error ||(W - Q) X^T|| is well below RTN's; both honour
    the block layout (codes in range, one scale per block of 32)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 96, generator=g) + 0.1 * torch.randn(2048, 96, generator=g)
    h = x.double().T @ x.double()
    err = {}
    for name, qw in (("rtn", quantize_rtn(w, 4, 32)), ("gptq", quantize_gptq(w, h, 4, 32))):
        assert qw.codes.max() <= 15 and qw.scales.shape == (64, 3)
        d = (w - qw.dequantize()).double()
        err[name] = float((d @ h * d).sum())
    assert err["gptq"] < 0.5 * err["rtn"]
    with pytest.raises(PassError, match="Hessian of layers.7.mlp is not positive definite"):
        quantize_gptq(w, -torch.eye(96, dtype=torch.float64), 4, 32, name="layers.7.mlp")


@pytest.mark.parametrize("bits,k", [(4, 40), (4, 64), (8, 40)])
def test_low_bit_ops_lower_to_onnx_runtime(tmp_path, bits, k):
    """MatMulNBits (contrib) and its standard form (blocked DequantizeLinear + MatMul, what
    TensorRT builds from) both reproduce the reference, including a padded last block; the int8
    embedding gathers rows before dequantizing."""
    import onnx_ir as ir
    import onnxruntime as ort

    g = torch.Generator().manual_seed(bits + k)
    n, bs = 24, 16
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    qw, sc = pack(codes, bits, bs), torch.rand(n, -(-k // bs), generator=g) * 0.1
    table, tscale = torch.randint(1, 256, (50, 32), dtype=torch.uint8, generator=g), torch.rand(50, 2, generator=g)
    bias = torch.randn(n, generator=g)

    class M(torch.nn.Module):
        def forward(self, ids, x):
            return (MATMUL_NBITS.op(x, qw, sc, bias, bits, bs, k, n), EMBEDDING_Q8.op(table, tscale, ids, 16))

    ids, x = torch.randint(0, 50, (2, 5), generator=g), torch.randn(2, 5, k, generator=g)
    ep = torch.export.export(M(), (ids, x), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO}, {0: Dim.AUTO, 1: Dim.AUTO}))
    model = torch.onnx.export(for_onnx(ep), dynamo=True, opset_version=OPSET, optimize=False, input_names=["ids", "x"],
                              custom_translation_table=onnx_translation_table()).model
    onnxscript.optimizer.optimize(model)  # as export_onnx does: folds the scales' reshape
    ids2, x2 = torch.randint(0, 50, (3, 7), generator=g), torch.randn(3, 7, k, generator=g)
    ref = [t.numpy() for t in M()(ids2, x2)]
    w = ((codes.float() - (1 << (bits - 1))) * sc.repeat_interleave(bs, 1)[:, :k])
    assert np.abs(ref[0] - (x2 @ w.T + bias).numpy()).max() < 1e-5
    for form in ("contrib", "standard"):
        if form == "standard":
            assert standardize(model) == {"tokopt::matmul_nbits": 1, "tokopt::embedding_q8": 1}
        ir.save(model, tmp_path / f"{form}.onnx")
        ops = [nd.op_type for nd in onnx.load(str(tmp_path / f"{form}.onnx")).graph.node]
        assert ("MatMulNBits" in ops) == ("GatherBlockQuantized" in ops) == (form == "contrib")
        assert ops.count("DequantizeLinear") == (2 if form == "standard" else 0)
        so = ort.SessionOptions()
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        sess = ort.InferenceSession(str(tmp_path / f"{form}.onnx"), so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"ids": ids2.numpy(), "x": x2.numpy()})
        assert np.abs(got[0] - ref[0]).max() < 1e-4 and np.abs(got[1] - ref[1]).max() < 1e-6


@pytest.fixture(scope="module")
def rsq_lm(tmp_path_factory):
    out = tmp_path_factory.mktemp("rsq") / "bundle"
    return tokopt.compile(REFERENCE_LM, out=out, generate=False, passes="rsq:samples=8,eval_windows=4",
                          calib=REFERENCE_LM / "heldout.txt", bench_runs=0, bench_len=64, threads=2)


@pytest.mark.slow
def test_rsq_on_the_reference_lm(rsq_lm):
    """Trained weights, held-out code: int4 RSQ keeps perplexity within 5% of fp32; every
    linear of the 4 layers is a packed int4 matmul, the tied embedding/LM head int8."""
    program, stats = rsq_lm.program, rsq_lm.report["passes"][-1]["stats"]
    assert program.count(MATMUL_NBITS.overload) == 4 * 7 + 1 and program.count(EMBEDDING_Q8.overload) == 1
    assert program.count("aten.linear.default") == 0
    assert stats["rotation"]["norms_folded"] == 9 and stats["group_size"] == 32
    assert stats["perplexity_quantized"] < 1.05 * stats["perplexity_fp32"]
    ops = [n.op_type for n in onnx.load(str(rsq_lm.bundle / "model.onnx")).graph.node]
    # per layer q/k/v and gate/up fused at lowering: 4 MatMulNBits of 7 linears; tied head: one int8 table
    assert ops.count("MatMulNBits") == 4 * 4 + 1 and ops.count("GatherBlockQuantized") == 1


@pytest.mark.slow
def test_rsq_bundle_size_log_and_report(rsq_lm):
    """<= 0.30x the fp32 weights on disk; quant_log.csv has one row per quantized linear;
    the report's quality on real text is close to the original (measured without timing)."""
    ours, plain = rsq_lm.report["size_bytes"]["tokopt"], rsq_lm.report["stages"]["weights_bytes"]
    assert ours <= 0.30 * plain, (ours, plain)
    rows = list(csv.DictReader((rsq_lm.bundle / "quant_log.csv").open()))
    assert len(rows) == 28 and {r["bits"] for r in rows} == {"4"}
    assert rows[0]["weight"] == "model.model.layers.0.self_attn.q_proj.weight"
    assert all(0 < float(r["relative_error"]) < 0.2 for r in rows)
    assert rsq_lm.report["quality"]["top1_agreement"] > 0.85
    assert "latency" not in rsq_lm.report and "latency not measured: --bench-runs 0" in format_report(rsq_lm.report)


def test_int8_compute(tmp_path):
    """compute=int8: MatMulNBits at accuracy level 4 (ORT's integer kernels), the reference rounds
    activations the same way; the decode-graph bundle stays close to the float-compute one."""
    import onnxruntime as ort
    g = torch.Generator().manual_seed(3)
    k, n, bs = 64, 48, 32
    qw, sc = pack(torch.randint(0, 16, (n, k), generator=g), 4, bs), torch.rand(n, 2, generator=g) * 0.1
    x = torch.randn(5, k, generator=g)
    exact = MATMUL_NBITS.reference(x, qw, sc, None, 4, bs, k, n)
    rounded = MATMUL_NBITS.reference(x, qw, sc, None, 4, bs, k, n, 4)
    assert 0 < (rounded - exact).abs().max() < 0.02 * exact.abs().max()

    class M(torch.nn.Module):
        def forward(self, x):
            return MATMUL_NBITS.op(x, qw, sc, None, 4, bs, k, n, 4)

    model = torch.onnx.export(torch.export.export(M(), (x,)), dynamo=True, opset_version=OPSET, optimize=False,
                              custom_translation_table=onnx_translation_table()).model
    node = next(nd for nd in model.graph if nd.op_type == "MatMulNBits")
    assert node.attributes["accuracy_level"].as_int() == 4
    import onnx_ir as ir
    ir.save(model, tmp_path / "a4.onnx")
    got = ort.InferenceSession(str(tmp_path / "a4.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.abs(got - rounded.numpy()).max() < 0.1 * np.abs(rounded.numpy() - exact.numpy()).max() + 1e-4


@pytest.mark.slow
def test_int8_compute_on_a_deep_encoder(tmp_path, minilm_dir):
    """compute=int8 on MiniLM (36 rounded matmuls in a row): nudging the reference's rounding
    inputs by 1e-5 moves its output by percents (a flip changes later inputs by a whole step,
    which flips more), about as far as ONNX Runtime's output is from it. The exporter's check
    allows for that, so the bundle compiles; a lowering 20% off still fails the check."""
    from tokopt.backends.onnxruntime import ROUNDING_NUDGES, disagreement, make_session
    from tokopt.optimizer.ops import rounding_jitter
    res = tokopt.compile(minilm_dir, out=tmp_path / "b", measure=False,
                         passes="rsq:bits=8,compute=int8,solver=rtn,importance=none")
    ids = np.random.default_rng(0).integers(1000, 5000, (2, 16))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def reference(feed, nudge=0.0, off=1.0):
        with rounding_jitter(nudge):
            out = res.program.run({k: torch.from_numpy(v) for k, v in feed.items()})
        return [out[n].numpy() * off for n in res.program.output_names]
    plain, nudged = reference(feed)[0], reference(feed, ROUNDING_NUDGES[-1])[0]
    assert np.abs(plain - nudged).mean() > 0.005 * np.abs(plain).mean()
    session = make_session(res.bundle / "model.onnx", ["CPUExecutionProvider"])
    run = lambda f: session.run(None, f)  # noqa: E731
    assert disagreement(run, [feed], reference, exact=False) is None
    wrong = disagreement(run, [feed], lambda f, nudge=0.0: reference(f, nudge, off=1.2), exact=False)
    assert wrong is not None and wrong.startswith("outputs differ")


@pytest.mark.slow
def test_rsq_on_minilm_keeps_embeddings(tmp_path, minilm_dir):
    """A post-norm BERT cannot be rotated: rotate=auto says so and quantizes without; the int4
    sentence embeddings stay within cosine 0.975 of fp32 on held-out passages (0.978 measured;
    calibration never reads them)."""
    res = tokopt.compile(minilm_dir, out=tmp_path / "b", passes="rsq:samples=4,seq_len=128", bench_runs=0,
                         bench_len=64, threads=2)
    stats = res.report["passes"][-1]["stats"]
    assert stats["rotation"].startswith("skipped") and stats["embeddings"] == 3
    assert res.program.count(MATMUL_NBITS.overload) == 6 * 6 + 1
    assert res.report["quality"]["embedding_cosine"] > 0.975


@pytest.mark.slow
def test_token_ids_calibration_and_cache(tmp_path, model_dir):
    """Calibration from a token-id file; the second compile with the same weights, data and
    options reads the GPTQ result from the cache and builds the same graph."""
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, (4, 64)))
    captured = tokopt.capture(model_dir("llama"))
    captured.calib = str(ids)
    runs = [PassManager(resolve(plan_passes("rsq:samples=4,seq_len=64,group_size=16"))).run(captured)
            for _ in range(2)]
    assert [r.history[-1]["stats"]["cached"] for r in runs] == [False, True]
    feed = feed_for("llama", 1, 9)
    assert torch.equal(runs[0].run(feed)["logits"], runs[1].run(feed)["logits"])


def test_gptq_resumes_layer_by_layer(tmp_path, model_dir, monkeypatch):
    """Each GPTQ group's calibration run resumes where the previous group's stopped (its linears
    recomputed with their quantized weights) instead of running the graph from its inputs: the
    codes are bit-identical to the from-the-inputs runs, with fewer nodes run; and again when every
    resume state is moved to disk between groups (as a wide model's are,
    past rsq.SPILL_BYTES and SPILL_SHARE)."""
    import tokopt.passes.rsq as rsq_module
    from tokopt.optimizer.ops.taps import Tap
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, (4, 64)))
    ran, resumed = [], []
    run_node, run_feed = Tap.run_node, Tap.run_feed

    def counting(self, node):
        ran[-1] += 1
        return run_node(self, node)

    def from_inputs(self, feed, names, resume=None):
        ran.append(0)
        resumed.append(resume is not None)
        return run_feed(self, feed, names, resume=None if from_start else resume)
    monkeypatch.setattr(Tap, "run_node", counting)
    monkeypatch.setattr(Tap, "run_feed", from_inputs)
    backed, file_backed = [], rsq_module.file_backed

    def counted(shape, *args):
        backed.append(shape)
        return file_backed(shape, *args)
    monkeypatch.setattr(rsq_module, "file_backed", counted)
    programs, counts = [], []
    for from_start, spill in ((True, False), (False, False), (False, True)):
        monkeypatch.setenv("TOKOPT_CACHE_DIR", str(tmp_path / f"cache{from_start}{spill}"))   # no cached result
        monkeypatch.setattr(rsq_module, "SPILL_BYTES", 0 if spill else 2**28)
        monkeypatch.setattr(rsq_module, "SPILL_SHARE", 0 if spill else 1 / 4)
        backed.clear()
        captured = tokopt.capture(model_dir("llama"))
        captured.calib = str(ids)
        ran.clear()
        programs.append(PassManager(resolve(plan_passes("rsq:samples=4,seq_len=64,group_size=16,eval_windows=0,"
                                                        "compute=float"))).run(captured))
        counts.append(sum(ran))
    assert any(resumed) and len([s for s in backed if len(s) == 3]) > 4   # [1, 64, 64] activations on disk
    a, b, c = (dict(p.ep.state_dict) for p in programs)
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert counts[1] < 0.8 * counts[0]


@pytest.mark.slow
def test_int4_lm_head(tmp_path):
    """head_bits=4 rounds the LM head to 4 bits (onnxruntime-genai's int4 layout) and leaves the
    rest as head_bits=8 has it: the lowered head is a 4-bit MatMulNBits over the vocabulary, the
    embedding table stays int8, and on held-out text the 4-bit head moves the logits more than the
    8-bit one while keeping most of the fp32 model's next-token choices (top-1 >= 0.85)."""
    from transformers import AutoTokenizer
    text = (REFERENCE_LM / "heldout.txt").read_text()[:2000]
    feed = dict(AutoTokenizer.from_pretrained(REFERENCE_LM)(text, return_tensors="pt", truncation=True, max_length=256))
    ref = tokopt.capture(REFERENCE_LM).run(feed)["logits"]
    errors, agree = {}, {}
    for bits in (8, 4):
        res = tokopt.compile(REFERENCE_LM, out=tmp_path / f"h{bits}", generate=False, measure=False,
                             passes=f"rsq:bits=4,head_bits={bits},solver=rtn,importance=none,rotate=off,compute=float")
        assert res.report["passes"][-1]["stats"]["head_bits"] == bits
        heads = [n for n in onnx.load(str(res.bundle / "model.onnx")).graph.node
                 if n.op_type == "MatMulNBits" and onnx.helper.get_attribute_value(
                     next(a for a in n.attribute if a.name == "N")) == 4096]
        assert [onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits")) for n in heads] == [bits]
        assert res.program.count(EMBEDDING_Q8.overload) == 1
        got = res.program.run(feed)["logits"]
        errors[bits] = float((got - ref).abs().mean())
        agree[bits] = float((got.argmax(-1) == ref.argmax(-1)).double().mean())
    assert errors[4] > errors[8] and agree[4] >= 0.85, (errors, agree)   # measured 0.139 > 0.085; 0.91


def test_an_interrupted_gptq_resumes_from_its_saved_steps(tmp_path, model_dir, monkeypatch):
    """GPTQ stopped mid-way (Ctrl-C while it solves layer 1's up projection) leaves every finished
    group on disk; the next compile with the same weights, data and options loads the whole layers
    among them (layer 0: a layer's importance is measured before its own linears are quantized) and
    solves the rest: weights bit-identical to an uninterrupted run's, and the saved steps removed once
    the whole result is cached."""
    from tokopt.passes.rsq import RSQPass
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, (4, 64)))

    def compile_with(cache):
        monkeypatch.setenv("TOKOPT_CACHE_DIR", str(cache))
        captured = tokopt.capture(model_dir("llama"))
        captured.calib = str(ids)
        return PassManager(resolve(plan_passes("rsq:samples=4,seq_len=64,group_size=16,eval_windows=0,"
                                               "compute=float"))).run(captured)
    whole = compile_with(tmp_path / "whole")
    solved, stop, quantize = [], [12], RSQPass._quantize

    def stopping(self, w, h, bits, bs, name):
        if len(solved) == stop[0]:
            raise KeyboardInterrupt
        solved.append(name)
        return quantize(self, w, h, bits, bs, name)
    monkeypatch.setattr(RSQPass, "_quantize", stopping)
    with pytest.raises(KeyboardInterrupt):
        compile_with(tmp_path / "cut")
    steps = list((tmp_path / "cut" / "rsq").glob("*.steps/*.pt"))
    assert len(steps) == 6   # layer 0's q/k/v, o, gate/up and down, then layer 1's q/k/v and o
    solved.clear()
    stop[0] = None
    resumed = compile_with(tmp_path / "cut")
    stats = resumed.history[-1]["stats"]
    assert stats["resumed"] == "4 of 8 groups from an interrupted run" and not stats["cached"]
    assert len(solved) == 7 and all(".1." in name for name in solved)   # layer 1's linears only
    a, b = dict(whole.ep.state_dict), dict(resumed.ep.state_dict)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "cut" / "rsq").glob("*.steps")) and list((tmp_path / "cut" / "rsq").glob("*.pt"))


def test_bf16_calibration(tmp_path, monkeypatch):
    """calib_dtype=bf16: GPTQ's calibration runs the linears in bf16 and adds each window's X^T X
    from bf16 inputs. On the trained reference LM and held-out text the codes differ from fp32
    calibration's and the int4 perplexity stays within 1% of theirs (measured: 26.45 against 26.48,
    fp32 26.34).
    ``auto`` calibrates in bf16 only from rsq.BF16_CALIB_BYTES of weights on a CPU with bf16 units."""
    import tokopt.passes.rsq as rsq_module
    monkeypatch.setenv("TOKOPT_CACHE_DIR", str(tmp_path))
    runs = {}
    for dtype in ("auto", "bf16"):
        captured = tokopt.capture(REFERENCE_LM)
        captured.calib = str(REFERENCE_LM / "heldout.txt")
        out = PassManager(resolve(plan_passes(f"rsq:samples=4,eval_windows=2,compute=float,calib_dtype={dtype}"))
                          ).run(captured)
        runs[dtype] = out.history[-1]["stats"], dict(out.ep.state_dict)
    (fp32, a), (bf16, b) = runs["auto"], runs["bf16"]
    assert fp32["calib_dtype"] == "fp32" and bf16["calib_dtype"] == "bf16"   # a 15 MB model: auto keeps fp32
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert abs(bf16["perplexity_quantized"] / fp32["perplexity_quantized"] - 1) < 0.01, (fp32, bf16)
    monkeypatch.setattr(rsq_module, "cpu_has_bf16", lambda: True)
    big = rsq_module.BF16_CALIB_BYTES
    assert rsq_module.bf16_calibration("auto", big) and not rsq_module.bf16_calibration("auto", big - 1)
    assert not rsq_module.bf16_calibration("fp32", big)
    monkeypatch.setattr(rsq_module, "cpu_has_bf16", lambda: False)
    assert not rsq_module.bf16_calibration("auto", big) and rsq_module.bf16_calibration("bf16", 0)
    with pytest.raises(UsageError, match="calib_dtype='fp16': use auto, fp32 or bf16"):
        resolve(plan_passes("rsq:calib_dtype=fp16"))


def test_short_text_gives_shorter_windows(tmp_path, model_dir):
    """Text too short for samples x seq_len calibrates on as many shorter windows (>= 64 tokens):
    600 ids hold 4 windows of 128, and 4 + 4 held-out windows of 64 are asked for."""
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, 600))
    captured = tokopt.capture(model_dir("llama"))
    captured.calib = str(ids)
    out = PassManager(resolve(plan_passes("rsq:samples=4,seq_len=128,group_size=16"))).run(captured)
    assert out.history[-1]["stats"]["calibration"] == "4 windows of 64 tokens"


@pytest.mark.slow
def test_generation_graph(tmp_path, model_dir):
    """On a --generate graph values stay unrotated (the cache keeps the model's layout), the
    exporter checks prefill and decode steps against the graph, and the bundle decodes."""
    res = tokopt.compile(model_dir("llama"), out=tmp_path / "g", generate=True, measure=False,
                         passes="rsq:solver=rtn,importance=none,group_size=16")
    stats = res.report["passes"][-1]["stats"]
    assert stats["rotation"]["head_rotations"] == 0 and stats["rotation"]["online_rotations"] == 2
    assert res.program.count(MATMUL_NBITS.overload) == 2 * 7 + 1
    ids = np.random.default_rng(1).integers(10, 256, (2, 7))
    assert tokopt.load(res.bundle).generate(input_ids=ids, max_new_tokens=5).shape == (2, 12)


@pytest.mark.slow
def test_standard_onnx_for_tensorrt(tmp_path, model_dir):
    """The TensorRT path's ONNX: no contrib ops, weights as INT4 initializers behind blocked
    DequantizeLinear, and it reproduces the graph (checked by the exporter against the program)."""
    from tokopt.backends.onnxruntime import export_onnx
    program = PassManager(resolve(plan_passes("rsq:solver=rtn,importance=none,group_size=16"))).run(
        tokopt.capture(model_dir("llama")))
    info = export_onnx(program, tmp_path / "m.onnx", fusions=False,
                       check_feeds=[{k: v.numpy() for k, v in feed_for("llama", 2, 11).items()}])
    assert info["standardized"] == {"tokopt::matmul_nbits": 2 * 7 + 1, "tokopt::embedding_q8": 1}
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert not [n for n in m.graph.node if n.domain not in ("", "ai.onnx")]
    int4 = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 2 * 7 and sum(n.op_type == "DequantizeLinear" for n in m.graph.node) == 2 * 7 + 1 + 1


@pytest.mark.slow
def test_bad_requests(tmp_path, model_dir, minilm_dir):
    with pytest.raises(UsageError, match="bits=3 is not supported"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "a", passes="rsq:bits=3")
    with pytest.raises(UsageError, match="group_size=48 must be a power of two"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "b", passes="rsq:group_size=48")
    with pytest.raises(UsageError, match="calibration needs token ids.*which needs no data"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "c", passes="rsq")
    with pytest.raises(UsageError, match="calibration needs token ids.*activations, whose ranges come from data"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "c", passes="rsq:bits=8,act_bits=8,solver=rtn,importance=none,"
                                                                      "rotate=off")
    with pytest.raises(UsageError, match="rotate=on, but this graph cannot be rotated: 3 embedding"):
        tokopt.compile(minilm_dir, out=tmp_path / "d", passes="rsq:rotate=on,solver=rtn,importance=none")
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x + 1\n" * 200)
    with pytest.raises(UsageError, match=r"holds 2 windows of 1024 tokens; samples=40"):  # 2200 tokens
        tokopt.compile(REFERENCE_LM, out=tmp_path / "e", passes="rsq:samples=40,seq_len=1024", calib=short)
    with pytest.raises(UsageError, match="head_bits=4: use 8 or 4, with embed_bits=8"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "f", passes="rsq:embed_bits=0,head_bits=4,solver=rtn")
    assert not any((tmp_path / n).exists() for n in "abcdef")


@pytest.mark.parametrize("k", [64, 40])
def test_int8_compute_keeps_its_rounding_in_standard_onnx(tmp_path, k):
    """A MatMulNBits at accuracy level 4 rounds its activations to int8 per block; its standard
    form (TensorRT, OpenVINO) does the same rounding with standard ops, so it still reproduces the
    reference (a padded last block included), where plain DequantizeLinear + MatMul would not."""
    import onnx_ir as ir
    import onnxruntime as ort
    g = torch.Generator().manual_seed(k)
    n, bs = 24, 16
    qw = pack(torch.randint(0, 16, (n, k), generator=g), 4, bs)
    sc = torch.rand(n, -(-k // bs), generator=g) * 0.1

    class M(torch.nn.Module):
        def forward(self, x):
            return MATMUL_NBITS.op(x, qw, sc, None, 4, bs, k, n, 4)

    x = torch.randn(2, 5, k, generator=g) * 3
    ep = torch.export.export(M(), (x,), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    model = torch.onnx.export(for_onnx(ep), dynamo=True, opset_version=OPSET, optimize=False, input_names=["x"],
                              custom_translation_table=onnx_translation_table()).model
    onnxscript.optimizer.optimize(model)  # as export_onnx does: folds the scales' reshape
    assert standardize(model) == {"tokopt::matmul_nbits": 1}
    ir.save(model, tmp_path / "m.onnx")
    x2 = torch.randn(3, 7, k, generator=g) * 3
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x2.numpy()})
    want, plain = M()(x2), x2 @ dequantize(qw, sc, 4, k).T
    assert np.abs(got[0] - want.numpy()).max() < 1e-4 < (want - plain).abs().max()


W8A8 = "rsq:bits=8,act_bits=8,solver=rtn,importance=none,samples=4,seq_len=64"


def test_w8a8_structure_and_integer_kernels(tmp_path, model_dir):
    """act_bits=8: every body linear becomes linear_w8a8 (int8 weights [K, N], a static uint8
    activation scale); SmoothQuant adds one multiply per distinct input, bias correction moves
    biases; ONNX Runtime's optimized graph runs the QDQ pattern as MatMulIntegerToFloat (checked
    in the session's own optimized model), within int8 rounding of the graph."""
    import onnxruntime as ort
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, (8, 64)))
    res = tokopt.compile(model_dir("bert"), out=tmp_path / "b", passes=W8A8, calib=ids, measure=False)
    stats = res.report["passes"][-1]["stats"]
    layers = 2
    assert res.program.count(LINEAR_W8A8.overload) == 6 * layers == stats["bias_corrected"]
    assert stats["smoothed"] == 4 * layers and stats["activations"]["tensors"] == 4 * layers
    assert res.program.count(MATMUL_NBITS.overload) == 1  # the pooler, a head: weights only
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(res.bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ops = onnx_ops(onnx.load(str(tmp_path / "opt.onnx")).graph)
    # q/k/v fused at lowering (one grid, one input): four integer matmuls a layer
    assert ops.count("MatMulIntegerToFloat") == 4 * layers and "MatMul" not in ops
    assert res.manifest["lowering"]["fused_projections"] == layers
    feed = feed_for("bert", 2, 13)
    got = tokopt.load(res.bundle)(**{k: v.numpy() for k, v in feed.items()})["last_hidden_state"]
    with torch.no_grad():
        graph = res.program.module(**feed)["last_hidden_state"].numpy()
        eager = _canonical(model_dir("bert")).module(**feed)["last_hidden_state"].numpy()
    mask = feed["attention_mask"].bool().numpy()
    assert np.abs(got - graph)[mask].max() < 0.05 * np.abs(graph).max()  # int8 rounding flips only
    assert np.abs(graph - eager)[mask].max() < 0.1 * np.abs(eager).max()


def test_token_adaptive_rows():
    """outlier_rows finds the largest tokens (either sign; all of them when fewer than K); a token
    past the grid, divided by its row_factors, quantized and multiplied back, keeps int8's
    relative error, where the shared grid clips it (and leaves every other token as it was)."""
    from tokopt.optimizer.ops.int8 import outlier_rows, quantize_activation_range, row_factors, scale_rows
    x = torch.zeros(2, 5, 3)
    x[0, 3, 1], x[0, 1, 0], x[1, 0, 2], x[1, 4, 1] = 9.0, -7.0, 5.0, -8.0
    rows = outlier_rows(x, 2)
    assert sorted(rows[0].tolist()) == [1, 3] and sorted(rows[1].tolist()) == [0, 4]
    assert outlier_rows(x[:, :1], 2).shape == (2, 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 64, generator=g)
    x[0, 5] *= 20                                          # one outlier token
    w = torch.randint(-127, 128, (64, 32), generator=g, dtype=torch.int8)
    ws = torch.full((32,), 0.01)
    rest = torch.cat([x[0, :5], x[0, 6:]])
    scale, zero = quantize_activation_range(float(rest.min()), float(rest.max()))
    s, z = torch.tensor(scale), torch.tensor(zero, dtype=torch.uint8)
    exact = x @ (w.float() * ws)
    shared = LINEAR_W8A8.overload(x, w, ws, s, z, None)
    r = row_factors(x, -zero * scale, (255 - zero) * scale)
    assert torch.equal(row_factors(-x.abs(), 0.0, 0.0), torch.ones(1, 16, 1))  # a grid of one point: no scaling
    others = torch.arange(16) != 5
    assert r[0, 5, 0] > 10 and (r[0, others] - 1).abs().max() < 0.01  # the grid's edge rounds by < 1%
    adaptive = scale_rows(LINEAR_W8A8.overload(x / r, w, ws, s, z, None), r, None)
    err = lambda y: ((y - exact).norm(dim=-1) / exact.norm(dim=-1))[0]  # noqa: E731
    assert err(adaptive)[5] < 0.02 < 0.3 < err(shared)[5]  # the outlier token: clipped vs on its own scale
    assert err(adaptive)[others].max() < 0.02 and torch.equal(adaptive[0, :5], shared[0, :5])  # the rest: as before


def test_w8a8_outlier_tokens(tmp_path, model_dir, monkeypatch):
    """outlier_tokens=2: each token-adaptive input is divided by its per-token factors before the
    static grid and its GEMM's rows multiplied back; the GEMMs stay MatMulIntegerToFloat in ONNX
    Runtime; the bundle follows the graph at unseen lengths, one token (fewer than K) too.
    Random weights have no outlier tokens, so the threshold is lowered to take every input."""
    import onnxruntime as ort

    from tokopt.passes import rsq
    monkeypatch.setattr(rsq, "OUTLIER_SPREAD", 1.0)
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, (8, 64)))
    res = tokopt.compile(model_dir("bert"), out=tmp_path / "b", passes=W8A8 + ",outlier_tokens=2", calib=ids,
                         measure=False)
    stats = res.report["passes"][-1]["stats"]
    layers = 2
    assert stats["activations"]["outlier_tokens"] == {"tokens": 2, "inputs": 4 * layers}
    assert res.program.count(LINEAR_W8A8.overload) == 6 * layers == stats["bias_corrected"]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(res.bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ops = onnx_ops(onnx.load(str(tmp_path / "opt.onnx")).graph)
    # q/k/v read one scaled input and fuse at lowering: four integer matmuls a layer
    assert ops.count("MatMulIntegerToFloat") == 4 * layers and ops.count("Div") >= 4 * layers
    assert ops.count("ReduceMax") >= 4 * layers
    run = tokopt.load(res.bundle)
    for n in (13, 1):
        feed = feed_for("bert", 2, n)
        got = run(**{k: v.numpy() for k, v in feed.items()})["last_hidden_state"]
        with torch.no_grad():
            graph = res.program.module(**feed)["last_hidden_state"].numpy()
        mask = feed["attention_mask"].bool().numpy()
        assert np.abs(got - graph)[mask].max() < 0.05 * np.abs(graph).max()  # int8 rounding flips only


def test_w8a8_bad_requests(tmp_path, model_dir):
    with pytest.raises(UsageError, match=r"act_bits=8: use 0 \(float activations\) or 8 with bits=8"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "a", passes="rsq:act_bits=8")
    with pytest.raises(UsageError, match=r"smooth=1.0 must be in \[0, 1\)"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "b", passes="rsq:bits=8,act_bits=8,smooth=1")
    with pytest.raises(UsageError, match=r"outlier_tokens=2: use 0 \(off\) or K >= 1 with act_bits=8"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "c", passes="rsq:bits=8,outlier_tokens=2")
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_w8a8_keeps_minilm_embeddings(tmp_path, minilm_dir, backend):
    """Trained weights: MiniLM in W8A8 with token-adaptive activations (outlier_tokens=2,
    smooth=0.5: the FFN-down inputs of layers 0-3) keeps its sentence embeddings within cosine
    0.998 of fp32 on passages the calibration never saw (0.9987 measured), on ONNX Runtime's and
    OpenVINO's integer kernels (run together, the second reads the first one's calibration from the
    cache: a calibration does not depend on the backend)."""
    if backend == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'tokopt[openvino]')")
    passes = "rsq:bits=8,act_bits=8,samples=16,seq_len=128,outlier_tokens=2,smooth=0.5"
    res = tokopt.compile(minilm_dir, out=tmp_path / "b", passes=passes, backend=backend, bench_runs=0, bench_len=64,
                         threads=2)   # quality only
    assert res.report["passes"][-1]["stats"]["activations"]["outlier_tokens"]["inputs"] == 4
    assert res.program.count(LINEAR_W8A8.overload) == 6 * 6
    assert res.report["quality"]["embedding_cosine"] > 0.998
