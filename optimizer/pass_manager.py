"""Passes, their registry, option parsing and the manager that runs and verifies them.

A pass is a small class: ``name``, a frozen ``Options`` dataclass (defaults + validation in
``__post_init__``), ``requires`` (passes that must run first), ``call(program) ->
PassResult(program, modified, stats)`` and ``ensures(program)``. The manager orders passes by
their needs (a networkx DAG, ties broken by the user's order), runs each on a copy, and with
``verify`` checks after every pass: graph lint, the export verifier, the pass's own ``ensures``,
and numerics on the probe batch against the program before the pass (within the pass's
declared ``tolerance``; passes that approximate declare none and only report the error).
"""
from __future__ import annotations

import dataclasses
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import networkx as nx
import torch

from .errors import PassError, TokoptError, UsageError, did_you_mean
from .program import Program

__all__ = ["Pass", "PassResult", "PASSES", "register_pass", "parse_pass_spec", "load_recipe",
           "make_options", "PassManager", "PassSpec", "max_abs_error"]


@dataclass
class PassResult:
    program: Program
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    pass


class Pass:
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[tuple[str, ...]] = ()
    # Max abs error on the probe batch the pass promises against its input; None: approximate.
    tolerance: ClassVar[float | None] = None
    summary: ClassVar[str] = ""

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def call(self, program: Program) -> PassResult:
        raise NotImplementedError

    def ensures(self, program: Program) -> None:
        """Raise PassError if the pass's promise does not hold on ``program``."""


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    PASSES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: dict[str, Any]


def parse_pass_spec(text: str) -> list[PassSpec]:
    """``"token_prune:keep=0.5,mode=merge,still"`` -> two specs. An item with ``=`` and no ``:``
    is another option of the pass before it."""
    specs: list[PassSpec] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if ":" in item:
            name, _, opt = item.partition(":")
            specs.append(PassSpec(name.strip(), {}))
            item = opt
        elif "=" not in item:
            specs.append(PassSpec(item, {}))
            continue
        if not specs:
            raise UsageError(f"option {item!r} comes before any pass name in --passes {text!r}.")
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"{item!r} in --passes is not key=value.")
        specs[-1].options[key.strip()] = value.strip()
    return specs


def load_recipe(path) -> list[PassSpec]:
    """A YAML recipe: ``passes: [name, {name: {opt: value}}, ...]``."""
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read recipe {path}: {e}") from e
    items = (data or {}).get("passes") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise UsageError(f"recipe {path} must have a 'passes:' list.")
    specs = []
    for it in items:
        if isinstance(it, str):
            specs.append(PassSpec(it, {}))
        elif isinstance(it, dict) and len(it) == 1:
            (name, opts), = it.items()
            specs.append(PassSpec(name, dict(opts or {})))
        else:
            raise UsageError(f"recipe {path}: each pass is a name or a one-key mapping, got {it!r}.")
    return specs


def _convert(value, typ, where: str):
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value in (None, "none", "None"):
            return None
        return _convert(value, args[0], where)
    if not isinstance(value, str):
        return value
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ in (int, float, str):
            return typ(value)
        if origin in (tuple, list):
            (inner, *_) = typing.get_args(typ) or (str,)
            return tuple(_convert(v, inner, where) for v in value.replace("/", " ").split())
    except ValueError:
        raise UsageError(f"{where}: {value!r} is not a valid {getattr(typ, '__name__', typ)}.") from None
    return value


def make_options(cls: type[Pass], raw: dict[str, Any]):
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    hints = typing.get_type_hints(cls.Options)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise UsageError(f"pass '{cls.name}' has no option '{key}'.{did_you_mean(key, fields)} "
                             f"Its options: {', '.join(fields) or 'none'}.")
        values[key] = _convert(value, hints[key], f"{cls.name}:{key}")
    try:
        return cls.Options(**values)
    except (ValueError, TypeError) as e:
        raise UsageError(f"pass '{cls.name}': {e}") from e


