"""``tokopt::tca_attention``: attention over each head's core tokens (TCA-Attention's online part).

    tca_attention(q[B,H,Nq,d], k[B,Hkv,Nk,d], v[B,Hkv,Nk,dv], mask?, scale, causal,
                  budgets[Hkv], windows[Hkv], sinks, obs) -> [B,H,Nq,dv]

Every query attends, with one exact softmax, to three sets of keys:
    sinks      the first ``sinks`` valid keys of each row (a left-padded row's first real tokens),
               always;
    window     its local window: the ``windows[h]`` positions ending at itself (causal) or
               within ``windows[h] - 1`` on either side (bidirectional);
    selected   per KV head, the ``ceil(budgets[h] * Nk)`` keys that score highest under the
               lightweight metric: the attention that ``obs`` evenly spaced queries (the last
               one included) pay to the keys outside their local windows, summed over the
               queries of the head's group. One selection per head, shared by all queries (a
               per-query-block selection costs as much in gathers as it saves; see DESIGN.md),
               causally masked per query.
Queries sit at the end of the keys (a decode step's query is the last position). ``mask`` is
the model's attention mask; only its last query row is read, as the set of valid keys (padding).
A budget of 1 keeps every key: the op is then dense attention (up to float rounding).

Each KV head is computed on its own, so its cost is about Nq x (sinks + budget x Nk + window +
32) instead of Nq x Nk: the window part is computed in query blocks of ``QUERY_BLOCK`` rows
against the keys their windows can reach.
"""
from __future__ import annotations

import itertools

import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnxscript import opset23 as op

from .onnx_build import arange, dim, ints, is_bool
from .registry import OPSET, AttentionArgs, define_op, differentiable

__all__ = ["TCA", "TCA_CACHE", "tca_reference", "tca_cache_reference", "compact_size", "budget_counts", "valid_keys",
           "onnx_if", "onnx_sink_keys",
           "sink_keys", "select_keys", "QUERY_BLOCK"]

QUERY_BLOCK = 32  # window-part query block: each block reads (block + window) keys, not 2 windows


def valid_keys(mask: torch.Tensor | None, b: int, nk: int, device) -> torch.Tensor:
    """[B, Nk] bool: keys the last query may see (padding excluded)."""
    if mask is None:
        return torch.ones(b, nk, dtype=torch.bool, device=device)
    last = mask[..., -1, :].reshape(mask.shape[0], -1)
    ok = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return ok.expand(b, nk)


def budget_counts(budgets, total: int, device=None) -> torch.Tensor:
    """ceil(budget x total) per head, in float32 as the ONNX lowering computes it."""
    return (torch.tensor(budgets, dtype=torch.float32, device=device) * total).ceil().long()


def sink_keys(valid: torch.Tensor, sinks: int) -> torch.Tensor:
    """[..., Nk] bool: each row's first ``sinks`` valid keys."""
    return valid & (valid.long().cumsum(-1) <= sinks)


def select_keys(q, k, valid, scale, causal, budgets, sinks, window, obs, total=None):
    """Per KV head: indices of sinks + selected keys [B,Hkv,M], which of them count [B,Hkv,M],
    and the keys' scores [B,Hkv,Nk]. Budgets are fractions of ``total`` (default: Nk), the
    context a compacted cache stands for."""
    b, h, nq, d = q.shape
    hkv, nk, dev = k.shape[1], k.shape[2], q.device
    n = min(obs, nq)
    rows = (torch.arange(1, n + 1, device=dev) * nq) // n - 1            # evenly spaced, the last included
    logits = (q[:, :, rows].reshape(b, hkv, -1, d) @ k.transpose(-2, -1)) * scale   # [B,Hkv,G*n,Nk]
    gap = (rows + (nk - nq))[:, None] - torch.arange(nk, device=dev)     # [n, Nk]
    far = (gap >= window) if causal else (gap.abs() >= window)
    ok = far.repeat(h // hkv, 1)[None, None] & valid[:, None, None]
    score = logits.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0.0).sum(2)  # [B,Hkv,Nk]
    is_sink = sink_keys(valid, sinks)                                        # [B,Nk]
    score = score.masked_fill(is_sink[:, None], -1.0)                        # kept anyway, below
    counts = budget_counts(budgets, nk if total is None else total, dev).clamp(max=max(nk - sinks, 0))
    m = int(counts.max()) if counts.numel() else 0
    # a stable sort breaks ties toward the lower index, as ONNX's TopK does
    top = score.sort(dim=-1, descending=True, stable=True).indices[..., :m]   # [B,Hkv,M]
    ns = min(sinks, nk)
    # each row's sinks in key order (a row with fewer valid keys fills the slots with uncounted ones)
    first = (torch.arange(nk, device=dev) + (~is_sink) * nk).sort(-1).indices[:, :ns]   # [B,ns]
    idx = torch.cat([first[:, None].expand(b, hkv, ns), top], -1)
    ranked = (torch.arange(m, device=dev)[None, :] < counts[:, None]).expand(b, hkv, m)    # [B,Hkv,M]
    count = torch.cat([is_sink.gather(1, first)[:, None].expand(b, hkv, ns), ranked], -1)
    return idx, count & valid.gather(1, idx.reshape(b, -1)).reshape(idx.shape), score


