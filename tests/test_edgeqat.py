"""EdgeQAT: the per-token quantizer ops (reference, gradients, QDQ lowering), the trained pass on
the reference LM, and its refusals."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch.export import Dim

import tokopt
from tokopt.backends.onnxruntime import for_onnx
from tokopt.optimizer.errors import UsageError
from tokopt.optimizer.ops import OPSET, onnx_translation_table
from tokopt.optimizer.ops.quantizers import ACT_QUANT, LOW_TOKENS, TOKEN_QUANT, WEIGHT_QUANT
from tokopt.optimizer.ops.nbits import MATMUL_NBITS

from .conftest import REFERENCE_LM


def _export(module, example, dynamic, path, names):
    ep = for_onnx(torch.export.export(module, example, dynamic_shapes=dynamic, strict=False))
    torch.onnx.export(ep, dynamo=True, opset_version=OPSET, optimize=False, input_names=names,
                      custom_translation_table=onnx_translation_table()).save(str(path))
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("signed,token_dim", [(True, 1), (False, 1), (True, 2)])
def test_act_quant_lowers_to_qdq(tmp_path, signed, token_dim):
    """8-bit tokens and 4-bit tokens side by side; QuantizeLinear/DequantizeLinear + Where in
    ONNX Runtime give exactly the reference's values (the reference does QuantizeLinear's
    arithmetic, so no rounding decision differs)."""
    s_hi, z_hi, s_lo, z_lo = (torch.tensor([v]) for v in (0.02, 3.0 if not signed else 0.0, 0.3, 1.0))

    class M(torch.nn.Module):
        def forward(self, x, low):
            return ACT_QUANT.op(x, low, s_hi, z_hi, s_lo, z_lo, 8, 4, signed, token_dim)

    shape = (2, 9, 16) if token_dim == 1 else (2, 3, 9, 16)
    x = torch.randn(*shape) * 2 + (0 if signed else 2.5)
    x = x if signed else x.clamp_min(0)
    low = torch.rand(2, 9) < 0.5
    dyn = ({0: Dim.AUTO, token_dim: Dim.AUTO}, {0: Dim.AUTO, 1: Dim.AUTO})
    sess = _export(M(), (x, low), dyn, tmp_path / "a.onnx", ["x", "low"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "a.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Where", "Clip"} <= ops
    ref = M()(x, low)
    got = sess.run(None, {"x": x.numpy(), "low": low.numpy()})[0]
    np.testing.assert_array_equal(got, ref.numpy())
    # the low tokens really sit on a 4-bit grid: at most 16 distinct values
    sel = low[:, :, None].expand_as(x) if token_dim == 1 else low[:, None, :, None].expand_as(x)
    assert len(torch.unique(ref[sel])) <= 16 and len(torch.unique(ref[~sel])) > 16


@pytest.mark.parametrize("token_dim", [1, 2])
def test_token_quant_lowers_to_per_row_qdq(tmp_path, token_dim):
    """Dynamic per-token scales: QuantizeLinear/DequantizeLinear over the rows, exact in ORT;
    each low token's row holds at most 15 distinct values (4 bits, symmetric)."""
    class M(torch.nn.Module):
        def forward(self, x, low):
            return TOKEN_QUANT.op(x, low, 8, 4, token_dim)

    shape = (2, 9, 16) if token_dim == 1 else (2, 3, 9, 16)
    x = torch.randn(*shape) * torch.rand(*shape[:-1], 1) * 5
    low = torch.rand(2, 9) < 0.5
    sess = _export(M(), (x, low), ({0: Dim.AUTO, token_dim: Dim.AUTO}, {0: Dim.AUTO, 1: Dim.AUTO}),
                   tmp_path / "t.onnx", ["x", "low"])
    x2, low2 = torch.randn(*shape[:token_dim], 13, *shape[token_dim + 1:]), torch.rand(2, 13) < 0.5
    ref = M()(x2, low2)
    np.testing.assert_array_equal(sess.run(None, {"x": x2.numpy(), "low": low2.numpy()})[0], ref.numpy())
    rows = ref.reshape(-1, 16)
    marks = (low2[:, :, None] if token_dim == 1 else low2[:, None, :, None]).expand(*ref.shape[:-1], 1).reshape(-1)
    assert max(len(torch.unique(r)) for r in rows[marks]) <= 15 < max(len(torch.unique(r)) for r in rows[~marks])


