"""Computational-invariance rotations of a pre-RMSNorm transformer graph (QuaRot, as RSQ uses it).

``rotate(rw, seed)`` rewrites the graph of a ``Rewrite`` so that, in exact arithmetic, it computes
the same function while its weights are easier to quantize (a Hadamard spreads outlier
channels over all channels):

1. every RMSNorm weight ``g`` is folded into the linears that read the norm (``W <- W diag(g)``)
   and the norm's weight becomes ones (an RMSNorm without weight commutes with rotations);
2. the residual stream is rotated by a random Hadamard ``Q`` (``d x d``): the embedding
   ``E <- E Q``, the linears that read it ``W <- W Q``, those that write it ``W <- Q^T W``,
   ``b <- b Q``; a tied embedding / LM head is untied, since the two now differ;
3. values and attention outputs are rotated per head by a head-size Hadamard (``W_v``, ``W_o``);
4. the input of each MLP's output projection is rotated online by ``M = A (x) B`` (a random
   orthogonal ``A`` of the odd factor, a Hadamard ``B`` of the power-of-two factor), applied as
   two small matmuls, and the projection absorbs ``M``.

The graph is found, not assumed: the residual stream starts at the embedding lookup and runs
through the adds; a norm is ``x * rsqrt(mean(x^2) + eps)`` times a 1-D weight; writers are the
linears whose outputs are added to the stream. A graph that does not fit (LayerNorm, post-norm
BERT, Gemma's ``1 + w`` norm) raises ``NotRotatable`` with the reason; the caller also checks the
rotated graph's outputs against the original's.
"""
from __future__ import annotations

import math

import torch

from ..optimizer.patterns import PASS_THROUGH
from ..optimizer.program import Rewrite, call_function_nodes
from .linears import is_weight

__all__ = ["rotate", "NotRotatable", "random_hadamard", "hadamard"]

aten = torch.ops.aten
_VIEWS = PASS_THROUGH + (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                         aten.slice.Tensor, aten._to_copy.default)


_CASTS = PASS_THROUGH + (aten._to_copy.default,)


class NotRotatable(Exception):
    pass


def hadamard(n: int) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix of a power-of-two order (orthogonal, symmetric)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != n:
        raise NotRotatable(f"{n} is not a power of two")
    return h / math.sqrt(n)


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(r.diagonal())).contiguous()


