"""Pass specs, options, recipes, ordering, verification and the failure report."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tokopt
from tokopt.optimizer.compile import plan_passes
from tokopt.optimizer.errors import PassError, UsageError
from tokopt.optimizer.pass_manager import (CANONICAL_ATTENTION, PASSES, Pass, PassManager, PassResult, make_options,
                                           parse_pass_spec, resolve)


def test_parse_spec_groups_options_with_their_pass():
    specs = parse_pass_spec("token_prune:keep=0.5,mode=merge,still,rsq:bits=4")
    assert [(s.name, s.options) for s in specs] == [
        ("token_prune", {"keep": "0.5", "mode": "merge"}), ("still", {}), ("rsq", {"bits": "4"})]
    with pytest.raises(UsageError, match="before any pass"):
        parse_pass_spec("keep=0.5")


def test_unknown_pass_did_you_mean():
    with pytest.raises(UsageError, match="Did you mean 'canonicalize'"):
        resolve(parse_pass_spec("canonicalise"))


@dataclass(frozen=True)
class _Opts:
    keep: float = 0.5
    layers: tuple[int, ...] = (1, 2)
    exact: bool = False

    def __post_init__(self):
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep={self.keep} must be in (0, 1]")


class _Scale(Pass):
    """Multiplies every float output by 2: a deliberately wrong 'exact' pass."""
    name = "scale_outputs"
    Options = _Opts
    requires = (CANONICAL_ATTENTION,)
    tolerance = 1e-4

    def call(self, program):
        rw = program.rewrite()
        outputs = rw.outputs
        first = next(iter(outputs))
        with rw.graph.inserting_before(rw.graph.output_node()):
            doubled = rw.graph.call_function(torch.ops.aten.mul.Tensor, (outputs[first], 2.0))
        rw.set_outputs({**outputs, first: doubled})
        return PassResult(rw.commit("scale_outputs"), True, {"doubled": 1})


@pytest.fixture
def scale_pass(monkeypatch):
    monkeypatch.setitem(PASSES, "scale_outputs", _Scale)
    return _Scale


def test_options_typed_and_validated(scale_pass):
    opts = make_options(scale_pass, {"keep": "0.7", "layers": "3/4", "exact": "yes"})
    assert opts == _Opts(0.7, (3, 4), True)
    with pytest.raises(UsageError, match="has no option 'kep'.*Did you mean 'keep'"):
        make_options(scale_pass, {"kep": "1"})
    with pytest.raises(UsageError, match="must be in"):
        make_options(scale_pass, {"keep": "1.5"})
    with pytest.raises(UsageError, match="not a valid float"):
        make_options(scale_pass, {"keep": "lots"})


def test_requirements_are_added_and_ordered(scale_pass):
    order = [p.name for p in resolve(parse_pass_spec("scale_outputs"))]
    assert order == ["canonicalize", "scale_outputs"]


def test_recipe(tmp_path, scale_pass):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - canonicalize\n  - scale_outputs: {keep: 0.25}\n")
    specs = plan_passes(recipe=recipe)
    passes = resolve(specs)
    assert passes[1].options.keep == 0.25
    (tmp_path / "bad.yaml").write_text("steps: []\n")
    with pytest.raises(UsageError, match="'passes:' list"):
        plan_passes(recipe=tmp_path / "bad.yaml")


def test_verify_names_failing_pass_and_dumps(model_dir, scale_pass, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKOPT_DUMP_DIR", str(tmp_path / "dump"))
    prog = tokopt.capture(model_dir("bert"))
    with pytest.raises(PassError) as e:
        PassManager(resolve(parse_pass_spec("scale_outputs")), verify=True).run(prog)
    msg = str(e.value)
    assert "pass 'scale_outputs' (run after canonicalize)" in msg and "moved by" in msg
    assert (tmp_path / "dump" / "01-before-scale_outputs.txt").exists()
    assert "--passes canonicalize,scale_outputs" in msg
    # without verification the same pass runs; the manager records its stats
    out = PassManager(resolve(parse_pass_spec("scale_outputs")), verify=False).run(prog)
    assert out.history[-1]["stats"] == {"doubled": 1}


@pytest.mark.parametrize("spec,message", [
    ("token_prune", "token_prune needs recognised attention blocks and found none"),
    ("tca:uniform=0.5", "tca needs recognised attention blocks and found none"),
    ("still", "still needs recognised attention blocks and found none"),
    ("rsq:solver=rtn,importance=none", r"no linear layers .* before the output head \(1, which"),
])
def test_passes_refuse_a_model_without_attention(tmp_path, spec, message):
    """A plain MLP exports fine; every attention pass names itself and says why it cannot apply."""
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())
    with pytest.raises(UsageError, match=message):
        tokopt.compile(mlp, (torch.randn(2, 8),), out=tmp_path / "b", passes=spec, measure=False)
    assert not (tmp_path / "b").exists()
