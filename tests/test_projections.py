"""Sibling projections fused at lowering: linears reading one input become one wider linear and a
split, for float, W8A8 and matmul_nbits weights alike; what reads another input, or another
activation grid, stays apart."""
from __future__ import annotations

import onnx
import pytest
import torch

import tokopt
from tokopt.backends import projections
from tokopt.backends.projections import fuse_projections
from tokopt.optimizer.ops import LINEAR_W8A8
from tokopt.optimizer.ops.nbits import MATMUL_NBITS, pack

from .conftest import feed_for, onnx_ops

aten = torch.ops.aten


class Siblings(torch.nn.Module):
    """q/k/v-like float linears on x (one with a bias, two without), a float linear on another
    tensor, two W8A8 linears on one grid and a third on another grid, two int4 linears."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(32, n, bias=b) for n, b in ((32, True), (16, False), (16, False)))
        self.other = torch.nn.Linear(32, 8)
        for name in ("w1", "w2", "w3"):
            self.register_buffer(name, torch.randint(-127, 128, (32, 24), dtype=torch.int8, generator=g))
            self.register_buffer(f"{name}_scale", torch.rand(24, generator=g) * 0.01)
        self.register_buffer("b1", torch.randn(24, generator=g))
        self.register_buffer("xs", torch.tensor(0.05))
        self.register_buffer("xs3", torch.tensor(0.07))
        self.register_buffer("xz", torch.tensor(128, dtype=torch.uint8))
        for name in ("n1", "n2"):
            self.register_buffer(name, pack(torch.randint(0, 16, (40, 32), generator=g), 4, 16))
            self.register_buffer(f"{name}_scale", torch.rand(40, 2, generator=g) * 0.1)

    def forward(self, x):
        h = self.q(x) + torch.cat([self.k(x), self.v(x)], -1)
        y = self.other(h)
        w8 = [LINEAR_W8A8.op(h, self.w1, self.w1_scale, self.xs, self.xz, self.b1),
              LINEAR_W8A8.op(h, self.w2, self.w2_scale, self.xs, self.xz, None),
              LINEAR_W8A8.op(h, self.w3, self.w3_scale, self.xs3, self.xz, None)]
        nb = [MATMUL_NBITS.op(x, w, s, None, 4, 16, 32, 40) for w, s in ((self.n1, self.n1_scale),
                                                                       (self.n2, self.n2_scale))]
        return y, *w8, *nb


@pytest.mark.parametrize("mapped", [False, True])
def test_sibling_projections_fuse_into_one_each(monkeypatch, mapped):
    """Three groups fuse (q/k/v, the two W8A8 linears on one grid, the two int4 ones); the linear on
    another input and the W8A8 linear on another grid stay. Outputs within 1e-5 (one wider GEMM
    sums in another order). ``mapped``: every fused weight counts as large, so it is mapped from a
    file (as a large model's are), and the graph holds those mappings."""
    monkeypatch.setattr(projections, "MAPPED_BYTES", 0 if mapped else projections.MAPPED_BYTES)
    program = tokopt.capture(Siblings().eval(), {"x": torch.randn(2, 5, 32)})
    fused, count = fuse_projections(program)
    tensors = [*fused.ep.state_dict.values(), *fused.ep.constants.values()]
    assert sum(t.untyped_storage().filename is not None for t in tensors) == (3 if mapped else 0)
    assert count == 3
    assert program.count(aten.linear.default) == 4 and fused.count(aten.linear.default) == 2
    assert program.count(LINEAR_W8A8.overload) == 3 and fused.count(LINEAR_W8A8.overload) == 2
    assert program.count(MATMUL_NBITS.overload) == 2 and fused.count(MATMUL_NBITS.overload) == 1
    assert fused.count(aten.split_with_sizes.default) == 3
    widths = sorted(tuple(n.meta["val"].shape[-1] for n in fused.graph.nodes if n.op == "call_function"
                          and (n.target == aten.linear.default or LINEAR_W8A8.matches(n) or MATMUL_NBITS.matches(n))))
    assert widths == [8, 24, 48, 64, 80]   # other, the lone W8A8, the W8A8 pair, q/k/v, the int4 pair
    x = torch.randn(3, 11, 32)
    want, got = program.run({"x": x}), fused.run({"x": x})
    assert list(want) == list(got)
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-5, rtol=1e-5), name
    assert fuse_projections(fused)[1] == 0   # nothing left to fuse


@pytest.mark.parametrize("family, generate, groups", [("bert", False, 2), ("llama", True, 2)])
def test_lowered_graphs_run_fused_projections(tmp_path, model_dir, family, generate, groups):
    """Through the ONNX Runtime lowering: an encoder's q/k/v per layer, a Llama's q/k/v and
    gate/up per layer; a generation graph packs q/k/v for GroupQueryAttention already, so its
    gate/up fuse (a full forward's q/k/v too: tests/test_rsq.py counts the reference LM's). One MatMul per group instead of its members, and the bundle matches eager."""
    res = tokopt.compile(model_dir(family), out=tmp_path / "b", measure=False, generate=generate)
    assert res.manifest["lowering"]["fused_projections"] == groups
    ops = onnx_ops(onnx.load(str(res.bundle / "model.onnx")).graph)
    linears = sum(n.target == aten.linear.default for n in res.program.graph.nodes)
    merged = 2 * (2 if family == "bert" else 3)   # 2 layers: q/k/v are one of three, gate/up one of two
    assert linears == (13 if family == "bert" else 15)
    assert ops.count("MatMul") + ops.count("Gemm") == linears - merged
    assert ops.count("Split") >= groups
    if not generate:
        feed = feed_for(family, 2, 19)
        got = tokopt.load(res.bundle)(**{k: v.numpy() for k, v in feed.items()})
        with torch.no_grad():
            ref = res.program.module(**feed)
        main = "logits" if "logits" in got else "last_hidden_state"
        keep = feed["attention_mask"].bool().numpy()
        assert abs(got[main] - ref[main].numpy())[keep].max() < 1e-4