def random_hadamard(n: int, gen: torch.Generator) -> torch.Tensor:
    """An orthogonal ``n x n`` matrix: a Hadamard with random signs, times a random orthogonal
    matrix of the odd part of ``n`` (Kronecker product) when ``n`` is not a power of two."""
    two = n & -n
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return torch.kron(random_orthogonal(n // two, gen), hadamard(two)) * signs[:, None]


def _through(node, forward: bool):
    """Nodes reached from ``node`` through view-like ops that keep the last (hidden) axis."""
    if forward:
        out = []
        for u in node.users:
            if u.target in _VIEWS and u.args[0] is node:
                out += _through(u, True)
            else:
                out.append(u)
        return out
    while node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    return node


def _norms(rw: Rewrite) -> dict:
    """{weight-multiply node: (stream input, weight node)} for every RMSNorm."""
    found = {}
    for r in call_function_nodes(rw.graph):
        if r.target != aten.rsqrt.default:
            continue
        for m in r.users:
            if m.target != aten.mul.Tensor:
                continue
            x = next(a for a in m.args if a is not r)
            for w_mul in _through(m, True):
                if w_mul.target != aten.mul.Tensor:
                    continue
                wt = [a for a in w_mul.args if rw.tensor(a) is not None]
                if len(wt) == 1 and rw.tensor(wt[0]).dim() == 1:
                    found[w_mul] = (_through(x, False), wt[0])
    return found


def _readers(node) -> list:
    out = _through(node, True)
    bad = [u for u in out if u.target != aten.linear.default]
    if bad:
        raise NotRotatable(f"a normalised value is read by {bad[0].target}, not by a linear layer")
    return out


def rotate(rw: Rewrite, seed: int = 0, online: bool = True, heads: bool = True) -> dict:
    """Rotate the graph being rewritten (see module doc); returns what was rotated.
    ``heads=False`` leaves values unrotated (a --generate graph's cache keeps the model's
    layout). Raises ``NotRotatable`` before touching the graph."""
    g = rw.graph
    gen = torch.Generator().manual_seed(seed)
    embeds = [n for n in call_function_nodes(g) if n.target == aten.embedding.default]
    if len(embeds) != 1:
        raise NotRotatable(f"{len(embeds)} embedding lookups; the residual stream must start at exactly one")
    norms = _norms(rw)
    if not norms:
        raise NotRotatable("no RMSNorm (x * rsqrt(mean(x^2) + eps) * weight) found; LayerNorm models are not "
                           "rotation-invariant without rewriting the norm")
    emb = embeds[0]
    d = rw.tensor(emb.args[0]).shape[1]
    # the residual stream: the embedding output and the adds that accumulate onto it
    stream, frontier = {emb}, [emb]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if (u.target == aten.add.Tensor or u.target in _CASTS) and u not in stream:
                stream.add(u)
                frontier.append(u)
    writers = []
    # in graph order, so the random draws below go to the same layers on every run
    order = {n: i for i, n in enumerate(g.nodes)}
    for add in sorted((n for n in stream if n.target == aten.add.Tensor), key=order.get):
        branch = next((a for a in add.args if isinstance(a, torch.fx.Node) and a not in stream), None)
        src = _through(branch, False) if branch is not None else None
        if src is None or src.target != aten.linear.default:
            raise NotRotatable(f"the residual add {add.name} adds something that is not a linear layer's output")
        writers.append(src)
    norm_inputs = {x for x, _ in norms.values()}
    if not norm_inputs <= stream:
        raise NotRotatable("a norm reads something other than the residual stream")
    readers = {w_mul: _readers(w_mul) for w_mul in norms}
    q = random_hadamard(d, gen)
    new_weights: dict = {}   # linear node -> new weight (built up through the steps)

    def weight(lin):
        return new_weights.get(lin, rw.tensor(lin.args[1]).detach().double())

    folded = 0
    ones = rw.constant("rot_norm_ones", torch.ones(d)) if norms else None
    for w_mul, (x, wnode) in norms.items():
        gvec = rw.tensor(wnode).detach().double()
        for lin in readers[w_mul]:
            new_weights[lin] = weight(lin) * gvec[None] @ q
        # the folded norm keeps a weight of ones: the same function, in the form runtimes fuse
        # into one RMSNorm kernel (ONNX Runtime's SimplifiedLayerNormalization)
        w_mul.replace_input_with(wnode, ones)
        folded += 1
    for lin in writers:
        new_weights[lin] = q.T @ weight(lin)
        if len(lin.args) > 2 and lin.args[2] is not None:
            new_weights[(lin, "bias")] = rw.tensor(lin.args[2]).detach().double() @ q
    head_count = 0
    by_weight = {}
    for lin in call_function_nodes(g):
        if lin.target == aten.linear.default and rw.weight_name(lin.args[1]) is not None:
            by_weight.setdefault(rw.weight_name(lin.args[1]), []).append(lin)
    for block in rw.attention if heads else []:
        if block.fused_qkv or not block.v_proj or not block.o_proj:
            continue
        v_lin = _linear_of(block.v_proj, by_weight)
        o_lin = _linear_of(block.o_proj, by_weight)
        if v_lin is None or o_lin is None:
            continue
        hd = hadamard(block.head_dim)
        wv = weight(v_lin)
        new_weights[v_lin] = (hd.T @ wv.reshape(block.kv_heads, block.head_dim, -1)).reshape(wv.shape)
        if len(v_lin.args) > 2 and v_lin.args[2] is not None:
            bv = rw.tensor(v_lin.args[2]).detach().double()
            new_weights[(v_lin, "bias")] = (bv.reshape(block.kv_heads, 1, -1) @ hd).reshape(-1)
        wo = weight(o_lin)
        new_weights[o_lin] = (wo.reshape(wo.shape[0], block.heads, block.head_dim) @ hd).reshape(wo.shape)
        head_count += 1
    o_lins = {_linear_of(b.o_proj, by_weight) for b in rw.attention if b.o_proj}
    online_count = 0
    if online:
        for lin in writers:
            if lin in o_lins:
                continue
            k = weight(lin).shape[1]
            two = k & -k
            a, b = random_orthogonal(k // two, gen), hadamard(two)
            x = lin.args[0]
            ca = rw.constant(f"rot_{lin.name}_a", a.T.float().contiguous())
            cb = rw.constant(f"rot_{lin.name}_b", b.float().contiguous())
            with g.inserting_before(lin):
                xs = g.call_function(aten.unflatten.int, (x, -1, [k // two, two]))
                y = g.call_function(aten.matmul.default, (xs, cb))
                z = g.call_function(aten.matmul.default, (ca, y))
                flat = g.call_function(aten.flatten.using_ints, (z, -2, -1))
            for node in (xs, y, z, flat):
                node.meta["nn_module_stack"] = lin.meta.get("nn_module_stack", {})
            lin.replace_input_with(x, flat)
            new_weights[lin] = weight(lin) @ torch.kron(a, b)
            online_count += 1
    # the embedding: a new table (a tied LM head keeps the old parameter, rotated above)
    table = rw.tensor(emb.args[0]).detach().double() @ q
    emb.replace_input_with(emb.args[0], rw.constant("rot_embedding", table.float().contiguous()))
    for key in list(new_weights):   # each float64 weight freed as its fp32 constant is made: not both sets at once
        w = new_weights.pop(key)
        lin, what = key if isinstance(key, tuple) else (key, "weight")
        idx = 2 if what == "bias" else 1
        lin.replace_input_with(lin.args[idx], rw.constant(f"rot_{lin.name}_{what}", w.float().contiguous()))
    return {"hidden": d, "norms_folded": folded, "writers": len(writers), "head_rotations": head_count,
            "online_rotations": online_count}


def _linear_of(weight_name: str, by_weight: dict):
    """The (first) linear reading the weight the attention index calls ``weight_name``."""
    return next((lins[0] for target, lins in by_weight.items() if is_weight(target, weight_name)), None)