def tca_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  causal: bool, budgets: list[float], windows: list[int], sinks: int, obs: int) -> torch.Tensor:
    """One KV head (and its query group) at a time, so each head's cost follows its own budget."""
    hkv = k.shape[1]
    g = q.shape[1] // hkv
    valid = valid_keys(mask, q.shape[0], k.shape[2], q.device)
    return torch.cat([_tca_heads(q[:, i * g:(i + 1) * g], k[:, i:i + 1], v[:, i:i + 1], valid, scale, causal,
                                 [budgets[i]], sinks, windows[i], obs)[0] for i in range(hkv)], 1)


def _tca_heads(q, k, v, valid, scale, causal, budgets, sinks, window, obs, total=None):
    b, h, nq, d = q.shape
    dev = q.device
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g, w = h // hkv, window
    qpos = torch.arange(nq, device=dev) + (nk - nq)                                     # absolute query positions
    qg = q.reshape(b, hkv, g * nq, d)

    # selected + sinks: each query sees those outside its window (the window part covers the rest)
    idx, count, score = select_keys(q, k, valid, scale, causal, budgets, sinks, w, obs, total)
    ks = k.gather(2, idx[..., None].expand(-1, -1, -1, d))
    vs = v.gather(2, idx[..., None].expand(-1, -1, -1, dv))
    gap = qpos[:, None] - idx[:, :, None, :]                                 # [B,Hkv,Nq,M]
    ok1 = count[:, :, None, :] & ((gap >= w) if causal else (gap.abs() >= w))
    l1 = (qg @ ks.transpose(-2, -1) * scale).reshape(b, hkv, g, nq, -1)
    l1 = l1.masked_fill(~ok1[:, :, None], float("-inf"))

    # local window, in query blocks of bq rows against the `span` keys their windows can reach
    bq = min(w, QUERY_BLOCK)
    nb = -(-nq // bq)
    span = bq + w if causal else bq + 2 * w
    starts = (nk - nq) + torch.arange(nb, device=dev) * bq + (0 if causal else 1)
    kidx = starts[:, None] + torch.arange(span, device=dev)
    kp = kidx - w                                                            # kidx is in keys padded by w
    kpad = torch.nn.functional.pad(k, (0, 0, w, span + bq))
    vpad = torch.nn.functional.pad(v, (0, 0, w, span + bq))
    kb = kpad[:, :, kidx.reshape(-1)].reshape(b, hkv, 1, nb, span, d)
    vb = vpad[:, :, kidx.reshape(-1)].reshape(b, hkv, 1, nb, span, dv)
    qb = torch.nn.functional.pad(qg.reshape(b, hkv, g, nq, d), (0, 0, 0, nb * bq - nq)).reshape(b, hkv, g, nb, bq, d)
    diff = ((nk - nq) + torch.arange(nb * bq, device=dev).reshape(nb, bq))[:, :, None] - kp[:, None, :]
    band = ((diff >= 0) & (diff < w)) if causal else (diff.abs() < w)
    validb = torch.nn.functional.pad(valid, (w, span + bq))[:, kidx.reshape(-1)].reshape(b, nb, 1, span)
    ok2 = band[None] & validb                                                # [B,nb,bq,span]
    l2 = ((qb @ kb.transpose(-2, -1)) * scale).masked_fill(~ok2[:, None, None], float("-inf"))

    # one softmax over both parts
    top = torch.maximum(l1.amax(-1), l2.amax(-1).reshape(b, hkv, g, nb * bq)[..., :nq])
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p1 = (l1 - top[..., None]).exp()
    p2 = (l2 - torch.nn.functional.pad(top, (0, nb * bq - nq)).reshape(b, hkv, g, nb, bq)[..., None]).exp()
    num = (p1 @ vs[:, :, None]) + (p2 @ vb).reshape(b, hkv, g, nb * bq, dv)[..., :nq, :]
    den = p1.sum(-1) + p2.sum(-1).reshape(b, hkv, g, nb * bq)[..., :nq]
    out = num / den.clamp_min(torch.finfo(den.dtype).tiny)[..., None]
    return out.reshape(b, h, nq, dv).to(q.dtype), score


PINNED = 1e9  # compaction priority of the sinks and the window: above any score


def compact_size(n: int, total: int, budgets, windows, sinks: int) -> int:
    """Entries a layer's compacted cache keeps out of ``n``: the largest head's sinks + window +
    ceil(budget x total)."""
    return min(n, max(min(sinks, n) + w + c for w, c in zip(windows, budget_counts(budgets, total).tolist())))


def tca_cache_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                        attention_mask: torch.Tensor, scale: float, budgets: list[float], windows: list[int],
                        sinks: int, obs: int):
    """The op on a generation graph's compacted cache (causal). ``k``/``v`` [B,Hkv,C+S,d] are the
    cache with this call's S keys appended, ``index`` [B,Hkv,C] the context position (a column of
    ``attention_mask`` [B,M]) of each cached entry; the new keys sit at M-S..M-1. Budgets are
    fractions of M. Returns the attention and the compacted cache (keys, values, positions): per
    KV head its sinks, its window and its best-scored keys, ``compact_size`` entries per head (a
    head with a smaller budget keeps its next-best keys in the layer's shared length), in
    context order, so that the window stays the last entries and the sinks the first."""
    b, hkv, n = k.shape[:3]
    s, m, g = q.shape[2], attention_mask.shape[1], q.shape[1] // hkv
    dev = q.device
    idx = torch.cat([index, torch.arange(m - s, m, device=dev).expand(b, hkv, s)], -1)       # [B,Hkv,n]
    valid = attention_mask[:, None].expand(b, hkv, m).gather(2, idx) > 0
    outs, scores = zip(*(_tca_heads(q[:, i * g:(i + 1) * g], k[:, i:i + 1], v[:, i:i + 1], valid[:, i], scale,
                                    True, [budgets[i]], sinks, windows[i], obs, total=m) for i in range(hkv)))
    keep = compact_size(n, m, budgets, windows, sinks)
    window = torch.arange(n, device=dev) >= n - torch.tensor(windows, device=dev)[:, None]     # [Hkv,n]
    prio = torch.where(valid, torch.cat(scores, 1), -1.0).masked_fill(sink_keys(valid, sinks) | window, PINNED)
    # a stable sort ranks ties toward the lower index, as ONNX's TopK does
    sel = prio.sort(dim=-1, descending=True, stable=True).indices[..., :keep].sort(-1).values           # [B,Hkv,keep]
    return (torch.cat(outs, 1), k.gather(2, sel[..., None].expand(-1, -1, -1, k.shape[-1])),
            v.gather(2, sel[..., None].expand(-1, -1, -1, v.shape[-1])), idx.gather(2, sel))