def test_quantizers_train_through_straight_through_estimates():
    x = torch.randn(2, 5, 8, requires_grad=True)
    s = [torch.tensor([v], requires_grad=True) for v in (0.05, 0.0, 0.5, 0.0)]
    ACT_QUANT.op(x, torch.rand(2, 5) < 0.5, *s, 8, 4, True, 1).square().sum().backward()
    assert x.grad.abs().sum() > 0 and s[0].grad is not None and s[2].grad.abs() > 0
    w = torch.randn(6, 8, requires_grad=True)
    sw = torch.tensor([0.3], requires_grad=True)
    WEIGHT_QUANT.op(w, sw, 4).sum().backward()
    assert w.grad.abs().sum() > 0 and sw.grad.abs() > 0


def test_low_tokens_lowering(tmp_path):
    """The token split (first-token logits summed over heads, lowest fraction) in ONNX (TopK +
    ScatterElements) equals the reference, GQA and lengths the export never saw included."""
    class M(torch.nn.Module):
        def forward(self, q, k):
            return LOW_TOKENS.op(q, k, 0.25, 0.5)

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    dyn = ({0: Dim.AUTO, 2: Dim.AUTO}, {0: Dim.AUTO, 2: Dim.AUTO})
    sess = _export(M(), (q, k), dyn, tmp_path / "l.onnx", ["q", "k"])
    for n in (7, 33, 2):
        q, k = torch.randn(3, 4, n, 8, generator=g), torch.randn(3, 2, n, 8, generator=g)
        ref = M()(q, k)
        assert int(ref.sum()) == 3 * (n // 2)
        np.testing.assert_array_equal(sess.run(None, {"q": q.numpy(), "k": k.numpy()})[0], ref.numpy())


@pytest.fixture(scope="module")
def edgeqat_lm(tmp_path_factory):
    out = tmp_path_factory.mktemp("edgeqat") / "bundle"
    # measure=False: the export itself checks the ONNX model against the graph on probe inputs
    return tokopt.compile(REFERENCE_LM, out=out, passes="edgeqat:steps=10,eval_windows=4",
                          calib=REFERENCE_LM / "heldout.txt", measure=False)


@pytest.mark.slow
def test_edgeqat_on_the_reference_lm(edgeqat_lm):
    """Per layer: attention input, q, k, v, MLP input and intermediate quantized, one token split
    per layer, every body linear a packed W4 matmul; a dozen training steps already lower the
    held-out perplexity of the quantized model; ONNX Runtime reproduces it (checked at export)."""
    program, stats = edgeqat_lm.program, edgeqat_lm.report["passes"][-1]["stats"]
    nodes = list(program.graph.nodes)
    assert sum(TOKEN_QUANT.matches(n) for n in nodes) == 6 * 4 and sum(LOW_TOKENS.matches(n) for n in nodes) == 4
    assert program.count(MATMUL_NBITS.overload) == 7 * 4 and not any(WEIGHT_QUANT.matches(n) for n in nodes)
    assert stats["average_activation_bits"] == 6.0
    assert stats["perplexity_edgeqat"] < stats["perplexity_before_training"]
    assert stats["loss_last"] < stats["loss_first"]
    ops = [n.op_type for n in onnx.load(str(edgeqat_lm.bundle / "model.onnx")).graph.node]
    # per layer q/k/v and gate/up fused at lowering (each group reads one quantized input): 4 of 7
    assert ops.count("MatMulNBits") == 4 * 4 and ops.count("TopK") == 4 and ops.count("QuantizeLinear") >= 24 * 2 - 4


def test_training_is_deterministic(tmp_path, model_dir):
    """Same data, options and seed: the same trained weights and quantizer scales, bit for bit."""
    from tokopt.optimizer.compile import plan_passes
    from tokopt.optimizer.pass_manager import PassManager, resolve
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, (12, 32)))
    captured = tokopt.capture(model_dir("llama"))
    captured.calib = str(ids)
    states = [PassManager(resolve(plan_passes("edgeqat:steps=3,batch=2,seq_len=32,eval_windows=2"))).run(captured)
              .ep.state_dict for _ in range(2)]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_bad_requests(tmp_path, model_dir, minilm_dir):
    with pytest.raises(UsageError, match="2 <= low_bits <= a_bits <= 8"):
        tokopt.compile(REFERENCE_LM, out=tmp_path / "a", passes="edgeqat:a_bits=4,low_bits=6")
    with pytest.raises(UsageError, match="this graph is 'encoder'"):
        tokopt.compile(minilm_dir, out=tmp_path / "b", passes="edgeqat")
    with pytest.raises(UsageError, match="cannot run on a --generate graph"):
        tokopt.compile(REFERENCE_LM, out=tmp_path / "c", passes="edgeqat", generate=True)
    with pytest.raises(UsageError, match="edgeqat trains on data"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "d", passes="edgeqat")
    assert not any((tmp_path / n).exists() for n in "abcd")
