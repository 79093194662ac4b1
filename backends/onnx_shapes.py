"""Reshapes with shapes known at export time, in the exported ONNX graph.

torch.onnx spells ``x.view(B, S, 11, 64)`` with symbolic B and S as
``Reshape(x, Concat(Shape(x)[0:1], Shape(x)[1:2], [11], [64]))``: a Concat (and its slices) runs
before every such Reshape at every call. Where each computed piece is the size of ``x``'s own
dimension at the same position, ONNX's ``0`` (copy that dimension) says the same thing, and the
shape becomes a constant: ``Reshape(x, [0, 0, 11, 64])`` (``allowzero`` dropped, which is safe
when no literal size is 0). One size computed otherwise (the token count a pruning layer kept)
becomes ``-1``, the size left once the others are known; where the pieces do not tell (torch.onnx
writes a pruned layer's head count as a literal ``-1`` beside the computed token count), the
sizes torch inferred for the result do. At one token per decode step these small nodes are a
visible part of the step (see the README's decode table); OpenVINO, given a shape it cannot
evaluate, loses every size of the result (a pruned layer's heads became ``?``). A Reshape whose
constant shape is its input's own (``logits_index`` flattened to the 1-D it already is) is
dropped: ONNX Runtime runs it as a node at every step.

Also, optional outputs no node reads: onnxscript's fusions name every output of the norms they
make (``SkipSimplifiedLayerNormalization``'s mean and inverse deviation too), and ONNX Runtime
then allocates and writes each of them at every call (measured: the eight norms of the reference
LM's decode step took 2.7x the time of genai's, which leave them out).

And ``If`` nodes on one condition whose results are only graph outputs (TCA's per-layer
``tca_keep``: a selection after a prefill, nothing at a decode step): one ``If`` runs both
branches' nodes, so a decode step starts one subgraph instead of one per layer.

And the lengths GroupQueryAttention reads (``seqlens_k``, ``total_sequence_length``, and a windowed
node's ``query_seqlens``), computed from ``attention_mask`` by six small nodes at every step (three
more per windowed layer), become graph inputs, the runner knows them (``lengths.graph_feed``); the
mask leaves the graph where nothing else reads it.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

__all__ = ["static_reshapes", "drop_unread_outputs", "merge_ifs", "lengths_inputs"]

# GroupQueryAttention's input of each row's new tokens (a windowed node's, see ops.gqa)
_QUERY_SEQLENS = 16

# (domain, op) -> the output positions a node may leave empty
OPTIONAL_OUTPUTS = {("com.microsoft", "SkipSimplifiedLayerNormalization"): (1, 2, 3),
                    ("com.microsoft", "SkipLayerNormalization"): (1, 2, 3),
                    ("", "SimplifiedLayerNormalization"): (1,),
                    ("", "LayerNormalization"): (1, 2)}


def _const(value: ir.Value | None) -> list[int] | None:
    """A constant's values as ints, flattened (None where ``value`` is not a constant)."""
    return None if value is None or value.const_value is None else \
        [int(v) for v in value.const_value.numpy().reshape(-1)]


def _one_dim(value: ir.Value) -> tuple[ir.Value, int] | None:
    """(tensor, axis) when ``value`` is that tensor's size along ``axis`` as a 1-element shape."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
        src = node.inputs[0]
        rank = src.shape.rank() if src.shape is not None else None
        start = node.attributes["start"].as_int() if "start" in node.attributes else 0
        end = node.attributes["end"].as_int() if "end" in node.attributes else rank
        if rank is None or end is None:
            return None
        start, end = start % rank if start < 0 else start, end % rank if end < 0 else min(end, rank)
        return (src, start) if end - start == 1 else None
    if node.op_type in ("Gather", "Slice") and node.domain in ("", "ai.onnx"):
        full = node.inputs[0].producer()
        if full is None or full.op_type != "Shape" or "start" in full.attributes or "end" in full.attributes:
            return None
        consts = [i.const_value.numpy().reshape(-1) if i is not None and i.const_value is not None else None
                  for i in node.inputs[1:]]
        if node.op_type == "Gather" and consts[0] is not None and consts[0].size == 1:
            return full.inputs[0], int(consts[0][0])
        if node.op_type == "Slice" and len(consts) >= 2 and None not in consts[:2] and consts[0].size == 1 \
                and int(consts[1][0]) - int(consts[0][0]) == 1:
            return full.inputs[0], int(consts[0][0])
    return None


def _same(a, b) -> bool:
    return a is not None and b is not None and (a == b if isinstance(a, int) else
                                                isinstance(b, ir.SymbolicDim) and a.value is not None
                                                and a.value == b.value)


def _pieces(concat: ir.Node, x: ir.Value) -> list[int] | None:
    """The Concat's shape as constants, 0 (a copy of ``x``'s size at that position) and -1 (any
    other computed size); None where a piece is none of those."""
    dims = []
    for piece in concat.inputs:
        if piece.const_value is not None:
            dims += _const(piece)
            continue
        source = _one_dim(piece)
        if source is not None and len(dims) < x.shape.rank() and source[0].shape is not None \
                and _same(source[0].shape[source[1]], x.shape[len(dims)]):
            dims.append(0)
        elif piece.shape is not None and piece.shape.is_static() and int(np.prod(piece.shape.numpy())) == 1:
            dims.append(-1)
        else:
            return None
    return dims


def _from_result(x: ir.Value, out: ir.Value) -> list[int] | None:
    """The shape from the sizes the exporter inferred for the result (torch's own symbolic
    shapes): a literal, 0 where it is ``x``'s size at that position, else -1."""
    if out.shape is None or x.shape is None:
        return None
    return [d if isinstance(d, int) else
            0 if i < x.shape.rank() and _same(d, x.shape[i]) else -1 for i, d in enumerate(out.shape)]