def _tca(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool,
         budgets: list[float], windows: list[int], sinks: int, obs: int) -> torch.Tensor:
    return tca_reference(q, k, v, mask, scale, causal, budgets, windows, sinks, obs)


def _tca_fake(q, k, v, mask, scale, causal, budgets, windows, sinks, obs):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


_TRUE = onnx.helper.make_tensor("true", onnx.TensorProto.BOOL, [], [True])


def _budget_counts(budgets, total):
    """``budget_counts`` in ONNX: ceil(budget x total) per head, int64 [Hkv]."""
    return op.Cast(op.Ceil(op.Mul(op.Constant(value_floats=list(budgets)), op.Cast(total, to=1))), to=7)


def onnx_sink_keys(valid, sinks: int):
    """``sink_keys`` in ONNX: each row's first ``sinks`` valid keys."""
    seen = op.CumSum(op.Cast(valid, to=7), op.Constant(value_int=-1))
    return op.And(valid, op.LessOrEqual(seen, op.Constant(value_int=sinks)))


def _tca_onnx(q, k, v, mask=None, scale: float = 1.0, causal: bool = True, budgets=(1.0,), windows=(64,),
              sinks: int = 4, obs: int = 16):
    """The reference, op for op, in standard ONNX (opset 23): per KV head, TopK selects,
    GatherElements and Gather fetch the selected and the windowed keys, one shared softmax
    normaliser; the heads' outputs are concatenated. Up to ``QUERY_BLOCK`` queries (a decode
    step on a whole cache) take ``_few_queries`` instead (an ``If``)."""
    b, nk = dim(q, 0), dim(k, 2)
    one = ints(1)
    bk = op.Concat(b, nk, axis=0)
    if mask is None:
        valid = op.Expand(op.Constant(value=_TRUE), bk)
    else:
        last = op.Gather(mask, op.Sub(dim(mask, 2), one), axis=2)                 # [B',1,1,Nk]
        last = op.Reshape(last, op.Concat(dim(mask, 0), nk, axis=0))
        valid = last if is_bool(mask) else \
            op.Greater(last, op.CastLike(op.Constant(value_float=-1e30), last))
        valid = op.Expand(valid, bk)
    def few():
        return _few_queries(q, k, v, op.Unsqueeze(valid, one), nk, scale, causal, budgets, windows, sinks, obs)[:1]

    def per_head():
        return (_cat_heads(_per_head(q, k, v, lambda i: valid, scale, causal, budgets, windows, sinks, obs)[0]),)

    return onnx_if(op.Squeeze(op.LessOrEqual(dim(q, 2), ints(QUERY_BLOCK))), few, per_head, dtype=q.dtype)[0]


