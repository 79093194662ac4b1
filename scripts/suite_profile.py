"""Where the test suite's time goes: a pytest plugin that times each compile stage and the
torch/ONNX calls that dominate it (trace, re-export, ONNX export, decomposition, the ONNX
optimizer), summed over the whole run across xdist workers, printed as a table at the end.

    PYTHONPATH=scripts python -m pytest -q -p suite_profile

Each timed function is wrapped where it is looked up, so calls made from inside the libraries
count as well; nested timings overlap (a stage includes the exports it makes)."""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import tempfile
import time
from pathlib import Path

_TIMES: collections.Counter = collections.Counter()
_CALLS: collections.Counter = collections.Counter()
_DIR = Path(os.environ.get("TOKOPT_SUITE_PROFILE_DIR") or Path(tempfile.gettempdir()) / "tokopt-suite-profile")


def _timed(label: str, fn):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _TIMES[label] += time.perf_counter() - start
            _CALLS[label] += 1
    return timed


def pytest_configure(config):
    import onnxscript.optimizer
    import torch
    from onnxscript.rewriter import ort_fusions

    from tokopt.optimizer import compile as compile_module, pass_manager, resources
    if not hasattr(config, "workerinput"):   # the controller: a fresh folder for the workers' sums
        _DIR.mkdir(parents=True, exist_ok=True)
        for old in _DIR.glob("*.json"):
            old.unlink()
    real_stage = resources.stage

    @contextlib.contextmanager
    def stage(name, *args, **kwargs):
        start = time.perf_counter()
        with real_stage(name, *args, **kwargs) as row:
            yield row
        label = f"stage {name}" if name in ("capture", "passes", "lowering", "measurement") else f"stage pass {name}"
        _TIMES[label] += time.perf_counter() - start
        _CALLS[label] += 1
    compile_module.stage = pass_manager.stage = stage
    for owner, name, label in ((torch.export, "export", "torch.export.export (captures, re-exports)"),
                               (torch.export.ExportedProgram, "run_decompositions", "ExportedProgram.run_decompositions"),
                               (torch.onnx, "export", "torch.onnx.export"),
                               (onnxscript.optimizer, "optimize", "onnxscript optimize"),
                               (ort_fusions, "optimize_for_ort", "onnxscript optimize_for_ort")):
        setattr(owner, name, _timed(label, getattr(owner, name)))


def pytest_sessionfinish(session):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        (_DIR / f"{worker}.json").write_text(json.dumps({"times": _TIMES, "calls": _CALLS}))


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    times, calls = collections.Counter(_TIMES), collections.Counter(_CALLS)
    for path in _DIR.glob("*.json"):
        sums = json.loads(path.read_text())
        times.update(sums["times"])
        calls.update(sums["calls"])
    terminalreporter.section("suite profile (seconds summed over workers; nested timings overlap)")
    for label, seconds in times.most_common():
        terminalreporter.write_line(f"{seconds:8.1f} s  {calls[label]:5d} calls  {label}")
