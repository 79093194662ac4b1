"""The IR: an ``ExportedProgram`` plus what tokopt knows about it.

``Program`` is what every pass takes and returns. Besides the exported graph it carries the
attention index (one ``AttentionBlock`` per recognised attention, with the reason for every
block that was not recognised), the input/output names and dynamic axes the bundle promises,
a probe batch for numerics, and the eager model when the source had one (the quality oracle).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import UsageError

__all__ = ["AttentionBlock", "Rejected", "Program", "META_BLOCK", "call_function_nodes", "inherit_meta",
           "remove_dead_code"]

# node.meta key under which passes find the block an attention node belongs to
META_BLOCK = "tokopt.block"


@dataclass(frozen=True)
class AttentionBlock:
    layer: int | None
    module: str                    # "model.layers.3.self_attn"
    node: str                      # name of the attention node in the graph
    spelling: str                  # "sdpa" | "eager" | "canonical"
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
    attention: list[AttentionBlock] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    seq_range: tuple[int, int] | None = None       # (min, max) sequence length the bundle accepts
    tokenizer_dir: str | None = None
    history: list[dict] = field(default_factory=list)  # passes run so far, with options and stats
    cache: Any = None                              # generation.CacheSpec of a prefill/decode graph
    calib: str | None = None                       # --calib: the data passes calibrate on
    artifacts: dict[str, Any] = field(default_factory=dict)  # bundle file name -> JSON (or text) a pass ships
    id_limits: dict[str, int] | None = None        # integer input -> rows of the table it indexes (from capture)

    def __post_init__(self):
        if self.id_limits is None:  # read before any pass replaces the lookups
            embedding = torch.ops.aten.embedding.default
            self.id_limits = {name: int(u.args[0].meta["val"].shape[0])
                              for name, node in self.input_nodes().items() for u in node.users
                              if u.target is embedding and u.args[1] is node}

    @property
    def graph(self) -> torch.fx.Graph:
        return self.ep.graph_module.graph

    def attention_blocks(self, who: str) -> list[AttentionBlock]:
        """The canonical attention blocks a pass rewrites; a UsageError naming ``who`` if none."""
        blocks = [b for b in self.attention if b.spelling == "canonical"]
        if not blocks:
            raise UsageError(f"{who} needs recognised attention blocks and found none; see `tokopt inspect "
                             "MODEL` for why each block was refused.")
        return blocks

    def input_nodes(self) -> dict[str, torch.fx.Node]:
        """The user inputs' placeholders (parameters and buffers come first in an exported graph)."""
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        return dict(zip(self.input_names, placeholders[len(placeholders) - len(self.input_names):]))

    def copy(self) -> "Program":
        """A deep copy of the graph (weights shared), so a pass never edits its input."""
        ep = self.ep
        gm = copy.deepcopy(ep.graph_module)
        signature = copy.deepcopy(ep.graph_signature)
        # the copy renames placeholders that shadow a builtin ("input" -> "input_1"): follow it
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for spec, node in zip(signature.input_specs, placeholders):
            if hasattr(spec.arg, "name"):
                spec.arg.name = node.name
        new_ep = torch.export.ExportedProgram(
            root=gm, graph=gm.graph, graph_signature=signature,
            state_dict=ep.state_dict, range_constraints=copy.copy(ep.range_constraints),
            module_call_graph=copy.deepcopy(ep.module_call_graph), example_inputs=ep.example_inputs,
            constants=ep.constants, verifiers=list(getattr(ep, "verifiers", [])) or None)
        return replace(self, ep=new_ep, attention=list(self.attention), rejected=list(self.rejected),
                       history=list(self.history), artifacts=dict(self.artifacts))

    def run(self, inputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run the exported graph eagerly (reference kernels for tokopt ops)."""
        return self.runner()(self.probe if inputs is None else inputs)

    def unlifted(self) -> torch.fx.GraphModule:
        """The graph as a callable module (~0.2 s to build; valid until the graph is edited)."""
        # A generation graph is also run on a one-token prompt, a size torch.export's 0/1
        # specialisation leaves out of its guards but the graph handles.
        return self.ep.module(check_guards=self.cache is None)

    def runner(self):
        """``run`` for many calls: the module is built once."""
        module = self.unlifted()

        def run(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                out = module(*[inputs[n] for n in self.input_names])
            out = out if isinstance(out, (tuple, list)) else (out,)
            return dict(zip(self.output_names, out))
        return run

    def reexport(self, gm: torch.fx.GraphModule, what: str) -> None:
        """Replace the graph with ``gm`` (an edited unlifted module of it) exported again at the
        program's inputs, probe and dynamic axes, and re-index its attention. A refusal from
        torch.export becomes a PassError naming ``what``."""
        from torch.export import Dim

        from .errors import PassError
        from .patterns import index_attention
        shapes = tuple({ax: Dim.AUTO for ax in self.dynamic_axes.get(n, {})} or None for n in self.input_names)
        try:
            with torch.no_grad():
                self.ep = torch.export.export(gm, tuple(self.probe[n] for n in self.input_names),
                                              dynamic_shapes=shapes, strict=False)
        except Exception as e:
            raise PassError(f"{what} does not re-export: {str(e).splitlines()[0]}") from e
        self.attention, self.rejected = index_attention(self)

    def sync_signature(self) -> None:
        """Point the signature's output specs at the output node's current arguments, so a
        pass that rewires an output does not have to edit the signature itself."""
        out = self.graph.output_node()
        for spec, arg in zip(self.ep.graph_signature.output_specs, out.args[0]):
            if isinstance(arg, torch.fx.Node) and hasattr(spec.arg, "name"):
                spec.arg.name = arg.name

    def tensor(self, node) -> torch.Tensor | None:
        """The weight or buffer a placeholder node stands for (None for inputs and computed values)."""
        if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
            return None
        spec = next((s for s in self.ep.graph_signature.input_specs if s.arg.name == node.name), None)
        return None if spec is None or spec.target is None else self.ep.state_dict.get(spec.target)

    def add_constant(self, name: str, tensor: torch.Tensor) -> torch.fx.Node:
        """A new buffer input holding ``tensor``, for a pass to feed to the nodes it writes.
        The state dict is copied on write: copies of this program keep theirs."""
        from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
        target = f"tokopt_{name}"
        ep, specs = self.ep, self.ep.graph_signature.input_specs
        if target in ep.state_dict:
            raise ValueError(f"constant {target} exists already")
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        last = max(i for i, sp in enumerate(specs) if sp.kind in (InputKind.PARAMETER, InputKind.BUFFER))
        with self.graph.inserting_after(placeholders[last]):
            node = self.graph.placeholder(f"b_{target}")
        fake = next(n.meta["val"] for n in placeholders if hasattr(n.meta.get("val"), "fake_mode")).fake_mode
        node.meta["val"] = fake.from_tensor(tensor)
        specs.insert(last + 1, InputSpec(kind=InputKind.BUFFER, arg=TensorArgument(name=node.name), target=target,
                                         persistent=True))
        ep._state_dict = {**ep.state_dict, target: tensor}
        return node

    def set_tensors(self, values: dict[str, torch.Tensor]) -> None:
        """New values for existing weights and buffers (by state-dict name), parameters staying
        parameters. Copy on write: copies of this program keep theirs."""
        state = dict(self.ep.state_dict)
        for name, value in values.items():
            if name not in state:
                raise KeyError(f"the graph's state holds no tensor named {name}")
            value = value.detach()
            state[name] = torch.nn.Parameter(value, requires_grad=False) \
                if isinstance(state[name], torch.nn.Parameter) else value
        self.ep._state_dict = state

    def drop_unused_inputs(self) -> int:
        """Remove parameters and buffers no node reads any more (weights a pass replaced)."""
        from torch.export.graph_signature import InputKind
        ep = self.ep
        keep, state, dropped = [], dict(ep.state_dict), 0
        by_name = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
        for spec in ep.graph_signature.input_specs:
            node = by_name[spec.arg.name]
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and not node.users:
                self.graph.erase_node(node)
                state.pop(spec.target, None)
                dropped += 1
            else:
                keep.append(spec)
        ep.graph_signature.input_specs[:] = keep
        ep._state_dict = state
        return dropped

    def count(self, target) -> int:
        """How many calls of ``target`` (compared by name: op overload objects are not unique)."""
        return sum(1 for n in call_function_nodes(self.graph) if str(n.target) == str(target))


def inherit_meta(new: torch.fx.Node, old: torch.fx.Node) -> None:
    """Give a node that replaces ``old`` (same value) the metadata exporters and passes read."""
    new.meta.update({key: old.meta[key] for key in ("val", "nn_module_stack", "stack_trace", "tensor_meta",
                                                    META_BLOCK) if key in old.meta})


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
            if node.op != "call_function" or node.users:
                continue
            if _keeps(node) and not all(all(_keeps(u) for u in a.users) for a in node.all_input_nodes):
                continue
            graph.erase_node(node)
            removed += 1
            changed = True
    return removed