def _cat_heads(xs):
    return xs[0] if len(xs) == 1 else op.Concat(*xs, axis=1)


def _per_head(q, k, v, valid_of, scale, causal, budgets, windows, sinks, obs, total=None):
    """``_tca_onnx_heads`` for each KV head (``valid_of(i)``: its valid keys [B,Nk]): the heads'
    attentions and their scores, two lists (``_cat_heads`` joins what a caller needs)."""
    one = ints(1)
    g = op.Div(dim(q, 1), ints(len(budgets)))
    outs, scores = [], []
    for i, (budget, window) in enumerate(zip(budgets, windows)):
        qi = op.Slice(q, op.Mul(g, ints(i)), op.Mul(g, ints(i + 1)), one)
        ki, vi = op.Slice(k, ints(i), ints(i + 1), one), op.Slice(v, ints(i), ints(i + 1), one)
        out, score = _tca_onnx_heads(qi, ki, vi, valid_of(i), scale, causal, budget, sinks, window, obs, total)
        outs.append(out)
        scores.append(score)
    return outs, scores


def _tca_onnx_heads(q, k, v, valid, scale, causal, budget, sinks, window, obs, total=None):
    """One KV head: (the attention [B,G,Nq,dv], the keys' scores [B,1,Nk])."""
    w = window
    bq = min(w, QUERY_BLOCK)
    span = bq + w if causal else bq + 2 * w
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), q)
    zero_f = op.CastLike(op.Constant(value_float=0.0), q)
    b, hkv, nq, nk, d, dv = dim(q, 0), dim(k, 1), dim(q, 2), dim(k, 2), dim(q, 3), dim(v, 3)
    off = op.Sub(nk, nq)
    one, zero = ints(1), ints(0)
    scale_c = op.CastLike(op.Constant(value_float=scale), q)
    # selection: evenly spaced queries score the keys outside their windows, summed per group
    n_obs = op.Min(nq, ints(obs))
    rows = op.Sub(op.Div(op.Mul(op.Add(arange(n_obs), one), nq), n_obs), one)        # [n]
    qs = op.Reshape(op.Gather(q, rows, axis=2), op.Concat(b, hkv, ints(-1), d, axis=0))
    kt = op.Transpose(k, perm=[0, 1, 3, 2])
    logits = op.Mul(op.MatMul(qs, kt), scale_c)                                       # [B,Hkv,G*n,Nk]
    gap = op.Sub(op.Unsqueeze(op.Add(rows, off), one), op.Unsqueeze(arange(nk), zero))
    far = op.GreaterOrEqual(gap if causal else op.Abs(gap), ints(window))
    groups = op.Div(dim(q, 1), hkv)
    ok = op.And(op.Unsqueeze(op.Tile(far, op.Concat(groups, one, axis=0)), ints(0, 1)),
                op.Unsqueeze(valid, ints(1, 2)))
    probs = op.Softmax(op.Where(ok, logits, neg_inf), axis=-1)
    score = op.ReduceSum(op.Where(op.IsNaN(probs), zero_f, probs), ints(2), keepdims=0)   # [B,Hkv,Nk]
    is_sink = onnx_sink_keys(valid, sinks)                                            # [B,Nk]
    score = op.Where(op.Unsqueeze(is_sink, one), op.CastLike(op.Constant(value_float=-1.0), q), score)
    room = op.Max(op.Sub(nk, ints(sinks)), zero)
    counts = op.Min(_budget_counts([budget], nk if total is None else total), room)   # [Hkv]
    m = op.ReduceMax(counts, keepdims=1)
    _, top = op.TopK(score, m, axis=-1)                                               # [B,Hkv,M]
    ns = op.Min(nk, ints(sinks))
    # each row's sinks in key order: the smallest of index + Nk x (not a sink)
    order = op.Add(op.Cast(arange(nk), to=1), op.Mul(op.Cast(op.Not(is_sink), to=1), op.Cast(nk, to=1)))
    _, first = op.TopK(order, ns, axis=-1, largest=0)                                  # [B,ns]
    bhs = op.Concat(b, hkv, ns, axis=0)
    idx = op.Concat(op.Expand(op.Unsqueeze(first, one), bhs), top, axis=-1)            # [B,Hkv,M']
    ranked = op.Less(op.Unsqueeze(arange(m), zero),
                     op.Unsqueeze(counts, one))                                       # [Hkv,M]
    count = op.Concat(op.Expand(op.Unsqueeze(op.GatherElements(is_sink, first, axis=1), one), bhs),
                      op.Expand(op.Unsqueeze(ranked, zero), op.Concat(b, hkv, m, axis=0)), axis=-1)
    count = op.And(count,
                   op.GatherElements(op.Expand(op.Unsqueeze(valid, one), op.Concat(b, hkv, nk, axis=0)), idx, axis=2))
    mp = dim(idx, 2)
    ks = op.GatherElements(k, op.Expand(op.Unsqueeze(idx, ints(3)), op.Concat(b, hkv, mp, d, axis=0)), axis=2)
    vs = op.GatherElements(v, op.Expand(op.Unsqueeze(idx, ints(3)), op.Concat(b, hkv, mp, dv, axis=0)), axis=2)
    qpos = op.Add(arange(nq), off)
    gap = op.Sub(op.Unsqueeze(qpos, ints(0, 1, 3)), op.Unsqueeze(idx, ints(2)))    # [B,Hkv,Nq,M']
    far = op.GreaterOrEqual(gap if causal else op.Abs(gap), ints(w))
    ok1 = op.And(op.Unsqueeze(count, ints(2)), far)
    # scale q once and mask by adding a bias built at the group-shared size: both cheaper than
    # scaling and selecting over the G-times larger logits
    qg = op.Mul(op.Reshape(q, op.Concat(b, hkv, ints(-1), d, axis=0)), scale_c)     # [B,Hkv,G*Nq,d]
    l1 = op.MatMul(qg, op.Transpose(ks, perm=[0, 1, 3, 2]))
    l1 = op.Reshape(l1, op.Concat(b, hkv, ints(-1), nq, mp, axis=0))                 # [B,Hkv,G,Nq,M']
    l1 = op.Add(l1, op.Unsqueeze(op.Where(ok1, zero_f, neg_inf), ints(2)))

    # local window
    nb = op.Div(op.Add(nq, ints(bq - 1)), ints(bq))
    nbw = op.Mul(nb, ints(bq))
    starts = op.Add(op.Add(op.Mul(arange(nb), op.Constant(value_int=bq)), off), ints(0 if causal else 1))
    kidx = op.Add(op.Unsqueeze(starts, one), op.Unsqueeze(arange(ints(span)), zero))  # [nb,span]
    flat = op.Reshape(kidx, ints(-1))
    pads = ints(0, 0, w, 0, 0, 0, span + bq, 0)
    kb = op.Reshape(op.Gather(op.Pad(k, pads), flat, axis=2), op.Concat(b, hkv, one, nb, ints(span), d, axis=0))
    vb = op.Reshape(op.Gather(op.Pad(v, pads), flat, axis=2), op.Concat(b, hkv, one, nb, ints(span), dv, axis=0))
    q5 = op.Reshape(qg, op.Concat(b, hkv, ints(-1), nq, d, axis=0))
    qpad = op.Concat(ints(0, 0, 0, 0, 0, 0, 0, 0), op.Sub(nbw, nq), zero, axis=0)
    qb = op.Reshape(op.Pad(q5, qpad), op.Concat(b, hkv, ints(-1), nb, ints(bq), d, axis=0))
    qp = op.Reshape(op.Add(arange(nbw), off), op.Concat(nb, ints(bq, 1), axis=0))   # [nb,bq,1]
    diff = op.Sub(qp, op.Unsqueeze(op.Sub(kidx, ints(w)), one))                        # [nb,bq,span]
    if causal:
        band = op.And(op.GreaterOrEqual(diff, zero), op.Less(diff, ints(w)))
    else:
        band = op.Less(op.Abs(diff), ints(w))
    vpad = op.Pad(op.Cast(valid, to=6), ints(0, w, 0, span + bq))
    validb = op.Reshape(op.Gather(vpad, flat, axis=1), op.Concat(b, nb, one, ints(span), axis=0))
    ok2 = op.Unsqueeze(op.And(op.Unsqueeze(band, zero), op.Cast(validb, to=9)), ints(1, 2))
    l2 = op.MatMul(qb, op.Transpose(kb, perm=[0, 1, 2, 3, 5, 4]))                      # [B,Hkv,G,nb,bq,span]
    l2 = op.Add(l2, op.Where(ok2, zero_f, neg_inf))

    # one softmax normaliser over both parts
    m1 = op.ReduceMax(l1, ints(-1), keepdims=0)                                       # [B,Hkv,G,Nq]
    m2 = op.ReduceMax(l2, ints(-1), keepdims=0)
    m2 = op.Slice(op.Reshape(m2, op.Concat(b, hkv, ints(-1), nbw, axis=0)), zero, nq, ints(3))
    top_ = op.Max(m1, m2)
    top_ = op.Where(op.IsInf(top_), zero_f, top_)
    p1 = op.Exp(op.Sub(l1, op.Unsqueeze(top_, ints(-1))))
    topb = op.Reshape(op.Pad(top_, op.Concat(ints(0, 0, 0, 0, 0, 0, 0), op.Sub(nbw, nq), axis=0)),
                      op.Concat(b, hkv, ints(-1), nb, ints(bq, 1), axis=0))
    p2 = op.Exp(op.Sub(l2, topb))
    num1 = op.MatMul(p1, op.Unsqueeze(vs, ints(2)))                                   # [B,Hkv,G,Nq,dv]
    num2 = op.Reshape(op.MatMul(p2, vb), op.Concat(b, hkv, ints(-1), nbw, dv, axis=0))
    num2 = op.Slice(num2, zero, nq, ints(3))
    den2 = op.Slice(op.Reshape(op.ReduceSum(p2, ints(-1), keepdims=0), op.Concat(b, hkv, ints(-1), nbw, axis=0)),
                    zero, nq, ints(3))
    den = op.Add(op.ReduceSum(p1, ints(-1), keepdims=0), den2)
    den = op.Max(den, op.CastLike(op.Constant(value_float=torch.finfo(torch.float32).tiny), q))
    out = op.Div(op.Add(num1, num2), op.Unsqueeze(den, ints(-1)))
    return op.Reshape(out, op.Concat(b, ints(-1), nq, dv, axis=0)), score


