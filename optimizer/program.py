"""The IR: an ``ExportedProgram`` plus what tokopt knows about it, and the one way to change it.

``Program`` is what every pass takes and returns. Besides the exported graph it carries the
input/output names and dynamic axes the bundle promises, a probe batch for numerics, and the
eager model when the source had one (the quality oracle). Analyses of the graph (the attention
index: one ``AttentionBlock`` per recognised attention, with the reason for every block that was
not recognised) are computed from the graph when first asked for and cached on the Program.

A Program is never edited in place. A pass opens a ``Rewrite`` (``program.rewrite()``): a plain,
runnable ``GraphModule`` copy of the graph (one placeholder per input, weights and buffers as
its own attributes read by ``get_attr`` nodes, a flat output tuple), edits it (nodes, constants,
weight values, inputs and outputs), may run it to calibrate, and ``commit``s: the module is
exported again with ``torch.export`` at the program's probe and dynamic axes, which derives every
node's ``meta["val"]``, the graph signature and the state dict anew, and a new Program comes
back, its analyses computed afresh. (ExecuTorch's ``ExportPass`` re-traces instead; re-export
gives the same guarantee through public torch API only.) An edit that changes no input or output
(canonicalize's swaps, the lowering's projection fusion) opens an ``Edit`` instead: a copy of the
exported graph itself, committed beside the program's signature and weights without a re-export
(a second or more per compile), new nodes' values derived on export's fake tensors. tokopt's own
node annotations live under ``node.meta["custom"]``, which export carries through.
"""
from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

from .errors import PassError, UsageError
from .resources import mapped_releaser, page_out_tensor

__all__ = ["AttentionBlock", "Rejected", "Program", "Rewrite", "Edit", "META_BLOCK", "block_meta", "call_function_nodes",
           "inherit_meta", "remove_dead_code", "stored", "run_paged"]

# node.meta["custom"] key under which passes find what canonicalize read of an attention block
META_BLOCK = "tokopt.block"


def block_meta(node: torch.fx.Node) -> dict | None:
    return (node.meta.get("custom") or {}).get(META_BLOCK)