def resolve(specs: list[PassSpec]) -> list[Pass]:
    """Instantiate and order passes; missing requirements are added with default options."""
    wanted: dict[str, PassSpec] = {}
    for s in specs:
        if s.name not in PASSES:
            raise UsageError(f"unknown pass '{s.name}'.{did_you_mean(s.name, PASSES)} "
                             f"Known passes: {', '.join(sorted(PASSES))} (see `tokopt passes`).")
        if s.name in wanted:
            raise UsageError(f"pass '{s.name}' is listed twice.")
        wanted[s.name] = s
    graph = nx.DiGraph()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        graph.add_node(name)
        for req in PASSES[name].requires:
            graph.add_edge(req, name)
            if req not in wanted:
                wanted[req] = PassSpec(req, {})
                todo.append(req)
    user_order = {n: i for i, n in enumerate(wanted)}
    try:
        order = list(nx.lexicographical_topological_sort(graph, key=lambda n: user_order[n]))
    except nx.NetworkXUnfeasible:
        raise UsageError("the passes' requirements form a cycle.") from None
    return [PASSES[n](make_options(PASSES[n], wanted[n].options)) for n in order]


def max_abs_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    err = 0.0
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape:
            return float("inf")
        if x.is_floating_point():
            err = max(err, float((x - y).abs().max()) if x.numel() else 0.0)
        else:
            err = max(err, float((x != y).any()))
    return err


class PassManager:
    def __init__(self, passes: list[Pass], verify: bool = False, source_hint: str = "MODEL"):
        self.passes, self.verify, self.source_hint = passes, verify, source_hint

    def _dump(self, program: Program, index: int, failing: Pass) -> str:
        out = Path(os.environ["TOKOPT_DUMP_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{index:02d}-before-{failing.name}"
        (out / f"{stem}.txt").write_text(program.ep.graph_module.print_readable(print_output=False))
        before = ",".join(p.name for p in self.passes[:index + 1])
        return (f" The graph before it is in {out / stem}.txt; reproduce with: "
                f"tokopt compile {self.source_hint} --passes {before} --verify-each --debug")

    def _fail(self, program, i, p, what: str, cause: BaseException | None = None):
        before = [q.name for q in self.passes[:i]]
        where = f"after {', '.join(before)}" if before else "as the first pass"
        extra = self._dump(program, i, p) if os.environ.get("TOKOPT_DUMP_DIR") else \
            " Set TOKOPT_DUMP_DIR to write the graph before the failing pass."
        raise PassError(f"pass '{p.name}' (run {where}) failed: {what}.{extra}") from cause

    def check(self, p: Pass, before: Program, after: Program, ref: dict) -> float | None:
        after.graph.lint()
        try:
            after.ep.validate()
        except Exception as e:
            raise PassError(f"the export verifier rejects the graph: {e}") from e
        p.ensures(after)
        got = after.run()
        if any(got[k].shape != ref[k].shape for k in ref):
            if p.tolerance is not None:
                raise PassError("the pass promises to be exact but changed an output's shape")
            return None  # a token-count-changing pass: nothing to compare element-wise
        err = max_abs_error(ref, got)
        if p.tolerance is not None and not err <= p.tolerance:
            raise PassError(f"probe outputs moved by {err:.3g}, more than the pass promises "
                            f"({p.tolerance:g})")
        return err

    def run(self, program: Program) -> Program:
        for i, p in enumerate(self.passes):
            started = time.perf_counter()
            try:
                ref = program.run() if self.verify else None
                result = p.call(program.copy())
                result.program.sync_signature()
                err = self.check(p, program, result.program, ref) if self.verify else None
            except UsageError:
                raise  # an option the program rules out: the user's to fix, not the pass's
            except TokoptError as e:
                self._fail(program, i, p, str(e).rstrip("."), e)
            except Exception as e:  # a bug in a pass: still name it and what ran before
                self._fail(program, i, p, f"{type(e).__name__}: {e}", e)
            program = result.program
            program.history.append({
                "name": p.name, "options": dataclasses.asdict(p.options), "modified": result.modified,
                "stats": result.stats, "seconds": round(time.perf_counter() - started, 3),
                **({"probe_max_abs_error": err} if self.verify else {})})
        return program