# Hand lowering: an If picks, at run time, one selection over all heads for up to QUERY_BLOCK
# queries (a decode step: 2.4 ms a step at 1K context vs 7.9 ms for the per-head form that the
# decomposed reference gives, measured in session 6's fixed-shape loop).
TCA = define_op("tokopt::tca_attention", _tca, _tca_fake, onnx=_tca_onnx, tags=("attention", "sparse"),
                attention=lambda a: AttentionArgs(*a[:6]))
differentiable("tokopt::tca_attention", tca_reference, grads_for=3)


def _tca_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, attention_mask: torch.Tensor,
               scale: float, budgets: list[float], windows: list[int], sinks: int,
               obs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tca_cache_reference(q, k, v, index, attention_mask, scale, budgets, windows, sinks, obs)


def _tca_cache_fake(q, k, v, index, attention_mask, scale, budgets, windows, sinks, obs):
    keep = torch.library.get_ctx().new_dynamic_size()
    b, hkv = k.shape[:2]
    return (q.new_empty((*q.shape[:-1], v.shape[-1])), k.new_empty((b, hkv, keep, k.shape[-1])),
            v.new_empty((b, hkv, keep, v.shape[-1])), index.new_empty((b, hkv, keep)))


_BRANCHES = itertools.count()


def _branch(name: str, build):
    """What ``build()`` emits, recorded as a graph (an ``If`` branch) instead of into the graph
    being exported. The torch exporter records each lowering's nodes in its onnxscript evaluator
    and shares Python-constant values across the export; both are set aside meanwhile, so that
    no value made inside the branch is used outside it."""
    rec = onnxscript.evaluator.default()
    if not (isinstance(getattr(rec, "nodes", None), list) and isinstance(getattr(rec, "constant_farm", None), dict)):
        raise RuntimeError("tca: this torch's ONNX exporter records nodes differently from torch 2.13's, which "
                           "the TCA lowering's If branches are built for; install torch==2.13.0.")
    nodes, farm = rec.nodes, rec.constant_farm
    rec.nodes, rec.constant_farm = [], {}
    try:
        outs = build()
        tag = f"{name}{next(_BRANCHES)}"
        for i, value in enumerate(v for node in rec.nodes for v in node.outputs):
            value.name = f"{tag}_{i}"     # the exporter names each graph's values from val_0 on
        return ir.Graph((), outs, nodes=rec.nodes, name=tag)
    finally:
        rec.nodes, rec.constant_farm = nodes, farm


