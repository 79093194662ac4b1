"""Passes, their registry, option parsing, the planner and the manager that runs and checks them.

A pass is a small class: ``name``, a frozen ``Options`` dataclass (defaults, one line of help
and the valid values per option through ``opt``, validation in ``__post_init__``), ``requires``
(properties of the graph it needs, each naming the pass that establishes it),
``call(program) -> PassResult(program, modified, stats)`` and ``ensures(program, stats)`` (what
it promised, checked on its output). It also declares, for the planner, what it does: replaces
attention (in which ``layers``), quantizes weights, trains float weights, changes the token
count, needs every position's output, runs on ``--generate`` graphs.

``plan`` turns the user's list into an ordered list before anything is loaded: it inserts what
``requires`` names, refuses pairs that cannot compose with the reason (two passes replacing the
same layers' attention, two weight quantizers, a pass that needs every position after one that
drops tokens, a prefill-only pass on a --generate graph), and orders where order matters
(token_prune first: later passes calibrate on the pruned graph; a pass that trains float
weights before one that quantizes them), saying so in its notes.

The manager checks each pass's ``requires`` on the program it receives, runs it, drops every
cached analysis of a program the pass modified (the attention index is recomputed from the new
graph when next read), lints the graph and checks ``ensures``; with ``verify`` it also runs the
export verifier and compares numerics on the probe batch against the program before the pass
(within the pass's declared ``tolerance``; passes that approximate declare none and only report
the error).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import networkx as nx
import torch

from .errors import PassError, TokoptError, UsageError, did_you_mean
from .program import Program
from .resources import stage

__all__ = ["Pass", "PassResult", "PASSES", "register_pass", "parse_pass_spec", "load_recipe", "make_options",
           "PassManager", "PassSpec", "Plan", "plan", "resolve", "max_abs_error", "Property", "opt", "describe_options",
           "CANONICAL_ATTENTION", "ATTENTION_TO_REPLACE", "FLOAT_WEIGHTS", "EVERY_POSITION"]


@dataclass
class PassResult:
    program: Program
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    pass


def opt(default, help: str, values: str = ""):
    """An option field: its default, one line of help and (when not obvious from the type) its
    valid values, all shown by ``tokopt passes``."""
    return field(default=default, metadata={"help": help, "values": values})


def describe_options(cls) -> list[dict]:
    """[{name, type, default, help, values}] of a pass's options."""
    hints = typing.get_type_hints(cls.Options)
    rows = []
    for f in dataclasses.fields(cls.Options):
        typ = hints[f.name]
        name = getattr(typ, "__name__", str(typ)).replace("typing.", "")
        rows.append({"name": f.name, "type": name, "default": f.default, "help": f.metadata.get("help", ""),
                     "values": f.metadata.get("values", "")})
    return rows


@dataclass(frozen=True)
class Property:
    """Something a pass needs of the graph it receives. ``check(program, pass_)`` returns None
    when it holds, else why not (the message a user sees); ``established_by`` is the pass the
    planner inserts to establish it."""
    name: str
    check: Callable[[Program, "Pass"], str | None]
    established_by: str | None = None


def _canonical(program: Program, p: "Pass") -> str | None:
    left = [b.module for b in program.attention if b.spelling in ("sdpa", "eager")]
    return f"attention blocks are not in canonical form yet: {', '.join(left)}" if left else None


def _layer_list(layers) -> str:
    return ", ".join(map(str, sorted(layers)))


def _to_replace(program: Program, p: "Pass") -> str | None:
    canonical = {b.layer for b in program.attention if b.spelling == "canonical"}
    replaced = {b.layer: b.spelling for b in program.attention if b.spelling != "canonical"}
    if not canonical:
        why = (f"every attention was already replaced ({', '.join(sorted(set(replaced.values())))})" if replaced
               else "see `tokopt inspect MODEL` for why each block was refused")
        return f"{p.name} needs recognised attention blocks and found none; {why}."
    wanted = p.layers()
    taken = {layer: replaced[layer] for layer in (wanted or ()) if layer in replaced}
    if taken:
        return (f"{p.name}: the attention of layer{'s' if len(taken) > 1 else ''} {_layer_list(taken)} was already "
                f"replaced ({', '.join(sorted(set(taken.values())))}); choose other layers with layers=.")
    return None


