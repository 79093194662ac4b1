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
from pathlib import Path

import torch

from ..optimizer.patterns import PASS_THROUGH
from ..optimizer.program import Rewrite, call_function_nodes, remove_dead_code
from ..optimizer.resources import file_backed, page_out_tensor, release_heap
from .linears import is_weight

__all__ = ["rotate", "NotRotatable", "random_hadamard_factors", "hadamard", "hadamard_factors", "kron_right"]

aten = torch.ops.aten
_VIEWS = PASS_THROUGH + (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                         aten.slice.Tensor, aten._to_copy.default,
                         aten.index_select.default)   # a generation graph's pick of the positions to score


_CASTS = PASS_THROUGH + (aten._to_copy.default,)
# the online rotation's Hadamard order from which its graph applies two Kronecker factors
_FACTOR_FROM = 1024


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


def random_hadamard_factors(n: int, gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """An orthogonal ``n x n`` matrix diag(signs) kron(*factors), as (signs, factors): a Hadamard
    with random signs, times a random orthogonal matrix of the odd part of ``n`` (Kronecker
    product) when ``n`` is not a power of two; ``kron_right`` applies it."""
    two = n & -n
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return signs, [f for f in [random_orthogonal(n // two, gen), *hadamard_factors(two)] if len(f) > 1]


def hadamard_factors(n: int) -> list[torch.Tensor]:
    """``hadamard(n)`` as two Kronecker factors (Sylvester's H_ab = H_a x H_b): ``kron_right``
    then takes about 2 sqrt(n) products a value instead of n."""
    half = 1 << (n.bit_length() - 1) // 2
    return [hadamard(half), hadamard(n // half)]


def kron_right(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """``x @ kron(*factors)`` over ``x``'s last axis, one factor's axis at a time."""
    shape, k = x.shape, len(factors)
    x = x.reshape(*shape[:-1], *(len(f) for f in factors))
    for i, f in enumerate(factors):
        axis = x.dim() - k + i
        x = (x.movedim(axis, -1) @ f).movedim(-1, axis)
    return x.reshape(shape)


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


def rotate(rw: Rewrite, seed: int = 0, online: bool = True, heads: bool = True, spill: Path | None = None) -> dict:
    """Rotate the graph being rewritten (see module doc); returns what was rotated.
    ``heads=False`` leaves values unrotated (a --generate graph's cache keeps the model's
    layout). ``spill``: a folder the rotated weights are mapped from (``file_backed``), so they
    leave memory as the original ones do. Raises ``NotRotatable`` before touching the graph."""
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
    signs, factors = random_hadamard_factors(d, gen)

    def rotated(x):   # x @ q, the stream's random orthogonal q applied by its factors
        return kron_right(x * signs, factors)
    # each weight's transforms are planned first and applied at the end one weight at a time, so
    # one float64 weight is alive at once instead of the whole model in float64 (4x its fp32 size)
    plan: dict = {}   # (linear node, "weight" | "bias") -> [(float64 -> float64 transform, by rows), in order]

    def then(lin, f, what="weight", rows=True):
        """``rows``: ``f`` maps each row on its own (a transform of the inputs), so a large weight is
        transformed a slice of rows at a time (an LM head over 152K tokens is 1 GB in float64)."""
        plan.setdefault((lin, what), []).append((f, rows))

    folded = 0
    ones = rw.constant("rot_norm_ones", torch.ones(d)) if norms else None
    for w_mul, (x, wnode) in norms.items():
        gvec = rw.tensor(wnode).detach().double()
        for lin in readers[w_mul]:
            then(lin, lambda w, gvec=gvec: rotated(w * gvec[None]))
        # the folded norm keeps a weight of ones: the same function, in the form runtimes fuse
        # into one RMSNorm kernel (ONNX Runtime's SimplifiedLayerNormalization)
        w_mul.replace_input_with(wnode, ones)
        folded += 1
    for lin in writers:
        then(lin, lambda w: rotated(w.T).T, rows=False)
        if len(lin.args) > 2 and lin.args[2] is not None:
            then(lin, rotated, "bias", rows=False)
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
        hd, kv, h, dh = hadamard(block.head_dim), block.kv_heads, block.heads, block.head_dim
        then(v_lin, lambda w, hd=hd, kv=kv, dh=dh: (hd.T @ w.reshape(kv, dh, -1)).reshape(w.shape), rows=False)
        if len(v_lin.args) > 2 and v_lin.args[2] is not None:
            then(v_lin, lambda b, hd=hd, kv=kv: (b.reshape(kv, 1, -1) @ hd).reshape(-1), "bias", rows=False)
        then(o_lin, lambda w, hd=hd, h=h, dh=dh: (w.reshape(w.shape[0], h, dh) @ hd).reshape(w.shape))
        head_count += 1
    o_lins = {_linear_of(b.o_proj, by_weight) for b in rw.attention if b.o_proj}
    online_count = 0
    if online:
        for lin in writers:
            if lin in o_lins:
                continue
            k = rw.tensor(lin.args[1]).shape[1]
            two = k & -k
            a = random_orthogonal(k // two, gen)
            # a large Hadamard by its two factors (2 sqrt(n) products a value, not n; and not a dense
            # n x n constant: 256 MB a layer at 8192); a small one in one product, one op fewer
            bs = hadamard_factors(two) if two >= _FACTOR_FROM else [hadamard(two)]
            x = lin.args[0]
            ca = rw.constant(f"rot_{lin.name}_a", a.T.float().contiguous())
            cbs = [rw.constant(f"rot_{lin.name}_b{i}", b.float().contiguous()) for i, b in enumerate(bs)]
            with g.inserting_before(lin):
                made = [g.call_function(aten.unflatten.int, (x, -1, [k // two, *(len(b) for b in bs)]))]
                made.append(g.call_function(aten.matmul.default, (made[-1], cbs[-1])))
                if len(bs) == 2:   # H_a x H_b: H_b on the last axis, then H_a (symmetric) on the one before
                    made.append(g.call_function(aten.matmul.default, (cbs[0], made[-1])))
                    made.append(g.call_function(aten.flatten.using_ints, (made[-1], -2, -1)))
                made.append(g.call_function(aten.matmul.default, (ca, made[-1])))
                made.append(g.call_function(aten.flatten.using_ints, (made[-1], -2, -1)))
            for node in made:
                node.meta["nn_module_stack"] = lin.meta.get("nn_module_stack", {})
            flat = made[-1]
            lin.replace_input_with(x, flat)
            # w @ kron(a, b) by its factors (b's too), not a k x k product
            then(lin, lambda w, a=a, two=two: kron_right(w, [a, *hadamard_factors(two)]))
            online_count += 1
    # the embedding: a new table (a tied LM head keeps the old parameter, rotated above)
    for node, idx, name, steps in [(emb, 0, "rot_embedding", [(rotated, True)]), *(
            (lin, 2 if what == "bias" else 1, f"rot_{lin.name}_{what}", steps) for (lin, what), steps in plan.items())]:
        old = rw.tensor(node.args[idx])
        # fp32, a half-precision checkpoint's too: rounded to bf16, the rotated weights cost int4 quality (README)
        new = _apply(old, steps, torch.empty if spill is None else lambda shape: file_backed(shape, spill))
        node.replace_input_with(node.args[idx], rw.constant(name, new))
        # the old weight's pages (and the new one's, on disk) leave memory as the next is made, and
        # float64 temporaries leave no holes: the rotation holds about one weight, not two models
        page_out_tensor(old)
        page_out_tensor(new)
        release_heap()
    # the replaced weights' reads go: a run executes dead nodes too, and a half-precision weight's
    # read is a cast, an fp32 copy of it held to the run's end (an 8B model's 32 GB)
    remove_dead_code(g)
    return {"hidden": d, "norms_folded": folded, "writers": len(writers), "head_rotations": head_count,
            "online_rotations": online_count}


def _apply(w: torch.Tensor, steps: list, make, chunk: int = 4096) -> torch.Tensor:
    """``w`` through ``steps`` in float64, into a new float32 tensor ``make(shape)``; by slices of
    rows where every step maps rows on their own."""
    if not all(rows for _, rows in steps) or w.dim() != 2:
        chunk = w.shape[0]
    out = make(w.shape)
    for i in range(0, w.shape[0], chunk):
        x = w[i:i + chunk].detach().double()
        for f, _ in steps:
            x = f(x)
        out[i:i + chunk] = x
    return out


def _linear_of(weight_name: str, by_weight: dict):
    """The (first) linear reading the weight the attention index calls ``weight_name``."""
    return next((lins[0] for target, lins in by_weight.items() if is_weight(target, weight_name)), None)
