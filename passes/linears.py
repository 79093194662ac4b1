"""The linear layers of an exported transformer graph, split into body and heads, with their layer.

Shared by the weight-quantization passes (``rsq``, ``edgeqat``). No per-architecture code: a
head (LM head, pooler, classifier) is a linear with no attention or other linear downstream of
it; a q/k/v projection belongs to the attention it feeds (by the attention index's weight
names), any other linear to the last attention before it in graph order.
"""
from __future__ import annotations

import torch

from ..optimizer.ops import ATTENTION
from ..optimizer.program import Program, call_function_nodes

__all__ = ["weight_targets", "linear_layers", "layer_of_linears", "is_weight"]

aten = torch.ops.aten


def is_weight(target: str, name: str | None) -> bool:
    """Is state-dict entry ``target`` the weight the attention index calls ``name`` (which may
    lack the capture's module prefix)?"""
    return name is not None and (target == name or target.endswith("." + name))


def weight_targets(program: Program) -> dict[str, str]:
    """{placeholder name: state-dict name} of the program's weights."""
    return {s.arg.name: s.target for s in program.ep.graph_signature.input_specs if s.target is not None}


def linear_layers(program: Program) -> tuple[list, list]:
    """(body, heads): ``aten.linear`` nodes with a constant weight, in graph order."""
    targets = weight_targets(program)
    lins = [n for n in call_function_nodes(program.graph)
            if n.target == aten.linear.default and isinstance(n.args[1], torch.fx.Node)
            and n.args[1].name in targets]
    downstream: dict = {}
    for n in reversed(list(program.graph.nodes)):
        downstream[n] = any(u.target == aten.linear.default or ATTENTION.matches(u) or downstream.get(u)
                            for u in n.users)
    return [n for n in lins if downstream[n]], [n for n in lins if not downstream[n]]


def layer_of_linears(program: Program, body) -> dict[str, int]:
    """{linear node name: layer index}."""
    targets = weight_targets(program)
    proj = {name: b.layer for b in program.attention for name in (b.q_proj, b.k_proj, b.v_proj) if name}
    attn_nodes = {b.node: b.layer for b in program.attention}
    body = set(body)
    layer_of, current = {}, 0
    for n in program.graph.nodes:
        if n.name in attn_nodes:
            current = attn_nodes[n.name]
        elif n in body:
            t = targets[n.args[1].name]
            layer_of[n.name] = next((v for k, v in proj.items() if is_weight(t, k)), current)
    return layer_of