def _float_weights(program: Program, p: "Pass") -> str | None:
    from .ops import MATMUL_NBITS, WEIGHT_QUANT
    if any(MATMUL_NBITS.matches(n) or WEIGHT_QUANT.matches(n) for n in program.graph.nodes):
        return f"{p.name} needs float weights, and this graph's are already quantized."
    return None


def _every_position(program: Program, p: "Pass") -> str | None:
    return None if program.keeps_positions else \
        f"{p.name} needs every position's output, and a pass before it dropped tokens."


CANONICAL_ATTENTION = Property("canonical attention", _canonical, "canonicalize")
ATTENTION_TO_REPLACE = Property("canonical attention in the layers it replaces", _to_replace, "canonicalize")
FLOAT_WEIGHTS = Property("float weights", _float_weights)
EVERY_POSITION = Property("every position's output", _every_position)


class Pass:
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[tuple[Property, ...]] = ()
    # Max abs error on the probe batch the pass promises against its input; None: approximate.
    tolerance: ClassVar[float | None] = None
    summary: ClassVar[str] = ""
    # what the planner reads
    replaces_attention: ClassVar[bool] = False   # puts its own op where tokopt.attention was, in layers()
    quantizes_weights: ClassVar[bool] = False
    trains_weights: ClassVar[bool] = False       # tunes float weights (runs before passes that quantize them)
    changes_tokens: ClassVar[bool] = False       # later layers see fewer tokens
    needs_positions: ClassVar[bool] = False      # reads every position's output
    on_generate: ClassVar[str | None] = None     # why it refuses a --generate graph (None: it runs there)
    # reads weights kept in half precision (through the graph's casts to fp32) and makes its own: a
    # half-precision checkpoint compiled with such passes only is not widened to fp32 first
    half_weights: ClassVar[bool] = False

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def weight_share(self) -> float:
        """The share of its input's fp32 weight bytes the pass's output holds (a runtime's copy of
        them, which the memory check counts before a compile starts)."""
        return 1.0

    def layers(self) -> tuple[int, ...] | None:
        """The attention layers the pass replaces; None: every one it finds."""
        return None

    def call(self, program: Program) -> PassResult:
        raise NotImplementedError

    def for_standard_onnx(self, target: str) -> tuple[Pass, str | None]:
        """This pass for ``target``, whose runtime parses standard ONNX only (TensorRT: no ONNX
        Runtime contrib ops): itself, or a variant and the plan's note saying why; a UsageError
        where the options ask for a contrib kernel."""
        return self, None

    def ensures(self, program: Program, stats: dict) -> None:
        """Raise PassError if the pass's promise does not hold on its output ``program``."""


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


@dataclass
class Plan:
    passes: list[Pass]
    notes: list[str]          # what the planner reordered or added, and why


def _conflict(a: Pass, b: Pass) -> str | None:
    """Why ``a`` and ``b`` cannot both run, or None."""
    if a.replaces_attention and b.replaces_attention:
        la, lb = a.layers(), b.layers()
        both = None if la is None or lb is None else set(la) & set(lb)
        if both is None or both:
            where = f"layers {_layer_list(both)}" if both else "the same layers (neither is limited with layers=)"
            return (f"{a.name} and {b.name} both replace the attention of {where}; choose one per layer: give "
                    f"each layers= with layers the other does not take.")
    if a.quantizes_weights and b.quantizes_weights:
        return f"{a.name} and {b.name} both quantize the weights; choose one."
    for x, y in ((a, b), (b, a)):
        if x.changes_tokens and y.needs_positions:
            return (f"{y.name} needs every position's output (it trains on the next-token loss at each position), "
                    f"which {x.name} removes; choose one.")
    return None