def _keeps_shape(node: ir.Node) -> bool:
    """Whether a Reshape's constant shape gives its input's own shape back: each size 0 (copy;
    not with ``allowzero``) or the input's static size, at most one -1 standing for the rest."""
    x, shape = node.inputs[0], node.inputs[1]
    dims = _const(shape)
    if dims is None or x.shape is None:
        return False
    zero_copies = "allowzero" not in node.attributes or node.attributes["allowzero"].as_int() == 0
    return len(dims) == x.shape.rank() and dims.count(-1) <= 1 and all(
        d == -1 or (d == 0 and zero_copies) or (d > 0 and d == x.shape[i]) for i, d in enumerate(dims))


def static_reshapes(model: ir.Model) -> int:
    """Rewrite such Reshapes in place, and drop those that keep their input's shape (see the
    module docstring); returns how many."""
    count, made = 0, {}
    outputs = set(model.graph.outputs)
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, shape = node.inputs[0], node.inputs[1]
        if _keeps_shape(node) and node.outputs[0] not in outputs:
            node.outputs[0].replace_all_uses_with(x)
            model.graph.remove(node, safe=True)
            count += 1
            continue
        concat = shape.producer() if shape is not None else None
        if concat is None or concat.op_type != "Concat" or x.shape is None:
            continue
        # torch.onnx writes allowzero=1 (a 0 is an empty dimension); the copies need 0 to mean
        # "copy", which is safe when no literal size is 0
        out = node.outputs[0].shape
        if any(p.const_value is not None and 0 in p.const_value.numpy() for p in concat.inputs) \
                or (out is not None and 0 in out):
            continue
        found = [d for d in (_pieces(concat, x), _from_result(x, node.outputs[0])) if d is not None and d.count(-1) <= 1]
        if not found:
            continue
        dims = min(found, key=lambda d: d.count(-1))
        node.attributes.pop("allowzero", None)
        key = (shape.name, tuple(dims))
        if key not in made:
            name = f"{shape.name}_static" + (f"_{len(made)}" if any(k[0] == shape.name for k in made) else "")
            made[key] = ir.Value(name=name, const_value=ir.tensor(np.array(dims, np.int64), name=name))
            model.graph.register_initializer(made[key])
        node.replace_input_with(1, made[key])
        count += 1
    if count:
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


def drop_unread_outputs(model: ir.Model) -> int:
    """Leave empty the optional outputs (``OPTIONAL_OUTPUTS``) that nothing reads; returns how many."""
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for i in OPTIONAL_OUTPUTS.get((node.domain or "", node.op_type), ()):
            if i < len(node.outputs) and node.outputs[i].name and not node.outputs[i].uses() \
                    and not node.outputs[i].is_graph_output():
                node.outputs[i].name = ""   # an empty name is ONNX's absent output
                count += 1
    return count


def merge_ifs(model: ir.Model) -> int:
    """Merge the main graph's ``If`` nodes that test the same value (after common-subexpression
    elimination) and whose outputs only leave the graph, into one ``If`` where the last of them
    was; returns how many nodes were merged away."""
    graph = model.graph
    if sum(n.op_type == "If" for n in graph) < 2:
        return 0
    ir.passes.common.CommonSubexpressionEliminationPass()(model)
    groups: dict[int, list[ir.Node]] = {}
    for node in graph:
        if node.op_type == "If" and node.domain == "" and all(not v.uses() and v.is_graph_output()
                                                              for v in node.outputs):
            groups.setdefault(id(node.inputs[0]), []).append(node)
    merged = 0
    for nodes in (g for g in groups.values() if len(g) > 1):
        branches = {}
        for name in ("then_branch", "else_branch"):
            inner, outs = [], []
            for node in nodes:
                sub = node.attributes[name].as_graph()
                kept = list(sub)
                for inner_node in kept:   # names are unique per graph, and the branches become one
                    inner_node.name = f"{node.name}/{inner_node.name}"
                outs.extend(sub.outputs)
                sub.outputs.clear()
                sub.remove(kept)
                inner.extend(kept)
            branches[name] = ir.Graph((), outs, nodes=inner, name=f"{nodes[0].name}_{name}")
        new = ir.Node("", "If", [nodes[0].inputs[0]], num_outputs=len(branches["then_branch"].outputs),
                      attributes=[ir.AttrGraph(k, g) for k, g in branches.items()], name=nodes[-1].name)
        graph.insert_after(nodes[-1], new)
        old = [v for node in nodes for v in node.outputs]
        for value, out in zip(old, new.outputs):
            out.name, out.type, out.shape = value.name, value.type, value.shape
            graph.outputs[graph.outputs.index(value)] = out
            value.name = None
        graph.remove(nodes, safe=True)
        merged += len(nodes) - 1
    return merged


