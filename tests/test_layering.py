"""The layers of ../shared/DESIGN.md, read from the imports: optimizer/ (the core, ops included)
<- passes/, calibration/, backends/ <- cli.py. No passes <-> backends, no core -> outer layer,
no calibration -> passes|backends, no pass importing another pass, and nobody importing another
module's _private name. Function-level imports count too."""
from __future__ import annotations

import ast
from pathlib import Path

from tokopt.optimizer.pass_manager import PASSES

from .conftest import ROOT

FORBIDDEN = {"passes": {"backends"}, "backends": {"passes"}, "optimizer": {"passes", "backends", "calibration"},
             "calibration": {"passes", "backends"}}


def _modules():
    for folder in FORBIDDEN:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: Path, module: str):
    """(imported module, names) for every import in ``path``, relative ones resolved."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = (node.module or "").removeprefix("tokopt.")
            yield target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("tokopt."):
                    yield a.name.removeprefix("tokopt."), []


def test_imports_respect_the_layers():
    pass_modules = {cls.__module__.removeprefix("tokopt.") for cls in PASSES.values()}
    crossing, private, pass_to_pass = [], [], []
    for path, module in _modules():
        layer = module.split(".")[0]
        for target, names in _imports(path, module):
            top = target.split(".")[0]
            if top in FORBIDDEN[layer]:
                crossing.append(f"{module} -> {target}")
            if target in pass_modules and module in pass_modules and target != module:
                pass_to_pass.append(f"{module} -> {target}")
            private += [f"{module}: {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not crossing, f"imports crossing the layers: {crossing}"
    assert not pass_to_pass, f"passes importing other passes: {pass_to_pass}"
    assert not private, f"imports of another module's private names: {private}"


def test_the_checker_sees_a_violation(tmp_path):
    """The reader resolves relative imports, so a crossing written either way is found."""
    bad = tmp_path / "passes" / "x.py"
    bad.parent.mkdir()
    bad.write_text("from ..backends.onnxruntime import make_session\n"
                   "def f():\n    from tokopt.passes.tca import _file_hash\n")
    got = list(_imports(bad, "passes.x"))
    assert ("backends.onnxruntime", ["make_session"]) in got and ("passes.tca", ["_file_hash"]) in got