def plan(specs: list[PassSpec], generate: bool = False) -> Plan:
    """Instantiate, check and order passes before anything is loaded (see the module doc)."""
    wanted: dict[str, PassSpec] = {}
    for s in specs:
        if s.name not in PASSES:
            raise UsageError(f"unknown pass '{s.name}'.{did_you_mean(s.name, PASSES)} "
                             f"Known passes: {', '.join(sorted(PASSES))} (see `tokopt passes`).")
        if s.name in wanted:
            raise UsageError(f"pass '{s.name}' is listed twice.")
        wanted[s.name] = s
    graph = nx.DiGraph()
    todo, notes = list(wanted), []
    while todo:
        name = todo.pop()
        graph.add_node(name)
        for prop in PASSES[name].requires:
            req = prop.established_by
            if req is None or req == name:
                continue
            graph.add_edge(req, name)
            if req not in wanted:
                wanted[req] = PassSpec(req, {})
                todo.append(req)
    passes = {n: PASSES[n](make_options(PASSES[n], wanted[n].options)) for n in wanted}
    for p in passes.values():
        if generate and p.on_generate:
            raise UsageError(f"{p.name} cannot run on a --generate graph: {p.on_generate}")
    names = list(passes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            why = _conflict(passes[a], passes[b])
            if why:
                raise UsageError(why)
    user = {n: i for i, n in enumerate(wanted)}
    for a, pa in passes.items():
        for b, pb in passes.items():
            reason = None
            if a != b and pa.changes_tokens and not pb.changes_tokens and b not in graph.predecessors(a):
                reason = f"{a} runs before {b}: {b} then works (and calibrates) on the tokens {a} keeps"
            elif pa.trains_weights and pb.quantizes_weights and not pa.quantizes_weights:
                reason = f"{a} runs before {b}: {a} trains float weights, which {b} then quantizes"
            if reason:
                graph.add_edge(a, b)
                if user[a] > user[b]:
                    notes.append(reason)
    try:
        order = list(nx.lexicographical_topological_sort(graph, key=lambda n: user[n]))
    except nx.NetworkXUnfeasible:
        raise UsageError("the passes' requirements form a cycle.") from None
    return Plan([passes[n] for n in order], notes)


def resolve(specs: list[PassSpec], generate: bool = False) -> list[Pass]:
    """``plan(specs).passes``."""
    return plan(specs, generate).passes


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

    def requirements(self, p: Pass, program: Program) -> None:
        for prop in p.requires:
            why = prop.check(program, p)
            if why is not None:
                raise UsageError(why)

    def check(self, p: Pass, result: PassResult, ref: dict | None) -> float | None:
        after = result.program
        after.graph.lint()
        if result.modified:
            p.ensures(after, result.stats)
        if ref is None:
            return None
        try:
            after.ep.validate()
        except Exception as e:
            raise PassError(f"the export verifier rejects the graph: {e}") from e
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
            with stage(p.name) as cost:
                try:
                    self.requirements(p, program)
                    ref = program.run() if self.verify else None
                    result = p.call(program.copy())
                    if result.modified:
                        result.program.invalidate()  # the attention index and the rest: recomputed when read
                    err = self.check(p, result, ref)
                except UsageError:
                    raise  # an option the program rules out: the user's to fix, not the pass's
                except TokoptError as e:
                    self._fail(program, i, p, str(e).rstrip("."), e)
                except Exception as e:  # a bug in a pass: still name it and what ran before
                    self._fail(program, i, p, f"{type(e).__name__}: {e}", e)
            program = result.program
            program.history.append({
                "name": p.name, "options": dataclasses.asdict(p.options), "modified": result.modified,
                "stats": result.stats, "seconds": cost["seconds"], "peak_rss_bytes": cost["peak_rss_bytes"],
                **({"probe_max_abs_error": err} if self.verify else {})})
        return program