@dataclass(frozen=True)
class AttentionBlock:
    layer: int | None
    module: str                    # "model.layers.3.self_attn"
    node: str                      # name of the attention node in the graph
    spelling: str                  # "sdpa" | "eager" | "canonical" | the tokopt op that replaced it ("tca_attention" ...)
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool | None            # None: decided by a mask tokopt cannot read statically
    q_proj: str | None = None      # weight names of the projections (fused qkv: same name thrice)
    k_proj: str | None = None
    v_proj: str | None = None
    o_proj: str | None = None
    fused_qkv: bool = False
    rope: bool = False
    mask: str | None = None        # node feeding the mask, if any
    scale: float | None = None
    softcap: float = 0.0           # attention logit soft cap (Gemma 2): tanh(s / c) * c; 0: none

    def row(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Rejected:
    module: str
    node: str
    reason: str


@dataclass
class Program:
    ep: torch.export.ExportedProgram
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]       # input name -> {axis: "batch" | "sequence"}
    probe: dict[str, torch.Tensor]                 # a small batch the passes are verified on
    task: str = "generic"                          # "causal-lm" | "encoder" | "vision" | "generic"
    source: dict[str, Any] = field(default_factory=dict)
    module: torch.nn.Module | None = None          # eager original, when the source had one
    seq_range: tuple[int, int] | None = None       # (min, max) sequence length the bundle accepts
    tokenizer_dir: str | None = None
    history: list[dict] = field(default_factory=list)  # passes run so far, with options and stats
    cache: Any = None                              # generation.CacheSpec of a prefill/decode graph
    calib: str | None = None                       # --calib: the data passes calibrate on
    artifacts: dict[str, Any] = field(default_factory=dict)  # bundle file name -> JSON (or text) a pass ships
    id_limits: dict[str, int] | None = None        # integer input -> rows of the table it indexes (from capture)
    _analyses: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.id_limits is None:  # read before any pass replaces the lookups
            embedding = torch.ops.aten.embedding.default
            self.id_limits = {name: int(u.args[0].meta["val"].shape[0])
                              for name, node in self.input_nodes().items() for u in node.users
                              if u.target is embedding and u.args[1] is node}

    @property
    def graph(self) -> torch.fx.Graph:
        return self.ep.graph_module.graph

    # -- analyses (computed from the graph on first use) -------------------------------------
    def analysis(self, name: str):
        if name not in self._analyses:
            if name == "attention":
                from .patterns import index_attention
                self._analyses[name] = index_attention(self)
            elif name == "positions":
                self._analyses[name] = _keeps_positions(self)
            else:
                raise KeyError(name)
        return self._analyses[name]

    def invalidate(self) -> None:
        """Forget every cached analysis (the PassManager calls this after a pass that modified
        the program; each is recomputed from the graph when next asked for)."""
        self._analyses.clear()

    @property
    def attention(self) -> list[AttentionBlock]:
        """Every recognised attention block: canonical ones and those a pass replaced."""
        return self.analysis("attention")[0]

    @property
    def rejected(self) -> list[Rejected]:
        return self.analysis("attention")[1]

    @property
    def keeps_positions(self) -> bool:
        """Does every output keep the input's token axis (no pass dropped tokens)?"""
        return self.analysis("positions")

    def attention_blocks(self, who: str) -> list[AttentionBlock]:
        """The canonical attention blocks a pass rewrites; a UsageError naming ``who`` if none."""
        blocks = [b for b in self.attention if b.spelling == "canonical"]
        capped = [b.module for b in blocks if b.softcap]
        if capped:
            raise UsageError(f"{who} does not model an attention logit soft cap (tanh(s / c) * c, Gemma 2's), which "
                             f"{len(capped)} of the {len(blocks)} attention blocks have ({capped[0]}, ...). Compile "
                             "without it; the weight passes (rsq) and the lowering keep the cap.")
        if not blocks:
            replaced = sorted({b.spelling for b in self.attention})
            why = (f"every attention was already replaced ({', '.join(replaced)})" if replaced else
                   "see `tokopt inspect MODEL` for why each block was refused")
            raise UsageError(f"{who} needs recognised attention blocks and found none; {why}.")
        return blocks

    def input_nodes(self) -> dict[str, torch.fx.Node]:
        """The user inputs' placeholders (parameters and buffers come first in an exported graph)."""
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        return dict(zip(self.input_names, placeholders[len(placeholders) - len(self.input_names):]))

    def copy(self) -> "Program":
        """A shallow copy (the exported program is never edited in place, so it is shared)."""
        return replace(self, history=list(self.history), artifacts=dict(self.artifacts))

    # -- running -----------------------------------------------------------------------------
    def run(self, inputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run the exported graph eagerly (reference kernels for tokopt ops); the module is built
        at the first call and kept with the program's analyses."""
        if "run" not in self._analyses:
            self._analyses["run"] = self.runner()
        return self._analyses["run"](self.probe if inputs is None else inputs)

    def unlifted(self) -> torch.fx.GraphModule:
        """The graph as a callable module (~0.2 s to build)."""
        # A generation graph is also run on a one-token prompt, a size torch.export's 0/1
        # specialisation leaves out of its guards but the graph handles.
        return self.ep.module(check_guards=self.cache is None)

    def runner(self, release_mapped: bool = False):
        """``run`` for many calls: the module is built once. ``release_mapped``: each call lets
        every weight mapped from the checkpoint leave the resident set after its last reader
        (``resources.mapped_releaser``; it stays in the page cache): a check of a large model
        holds about one weight, not every one it has read."""
        if release_mapped:
            return functools.partial(run_paged, self.unlifted(), self.input_names, self.output_names,
                                     release=mapped_releaser())
        return _runner(self.unlifted(), self.input_names, self.output_names)

    # -- reading weights ---------------------------------------------------------------------
    def tensor(self, node) -> torch.Tensor | None:
        """The weight or buffer a placeholder node stands for (None for inputs and computed values)."""
        name = self.weight_name(node)
        return None if name is None else self.ep.state_dict.get(name, self.ep.constants.get(name))

    def weight_name(self, node) -> str | None:
        node = stored(node)
        if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
            return None
        spec = next((s for s in self.ep.graph_signature.input_specs if s.arg.name == node.name), None)
        return None if spec is None else spec.target

    def count(self, target) -> int:
        """How many calls of ``target`` (compared by name: op overload objects are not unique)."""
        return sum(1 for n in call_function_nodes(self.graph) if str(n.target) == str(target))

    # -- changing ----------------------------------------------------------------------------
    def rewrite(self) -> "Rewrite":
        """An editable copy of the graph; ``commit`` it for the changed Program."""
        return Rewrite(self)

    def edit(self) -> "Edit":
        """A copy of the exported graph itself, for edits that change no input or output (see
        ``Edit``): its ``commit`` skips the re-export a ``rewrite`` pays."""
        return Edit(self)

    def with_tensors(self, values: dict[str, torch.Tensor], what: str) -> "Program":
        """This program with new values for existing weights and buffers (by state-dict name)."""
        rw = self.edit()
        for name, value in values.items():
            rw.set_tensor(name, value)
        return rw.commit(what)


def _runner(module, input_names, output_names):
    def run(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = module(*[inputs[n] for n in input_names])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return dict(zip(output_names, out))
    return run


class _PagedRun(torch.fx.Interpreter):
    """Runs a module's graph, each weight paged out after the last op that reads it
    (``release``; ``resources.page_out_tensor`` evicts it): a check over the whole model holds
    about one weight at a time, not every mapped weight it has read (an 8B model's rotated ones
    are 32 GB)."""

    def __init__(self, module: torch.fx.GraphModule, release):
        super().__init__(module)
        self.release = release
        last = {a: node for node in module.graph.nodes for a in node.all_input_nodes if a.op == "get_attr"}
        self.after: dict = {}
        for weight, node in last.items():
            self.after.setdefault(node, []).append(weight)

    def run_node(self, node):
        out = super().run_node(node)
        for weight in self.after.get(node, ()):
            if isinstance(self.env.get(weight), torch.Tensor):
                self.release(self.env[weight])
        return out


def run_paged(module: torch.fx.GraphModule, input_names, output_names, inputs: dict,
              release=page_out_tensor) -> dict[str, torch.Tensor]:
    """``module`` on ``inputs`` as ``_PagedRun`` runs it: outputs by name."""
    with torch.no_grad():
        out = _PagedRun(module, release).run(*[inputs[n] for n in input_names])
    return dict(zip(output_names, out if isinstance(out, (tuple, list)) else (out,)))


def _keeps_positions(program: Program) -> bool:
    ids = program.input_nodes().get("input_ids")
    if ids is None:
        return True
    seq = str(ids.meta["val"].shape[1])
    for arg in program.graph.output_node().args[0]:
        v = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and not isinstance(v.shape[1], int) and str(v.shape[1]) != seq:
            return False
    return True


class Rewrite:
    """An editable copy of a Program's graph (see the module docstring).

    ``gm``/``graph``: a plain GraphModule, positional inputs in ``input_names`` order, a flat
    output tuple in ``output_names`` order; ``inputs``/``outputs`` map names to nodes. Node names
    are the program's, so the attention index's node names find their nodes here."""

    def __init__(self, program: Program):
        self.program = program
        unlifted = program.ep.module(check_guards=False)
        graph = torch.fx.Graph()
        env: dict = {}
        outs = graph.graph_copy(unlifted.graph, env)
        graph.output(tuple(outs) if isinstance(outs, (tuple, list)) else (outs,))
        self.gm = torch.fx.GraphModule(unlifted, graph)
        self.graph = graph
        self.input_names = list(program.input_names)
        self.output_names = list(program.output_names)
        self.probe = dict(program.probe)
        self.dynamic_axes = copy.deepcopy(program.dynamic_axes)
        self._constants = 0

    # -- names -> nodes ----------------------------------------------------------------------
    @property
    def inputs(self) -> dict[str, torch.fx.Node]:
        return dict(zip(self.input_names, [n for n in self.graph.nodes if n.op == "placeholder"]))

    @property
    def outputs(self) -> dict[str, torch.fx.Node]:
        return dict(zip(self.output_names, self.graph.output_node().args[0]))

    def set_outputs(self, outputs: dict[str, Any]) -> None:
        """The graph's outputs, in this order, under these names."""
        self.graph.output_node().args = (tuple(outputs.values()),)
        self.output_names = list(outputs)

    def add_input(self, name: str, example: torch.Tensor, axes: dict[int, str], after: str) -> torch.fx.Node:
        """A new input ``name`` after input ``after`` (``example`` joins the probe)."""
        with self.graph.inserting_after(self.inputs[after]):
            node = self.graph.placeholder(name)
        self.input_names.insert(self.input_names.index(after) + 1, name)
        self.probe[name], self.dynamic_axes[name] = example, dict(axes)
        return node

    # -- weights -----------------------------------------------------------------------------
    @property
    def attention(self) -> list[AttentionBlock]:
        """The program's attention index (its node names are this graph's)."""
        return self.program.attention

    def tensor(self, node) -> torch.Tensor | None:
        """The tensor a ``get_attr`` node reads (None for anything else)."""
        node = stored(node)
        if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
            return None
        value = self.gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None

    def weight_name(self, node) -> str | None:
        node = stored(node)
        return node.target if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None

    def constant(self, name: str, tensor: torch.Tensor) -> torch.fx.Node:
        """A new buffer holding ``tensor`` and the node that reads it (before the first computation)."""
        target = f"tokopt_{name}"
        if hasattr(self.gm, target):
            raise ValueError(f"constant {target} exists already")
        self.gm.register_buffer(target, tensor.detach())
        first = next(n for n in self.graph.nodes if n.op not in ("placeholder", "get_attr"))
        with self.graph.inserting_before(first):
            return self.graph.get_attr(target)

    def set_tensor(self, target: str, value: torch.Tensor) -> None:
        """A new value for weight or buffer ``target`` (its state-dict name); a parameter stays one."""
        prefix, _, leaf = target.rpartition(".")
        owner = self.gm.get_submodule(prefix) if prefix else self.gm
        old = getattr(owner, leaf, None)
        if not isinstance(old, torch.Tensor):
            raise KeyError(f"the graph holds no tensor named {target}")
        value = value.detach()
        setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=False) if isinstance(old, torch.nn.Parameter)
                else value)

    # -- running while editing ---------------------------------------------------------------
    def module(self) -> torch.fx.GraphModule:
        self.gm.recompile()
        return self.gm

    def runner(self):
        return _runner(self.module(), self.input_names, self.output_names)

    # -- done --------------------------------------------------------------------------------
    def _drop_unused(self) -> None:
        remove_dead_code(self.graph)
        used = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        for name, _ in [*self.gm.named_parameters(remove_duplicate=False), *self.gm.named_buffers(remove_duplicate=False)]:
            if name not in used:
                prefix, _, leaf = name.rpartition(".")
                delattr(self.gm.get_submodule(prefix) if prefix else self.gm, leaf)
        self.gm.delete_all_unused_submodules()

    def commit(self, what: str, **fields) -> Program:
        """The edited graph as a new Program, exported again (``what`` names the change in an
        error); ``fields`` replace other Program fields (``cache``, ``task`` ...)."""
        from torch.export import Dim
        self._drop_unused()
        self.graph.lint()
        gm = self.module()
        shapes = tuple({ax: Dim.AUTO for ax in self.dynamic_axes.get(n, {})} or None for n in self.input_names)
        try:
            with torch.no_grad():
                ep = torch.export.export(gm, tuple(self.probe[n] for n in self.input_names),
                                         dynamic_shapes=shapes, strict=False)
        except Exception as e:
            raise PassError(f"{what} does not re-export: {str(e).strip().splitlines()[0]}") from e
        return replace(self.program, ep=ep, input_names=self.input_names, output_names=self.output_names,
                       probe=self.probe, dynamic_axes=self.dynamic_axes, history=list(self.program.history),
                       artifacts=dict(self.program.artifacts), **fields)