def _op(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _int32_of(value: ir.Value) -> ir.Value | None:
    """What ``value`` is the int32 cast of (None where it is no such cast)."""
    cast = _op(value, "Cast")
    return cast.inputs[0] if cast is not None and cast.attributes["to"].as_int() == ir.DataType.INT32 else None


def _row_sums(value: ir.Value | None, mask: ir.Value) -> bool:
    """Whether ``value`` is ReduceSum(mask, [1], keepdims=0): each row's tokens."""
    node = _op(value, "ReduceSum")
    return node is not None and node.inputs[0] is mask and len(node.inputs) > 1 \
        and _const(node.inputs[1]) == [1] and node.attributes.get_int("keepdims", 1) == 0


def _seqlens_of(value: ir.Value | None, mask: ir.Value) -> bool:
    """Whether ``value`` is each row's tokens minus one."""
    sub = _op(value, "Sub")
    return sub is not None and _const(sub.inputs[1]) == [1] and _row_sums(sub.inputs[0], mask)


def _new_tokens_of(value: ir.Value | None, mask: ir.Value, qkv: ir.Value) -> bool:
    """Whether ``value`` is Min(each row's tokens, the node's new tokens): a windowed node's
    ``query_seqlens`` (see ``ops.gqa``)."""
    low = _op(value, "Min")
    return low is not None and len(low.inputs) == 2 and _row_sums(low.inputs[0], mask) \
        and _one_dim(low.inputs[1]) == (qkv, 1)


def _width_of(value: ir.Value | None, mask: ir.Value) -> bool:
    """Whether ``value`` is the mask's width, squeezed to a scalar or one element."""
    squeeze = _op(value, "Squeeze")
    return value is not None and _one_dim(squeeze.inputs[0] if squeeze is not None else value) == (mask, 1)


def lengths_inputs(model: ir.Model) -> int:
    """Where every GroupQueryAttention node reads ``seqlens_k`` and ``total_sequence_length`` as the
    casts of the mask's row sums minus one and of its width (and a windowed node its
    ``query_seqlens`` as the cast of the row sums capped at its new tokens), the graph takes those
    as inputs, in the mask's place where nothing else reads it (tca's selection does); see the
    module docstring. Returns how many nodes read them then, 0 where the graph is left as it was."""
    from .lengths import LENGTHS, NEW_TOKENS
    graph = model.graph
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    nodes = [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    names = {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None}
    if mask is None or not nodes or names & {*LENGTHS, NEW_TOKENS} or mask.shape is None:
        return 0
    if not all(_seqlens_of(_int32_of(n.inputs[5]), mask) and _width_of(_int32_of(n.inputs[6]), mask) for n in nodes):
        return 0
    windowed = [n for n in nodes if len(n.inputs) > _QUERY_SEQLENS and n.inputs[_QUERY_SEQLENS] is not None]
    if not all(_new_tokens_of(_int32_of(n.inputs[_QUERY_SEQLENS]), mask, n.inputs[0]) for n in windowed):
        return 0
    int32 = ir.TensorType(ir.DataType.INT32)
    seqlens = ir.Value(name=LENGTHS[0], type=int32, shape=ir.Shape([mask.shape[0]]))
    total = ir.Value(name=LENGTHS[1], type=int32, shape=ir.Shape([]))
    new_tokens = ir.Value(name=NEW_TOKENS, type=int32, shape=ir.Shape([mask.shape[0]]))
    for node in nodes:
        node.replace_input_with(5, seqlens)
        node.replace_input_with(6, total)
    for node in windowed:
        node.replace_input_with(_QUERY_SEQLENS, new_tokens)
    ir.passes.common.RemoveUnusedNodesPass()(model)   # the nodes that computed them
    at = graph.inputs.index(mask)
    if not mask.uses() and not mask.is_graph_output():
        graph.inputs.remove(mask)
    for value in reversed([seqlens, total, *([new_tokens] if windowed else [])]):
        graph.inputs.insert(at, value)
    return len(nodes)
