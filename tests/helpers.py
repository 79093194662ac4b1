"""Helpers: the one that proves a pass (numerics, op counts, idempotence), and a look inside an
AOTInductor package."""
from __future__ import annotations

import zipfile

import torch

from tokopt.optimizer.pass_manager import Pass, PassManager, max_abs_error
from tokopt.optimizer.program import Program


def prove_pass(program: Program, p: Pass, *, target, before: int, after: int, tolerance: float,
               feed: dict[str, torch.Tensor]) -> Program:
    """Run ``p`` with verification; check ``target`` op counts before/after, numerics on
    ``feed`` (a shape the export did not see) within ``tolerance``, and that a second run
    reports ``modified=False``."""
    assert program.count(target) == before, f"expected {before} {target} before, got {program.count(target)}"
    out = PassManager([p], verify=True).run(program)
    assert out.count(target) == after, f"expected {after} {target} after, got {out.count(target)}"
    assert out.history[-1]["modified"] is (before != after)
    err = max_abs_error(program.run(feed), out.run(feed))
    assert err <= tolerance, f"{p.name}: max abs error {err:.3g} > {tolerance}"
    again = p.call(out.copy())
    assert again.modified is False, f"{p.name} is not idempotent"
    return out


def package_text(bundle) -> str:
    """Every text file AOTInductor wrote into a bundle's package (wrapper and kernel C++, metadata)."""
    with zipfile.ZipFile(bundle / "model.pt2") as z:
        return "".join(z.read(n).decode(errors="ignore") for n in z.namelist() if n.endswith((".cpp", ".json")))