def onnx_if(cond, then, otherwise, dtype):
    """ONNX ``If``: ``then()`` or ``otherwise()`` at run time (each returns the same number of
    ``dtype`` tensors)."""
    then_graph, else_graph = _branch("then", then), _branch("else", otherwise)
    node = ir.Node("", "If", [cond], attributes=[ir.AttrGraph("then_branch", then_graph),
                                                  ir.AttrGraph("else_branch", else_graph)],
                   num_outputs=len(then_graph.outputs), version=OPSET)
    onnxscript.evaluator.default().nodes.append(node)
    for out in node.outputs:
        out.dtype = dtype
    return node.outputs


def _few_queries(q, k, v, valid, total, scale, causal, budgets, windows, sinks, obs):
    """Attention and key scores for all KV heads at once, each query row over every key masked to
    its head's sinks + window + selected keys (``valid`` [B,Hkv or 1,n]; budgets are fractions of
    ``total``). Exact as the per-head form; costs S x n per head instead of S x (window + budget
    x total), so only for a few queries."""
    b, hkv, s, n, d, dv = dim(q, 0), dim(k, 1), dim(q, 2), dim(k, 2), dim(q, 3), dim(v, 3)
    one, zero = ints(1), ints(0)
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), q)
    zero_f = op.CastLike(op.Constant(value_float=0.0), q)
    # unscaled product, then the scale: the scores round as the per-head form's
    qg = op.Reshape(q, op.Concat(b, hkv, ints(-1), d, axis=0))                           # [B,Hkv,G*S,d]
    logits = op.Mul(op.MatMul(qg, op.Transpose(k, perm=[0, 1, 3, 2])), op.CastLike(op.Constant(value_float=scale), q))
    logits = op.Reshape(logits, op.Concat(b, hkv, ints(-1), s, n, axis=0))               # [B,Hkv,G,S,n]
    gap = op.Sub(op.Unsqueeze(op.Add(arange(s), op.Sub(n, s)), one), op.Unsqueeze(arange(n), zero))   # [S,n]
    far = op.GreaterOrEqual(op.Unsqueeze(gap if causal else op.Abs(gap), zero),
                            op.Reshape(ints(*windows), ints(-1, 1, 1)))                 # [Hkv,S,n]
    near = op.And(op.Unsqueeze(op.GreaterOrEqual(gap, zero), zero), op.Not(far)) if causal else op.Not(far)
    # scores: what the evenly spaced observation rows pay to the keys outside their windows
    n_obs = op.Min(s, ints(obs))
    rows = op.Sub(op.Div(op.Mul(op.Add(arange(n_obs), one), s), n_obs), one)
    ok = op.And(op.Unsqueeze(op.Gather(far, rows, axis=1), ints(0, 2)), op.Unsqueeze(valid, ints(2, 3)))
    probs = op.Softmax(op.Where(ok, op.Gather(logits, rows, axis=3), neg_inf), axis=-1)
    score = op.ReduceSum(op.Where(op.IsNaN(probs), zero_f, probs), ints(2, 3), keepdims=0)   # [B,Hkv,n]
    is_sink = onnx_sink_keys(valid, sinks)                                                  # [B,Hkv|1,n]
    score = op.Where(is_sink, op.CastLike(op.Constant(value_float=-1.0), q), score)
    # each head's ceil(budget x total) best-scored keys, ranked by one TopK
    counts = op.Min(_budget_counts(budgets, total), op.Max(op.Sub(n, ints(sinks)), zero))   # [Hkv]
    most = op.ReduceMax(counts, keepdims=1)
    _, top = op.TopK(score, most, axis=-1)                                                # [B,Hkv,M]
    ranked = op.Cast(op.Less(op.Unsqueeze(arange(most), zero), op.Unsqueeze(counts, one)), to=1)
    chosen = op.ScatterElements(op.ConstantOfShape(op.Concat(b, hkv, n, axis=0)), top,
                                op.Expand(ranked, op.Shape(top)), axis=2)
    core = op.Unsqueeze(op.Or(op.Greater(chosen, op.Constant(value_float=0.5)), is_sink), ints(2, 3))
    near, far = op.Unsqueeze(near, ints(0, 2)), op.Unsqueeze(far, ints(0, 2))             # [1,Hkv,1,S,n]
    attend = op.And(op.Unsqueeze(valid, ints(2, 3)), op.Or(near, op.And(far, core)))
    masked = op.Add(logits, op.Where(attend, zero_f, neg_inf))                            # [B,Hkv,G,S,n]
    top_ = op.ReduceMax(masked, ints(-1), keepdims=1)
    p = op.Exp(op.Sub(masked, op.Where(op.IsInf(top_), zero_f, top_)))
    den = op.Max(op.ReduceSum(p, ints(-1), keepdims=1),
                 op.CastLike(op.Constant(value_float=torch.finfo(torch.float32).tiny), q))
    out = op.Div(op.MatMul(p, op.Unsqueeze(v, ints(2))), den)                             # [B,Hkv,G,S,dv]
    return op.Reshape(out, op.Concat(b, ints(-1), s, dv, axis=0)), score


