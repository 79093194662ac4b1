"""Sibling projections fused: the linears that read one input become one wider linear and a split.

Attention's q, k and v projections, and a gated MLP's gate and up, read the same tensor. Each
is a small GEMM (384 wide in MiniLM, a GEMV per decode step in an LM): a CPU kernel fills its
tiles or its threads better with one [K, N1+N2+N3] weight than with three, and the runtime
runs one node instead of three. The fused weight is the members' weights side by side, so each
output is the same dot product (a kernel may order a sum differently for a wider weight) for
float linears, W8A8 (one activation scale: the members already share their input's) and
``matmul_nbits`` (rows are independent blocks; with ``accuracy_level`` 4 the input is also
quantized once instead of once per member).

Run at lowering (ONNX Runtime's; OpenVINO's split is a reference kernel), after every pass: the passes address projections by the attention index's
weight names (q_proj, gate_proj ...), which a fused weight no longer has. A large fused weight is
mapped from a file and paged out (``resources.file_backed``): in anonymous memory a 0.5B model's
gate/up copies kept 0.9 GiB resident through the lowering and the measurement.
"""
from __future__ import annotations

import operator

import torch

from ..calibration.stats import cache_dir
from ..optimizer.ops import LINEAR_W8A8, MATMUL_NBITS
from ..optimizer.program import Edit, Program, Rewrite, call_function_nodes
from ..optimizer.resources import check_disk, file_backed, page_out_tensor

__all__ = ["fuse_projections", "fused_projection"]

aten = torch.ops.aten
MAPPED_BYTES = 16 << 20   # a fused weight this large lives in a file, not in anonymous memory


def _signature(rw: Rewrite | Edit, node) -> tuple | None:
    """What must match for ``node`` to share a fused weight with another reading the same
    input, or None when it cannot be fused (a weight that is not a constant)."""
    if node.target == aten.linear.default:
        bias = node.args[2] if len(node.args) > 2 else None
        if rw.tensor(node.args[1]) is None or (bias is not None and rw.tensor(bias) is None):
            return None
        return ("linear", node.args[0], rw.tensor(node.args[1]).dtype)
    if LINEAR_W8A8.matches(node):
        x, w, ws, xs, xz, *bias = node.args
        if any(rw.tensor(t) is None for t in (w, ws, xs, xz, *[b for b in bias if b is not None])):
            return None
        return ("w8a8", x, float(rw.tensor(xs)), int(rw.tensor(xz)))
    if MATMUL_NBITS.matches(node):
        x, qw, sc, bias, bits, bs, k, n, *level = node.args
        if any(rw.tensor(t) is None for t in (qw, sc, *[b for b in (bias,) if b is not None])):
            return None
        return ("nbits", x, bits, bs, k, tuple(level))
    return None


def _width(rw: Rewrite | Edit, node) -> int:
    if node.target == aten.linear.default:
        return rw.tensor(node.args[1]).shape[0]
    if LINEAR_W8A8.matches(node):
        return rw.tensor(node.args[1]).shape[1]
    return node.args[7]


def _biases(rw: Rewrite | Edit, nodes: list, index: int) -> torch.Tensor | None:
    """The members' biases side by side (zeros for a member without one), or None if none has one."""
    found = [rw.tensor(n.args[index]) if len(n.args) > index and n.args[index] is not None else None for n in nodes]
    if all(b is None for b in found):
        return None
    like = next(b for b in found if b is not None)
    return torch.cat([b if b is not None else like.new_zeros(_width(rw, n)) for b, n in zip(found, nodes)])


def _side_by_side(tensors: list, dim: int = 0) -> torch.Tensor:
    """``torch.cat(tensors, dim)``, in a paged-out file mapping when large (see the module docstring)."""
    if sum(t.nbytes for t in tensors) < MAPPED_BYTES:
        return torch.cat(tensors, dim)
    shape = list(tensors[0].shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    with torch.no_grad():
        out = torch.cat(tensors, dim, out=file_backed(tuple(shape), cache_dir() / "spill", tensors[0].dtype))
    for t in (out, *tensors):   # the members' pages too: read once, no longer in the graph
        page_out_tensor(t)
    return out


def fused_projection(rw: Rewrite | Edit, nodes: list, name: str):
    """One node computing ``nodes``' outputs side by side (inserted before the first of them),
    or None when they do not share an input and a kernel. Their own nodes are left in place."""
    kinds = {_signature(rw, n) for n in nodes}
    if len(kinds) != 1 or None in kinds:
        return None
    kind = next(iter(kinds))[0]
    g = rw.graph
    first = min(nodes, key=list(g.nodes).index)
    x = nodes[0].args[0]
    if kind == "linear":
        w = rw.constant(f"{name}_weight", _side_by_side([rw.tensor(n.args[1]) for n in nodes]))
        bias = _biases(rw, nodes, 2)
        args = (x, w) if bias is None else (x, w, rw.constant(f"{name}_bias", bias))
        target = aten.linear.default
    elif kind == "w8a8":
        w = rw.constant(f"{name}_w8", _side_by_side([rw.tensor(n.args[1]) for n in nodes], 1))
        ws = rw.constant(f"{name}_w8_scale", torch.cat([rw.tensor(n.args[2]) for n in nodes]))
        bias = _biases(rw, nodes, 5)
        args = (x, w, ws, *nodes[0].args[3:5], None if bias is None else rw.constant(f"{name}_bias", bias))
        target = LINEAR_W8A8.overload
    else:
        qw = rw.constant(f"{name}_qweight", _side_by_side([rw.tensor(n.args[1]) for n in nodes]))
        sc = rw.constant(f"{name}_scales", torch.cat([rw.tensor(n.args[2]) for n in nodes]))
        bias = _biases(rw, nodes, 3)
        args = (x, qw, sc, None if bias is None else rw.constant(f"{name}_bias", bias), *nodes[0].args[4:7],
                sum(n.args[7] for n in nodes), *nodes[0].args[8:])
        target = MATMUL_NBITS.overload
    with g.inserting_before(first):
        return g.call_function(target, args)


def fuse_projections(program: Program) -> tuple[Program, int]:
    """``program`` with every group of projections that read one input fused (see the module
    docstring), and how many groups were."""
    rw = program.edit()   # new weights and nodes, no input or output changes: no re-export
    groups: dict = {}
    for node in call_function_nodes(rw.graph):
        key = _signature(rw, node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    groups = [nodes for nodes in groups.values() if len(nodes) > 1]
    weights = sum(rw.tensor(n.args[1]).nbytes for nodes in groups for n in nodes)
    if weights >= MAPPED_BYTES:
        check_disk(cache_dir() / "spill", weights, "fusing the projections' weights (mapped from disk)",
                   "set TOKOPT_CACHE_DIR to a folder on a larger disk")
    count = 0
    for nodes in groups:
        fused = fused_projection(rw, nodes, f"fused{count}")
        with rw.graph.inserting_after(fused):
            split = rw.graph.call_function(aten.split_with_sizes.default, (fused, [_width(rw, n) for n in nodes], -1))
        at = split
        for i, node in enumerate(nodes):
            with rw.graph.inserting_after(at):
                at = rw.graph.call_function(operator.getitem, (split, i))
            node.replace_all_uses_with(at)
            rw.graph.erase_node(node)
        count += 1
    return (rw.commit("fusing sibling projections"), count) if count else (program, 0)
