"""The linear layers of an exported transformer graph, split into body and heads, with their layer.

Shared by the passes that quantize or tune weights (``rsq``, ``edgeqat``, ``still``). No
per-architecture code: a head (LM head, pooler, classifier) is a linear with no attention or
other linear downstream of it; a q/k/v projection belongs to the attention it feeds (by the
attention index's weight names), any other linear to the last attention before it in graph
order. Each function reads a *view*: a ``Program`` (weights are placeholders) or a ``Rewrite``
(weights are ``get_attr`` nodes); both answer ``graph``, ``tensor(node)``, ``weight_name(node)``
and ``attention``.
"""
from __future__ import annotations

import torch

from ..optimizer.ops import MATMUL_NBITS, attention_spec
from ..optimizer.program import call_function_nodes, inherit_meta

__all__ = ["linear_layers", "layer_of_linears", "is_weight", "projection_input", "replace_linear"]

aten = torch.ops.aten


def is_weight(target: str | None, name: str | None) -> bool:
    """Is state-dict entry ``target`` the weight the attention index calls ``name`` (which may
    lack the capture's module prefix)?"""
    return name is not None and target is not None and (target == name or target.endswith("." + name))


def linear_layers(view) -> tuple[list, list]:
    """(body, heads): ``aten.linear`` nodes with a constant weight, in graph order."""
    lins = [n for n in call_function_nodes(view.graph)
            if n.target == aten.linear.default and view.tensor(n.args[1]) is not None]
    downstream: dict = {}
    for n in reversed(list(view.graph.nodes)):
        downstream[n] = any(u.target == aten.linear.default or attention_spec(u) is not None or downstream.get(u)
                            for u in n.users)
    return [n for n in lins if downstream[n]], [n for n in lins if not downstream[n]]


def layer_of_linears(view, body) -> dict[str, int]:
    """{linear node name: layer index}."""
    proj = {name: b.layer for b in view.attention for name in (b.q_proj, b.k_proj, b.v_proj) if name}
    attn_nodes = {b.node: b.layer for b in view.attention}
    body = set(body)
    layer_of, current = {}, 0
    for n in view.graph.nodes:
        if n.name in attn_nodes:
            current = attn_nodes[n.name]
        elif n in body:
            t = view.weight_name(n.args[1])
            layer_of[n.name] = next((v for k, v in proj.items() if is_weight(t, k)), current)
    return layer_of


def projection_input(view, weight: str | None) -> torch.fx.Node | None:
    """What the linear layer with weight ``weight`` (an attention index name) reads."""
    for n in call_function_nodes(view.graph):
        if n.target == aten.linear.default and is_weight(view.weight_name(n.args[1]), weight):
            return n.args[0]
    return None


def replace_linear(rw, lin, packed, scales, bits: int, block_size: int, in_features: int, out_features: int,
                   accuracy_level: int = 0):
    """Replace ``aten.linear(x, W[, b])`` in the Rewrite ``rw`` by ``matmul_nbits`` reading the
    packed weight and scales (constant nodes the caller added)."""
    bias = lin.args[2] if len(lin.args) > 2 else None
    with rw.graph.inserting_before(lin):
        new = rw.graph.call_function(MATMUL_NBITS.overload, (lin.args[0], packed, scales, bias, bits, block_size,
                                                             in_features, out_features, accuracy_level))
    inherit_meta(new, lin)
    lin.replace_all_uses_with(new)
    rw.graph.erase_node(lin)
    return new