def _tca_cache_onnx(q, k, v, index, attention_mask, scale: float = 1.0, budgets=(1.0,), windows=(64,),
                    sinks: int = 4, obs: int = 16):
    """The cache reference in standard ONNX: the attention as in ``_tca_onnx`` (per KV head) for a
    prefill, or for up to ``QUERY_BLOCK`` new tokens (a decode step) all heads at once over every
    cache entry (``_few_queries``: some 90 nodes a layer instead of some 190 per head, which is
    what a decode step's time goes to); an ``If`` picks one at run time. Then TopK over the
    compaction priority and a smallest-first TopK that puts the kept entries back in context
    order."""
    b, hkv, n, s, m = dim(k, 0), dim(k, 1), dim(k, 2), dim(q, 2), dim(attention_mask, 1)
    one, zero = ints(1), ints(0)
    bhm = op.Concat(b, hkv, m, axis=0)
    new = op.Expand(op.Range(op.Squeeze(op.Sub(m, s)), op.Squeeze(m), op.Constant(value_int=1)),
                    op.Concat(b, hkv, s, axis=0))
    idx = op.Concat(index, new, axis=-1)                                                   # [B,Hkv,n]
    seen = op.GatherElements(op.Expand(op.Unsqueeze(attention_mask, one), bhm), idx, axis=2)
    valid = op.Greater(seen, op.CastLike(op.Constant(value_int=0), seen))

    def valid_of(i):
        return op.Squeeze(op.Slice(valid, ints(i), ints(i + 1), one), one)

    few = op.Squeeze(op.LessOrEqual(s, ints(QUERY_BLOCK)))
    out, score = onnx_if(few, lambda: _few_queries(q, k, v, valid, m, scale, True, budgets, windows, sinks, obs),
                         lambda: tuple(map(_cat_heads, _per_head(q, k, v, valid_of, scale, True, budgets, windows,
                                                                 sinks, obs, total=m))),
                         dtype=q.dtype)
    ns = op.Min(n, ints(sinks))
    wins = ints(*windows)                                                                  # [Hkv]
    keep = op.Min(n, op.ReduceMax(op.Add(op.Add(ns, wins), _budget_counts(budgets, m)), keepdims=1))
    window = op.GreaterOrEqual(op.Unsqueeze(arange(n), zero), op.Unsqueeze(op.Sub(n, wins), one))   # [Hkv,n]
    pinned = op.Or(onnx_sink_keys(valid, sinks), op.Unsqueeze(window, zero))              # [B,Hkv,n]
    prio = op.Where(valid, score, op.CastLike(op.Constant(value_float=-1.0), score))
    prio = op.Where(pinned, op.CastLike(op.Constant(value_float=PINNED), score), prio)
    _, sel = op.TopK(prio, keep, axis=-1)
    sel, _ = op.TopK(sel, keep, axis=-1, largest=0)                                        # context order
    d, dv = dim(k, 3), dim(v, 3)
    ks = op.GatherElements(k, op.Expand(op.Unsqueeze(sel, ints(3)), op.Concat(b, hkv, keep, d, axis=0)), axis=2)
    vs = op.GatherElements(v, op.Expand(op.Unsqueeze(sel, ints(3)), op.Concat(b, hkv, keep, dv, axis=0)), axis=2)
    return out, ks, vs, op.GatherElements(idx, sel, axis=2)


# Hand lowering for the same If-guarded decode path (decode step 5.0 -> 2.7 ms at 1K context).
TCA_CACHE = define_op("tokopt::tca_cache_attention", _tca_cache, _tca_cache_fake, onnx=_tca_cache_onnx,
                      tags=("attention", "sparse", "cache"),
                      attention=lambda a: AttentionArgs(a[0], a[1], a[2], None, a[5], True))