class Edit:
    """A copy of a Program's exported graph (lifted: weights are placeholders), nodes named as
    the program's. ``commit`` puts it in a new ``ExportedProgram`` beside the program's own
    signature, weights and shape ranges, as torch's own graph passes do (``run_decompositions``).
    A node that replaces another of the same value takes its metadata (``inherit_meta``); a new
    computation gets its value (``meta["val"]``) by running its op on the fake tensors export
    left on its inputs, in export's own fake mode. New weights (``constant``) join as buffers, and
    weights no node reads any longer leave the program."""

    def __init__(self, program: Program):
        self.program = program
        self.graph = torch.fx.Graph()
        self.graph.output(self.graph.graph_copy(program.graph, {}))
        self.tensors: dict[str, torch.Tensor] = {}
        self.added: dict[str, torch.Tensor] = {}    # new buffers, by placeholder name
        self._read = {n.name for n in self.graph.nodes if n.op == "placeholder" and n.users}

    def _target(self, node) -> str | None:
        """The state-dict name of the weight a placeholder stands for (None for user inputs)."""
        node = stored(node)
        if isinstance(node, torch.fx.Node) and node.name in self.added:
            return node.name
        return self.program.weight_name(node)   # placeholders keep the program's names

    def tensor(self, node) -> torch.Tensor | None:
        """The weight or buffer a placeholder reads, as this edit leaves it (None for anything else)."""
        target = self._target(node)
        if target in self.added or target in self.tensors:
            return self.added.get(target, self.tensors.get(target))
        return self.program.tensor(node)

    def set_tensor(self, target: str, value: torch.Tensor) -> None:
        """A new value, of the same shape and dtype, for weight or buffer ``target``."""
        ep = self.program.ep
        old = ep.state_dict.get(target, ep.constants.get(target))
        if not isinstance(old, torch.Tensor):
            raise KeyError(f"the graph holds no tensor named {target}")
        if old.shape != value.shape or old.dtype != value.dtype:
            raise ValueError(f"{target} is {old.dtype} {tuple(old.shape)}, not {value.dtype} {tuple(value.shape)}")
        value = value.detach()
        self.tensors[target] = torch.nn.Parameter(value, requires_grad=False) if isinstance(
            old, torch.nn.Parameter) else value

    def constant(self, name: str, tensor: torch.Tensor) -> torch.fx.Node:
        """A new buffer holding ``tensor`` and the placeholder that reads it (after the program's own),
        named ``tokopt_`` and ``name`` made an identifier (a placeholder is an argument of the code)."""
        target = "tokopt_" + re.sub(r"\W", "_", name)
        if target in self.added or target in self.program.ep.state_dict:
            raise ValueError(f"constant {target} exists already")
        weights = [n for n in self.graph.nodes if n.op == "placeholder" and self._target(n) is not None]
        users = [n for n in self.graph.nodes if n.op == "placeholder" and self._target(n) is None]
        with self.graph.inserting_after(weights[-1]) if weights else self.graph.inserting_before(users[0]):
            node = self.graph.placeholder(target)
        node.meta["val"] = self._fake_mode().from_tensor(tensor.detach(), static_shapes=True)   # no new symbols
        self.added[node.name] = tensor.detach()
        return node

    def _fake_mode(self):
        return next(n.meta["val"].fake_mode for n in self.program.graph.nodes
                    if n.op == "placeholder" and hasattr(n.meta.get("val"), "fake_mode"))

    def _derive_values(self) -> None:
        """``meta["val"]`` for each new node, from its op run on its inputs' fake tensors."""
        mode = None
        for node in self.graph.nodes:
            if node.op != "call_function" or "val" in node.meta:
                continue
            if not all("val" in a.meta for a in node.all_input_nodes):
                continue   # its input has none either: reported below
            mode = mode or self._fake_mode()
            try:
                with mode:
                    node.meta["val"] = node.target(*torch.fx.node.map_arg(node.args, lambda a: a.meta["val"]),
                                                   **torch.fx.node.map_arg(node.kwargs, lambda a: a.meta["val"]))
            except Exception:   # an op its inputs do not fit: refused by name below
                continue

    def commit(self, what: str, **fields) -> Program:
        ep = self.program.ep
        remove_dead_code(self.graph)
        self._derive_values()
        specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
        for node in [n for n in self.graph.nodes if n.op == "placeholder" and not n.users]:
            if self._target(node) is not None and (node.name in self._read or node.name in self.added):
                self.added.pop(node.name, None)   # a weight this edit left unread
                self.graph.erase_node(node)
        self.graph.lint()
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        inputs = [specs.get(n.name) or InputSpec(kind=InputKind.BUFFER, arg=TensorArgument(name=n.name),
                                                 target=n.name, persistent=True) for n in placeholders]
        kept = {s.target for s in inputs}
        state = {k: self.tensors.get(k, v) for k, v in ep.state_dict.items() if k in kept}
        state.update(self.added)
        constants = {k: self.tensors.get(k, v) for k, v in ep.constants.items() if k in kept}
        # an op that returns nothing (an export assert) has no value; a .pt2's loader leaves it no "val"
        bare = [n.name for n in self.graph.nodes if n.op == "call_function" and "val" not in n.meta
                and getattr(getattr(n.target, "_schema", None), "returns", True)]
        if bare:
            raise PassError(f"{what} left nodes without export's metadata, whose op cannot give a value on their "
                            f"inputs' fake tensors: {bare[:5]}")
        gm = torch.fx.GraphModule(ep.graph_module, self.graph)
        outputs = [replace(spec, arg=TensorArgument(name=node.name)) if isinstance(spec.arg, TensorArgument) else spec
                   for spec, node in zip(ep.graph_signature.output_specs, self.graph.output_node().args[0])]
        signature = ExportGraphSignature(input_specs=inputs, output_specs=outputs)
        try:
            new = torch.export.ExportedProgram(
                root=gm, graph=gm.graph, graph_signature=signature, state_dict=state,
                range_constraints=ep.range_constraints, module_call_graph=ep.module_call_graph,
                example_inputs=ep.example_inputs, constants=constants, verifiers=ep.verifiers)
        except Exception as e:
            raise PassError(f"{what} does not verify: {str(e).strip().splitlines()[0]}") from e
        return replace(self.program, ep=new, history=list(self.program.history),
                       artifacts=dict(self.program.artifacts), **fields)


def inherit_meta(new: torch.fx.Node, old: torch.fx.Node) -> None:
    """Give a node that replaces ``old`` (same value) the metadata passes read (its module path
    and tokopt's annotations); export derives the rest."""
    new.meta.update({key: copy.copy(old.meta[key]) for key in ("val", "nn_module_stack", "stack_trace", "custom")
                     if key in old.meta})


def stored(node):
    """The weight node behind ``node`` where the graph reads a weight kept in half precision
    through a cast to fp32 (``aten.to.dtype``; see ``capture``), else ``node``: the views answer
    ``tensor`` and ``weight_name`` for the weight as the ops read it."""
    if (isinstance(node, torch.fx.Node) and node.target is torch.ops.aten.to.dtype and node.args[1] == torch.float32
            and isinstance(node.args[0], torch.fx.Node) and node.args[0].op in ("placeholder", "get_attr")):
        return node.args[0]
    return node


def call_function_nodes(graph: torch.fx.Graph):
    return (n for n in graph.nodes if n.op == "call_function")


def _keeps(node: torch.fx.Node) -> bool:
    name = str(node.target)
    return "_assert" in name or "sym_constrain" in name or name.startswith("aten._print")


def remove_dead_code(graph: torch.fx.Graph) -> int:
    """Erase unused call_function nodes. Unlike ``Graph.eliminate_dead_code`` this also drops
    ops FX deems impure for being random (dropout, SDPA), which are inert in an eval graph, and
    metadata asserts whose subject nothing else uses."""
    removed, changed = 0, True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op not in ("call_function", "get_attr") or node.users:
                continue
            if _keeps(node) and not all(all(_keeps(u) for u in a.users) for a in node.all_input_nodes):
                continue
            graph.erase_node(node)
            removed += 1
            changed = True
    return removed
