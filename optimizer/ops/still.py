"""``tokopt::still_attention``: STILL's intra-layer hybrid of exact softmax and linear attention.

    still_attention(q[B,H,N,d], k[B,Hkv,N,d], v[B,Hkv,N,dv], x[B,N,D], gate_w[H*dv,D],
                    fq_u[H,d]?, fq_w[H,d,d]?, fk_u[H,d]?, fk_w[H,d,d]?, mix[H]?, mask?, scale, causal,
                    top_k, chunk, feature, exact_window) -> [B,H,N,dv]

Per query head, the sequence is cut into chunks of ``chunk`` tokens (zero-padded at the end).
1. Self-saliency (STILL's KL form): for token t, ``a`` is its query's softmax over the window of
   the last ``chunk`` keys (itself included, raw q and k), ``b`` the same without its own key;
   ``S_t = sum_j a~ log(a~ / (b~ + eps))`` with STILL's smoothing (ALGORITHMS.md, 1(a)2). A
   bidirectional block's window is the token's own chunk.
2. Routing: the ``top_k`` tokens of each chunk with the largest S are salient.
3. Query t in chunk c attends with exact softmax to its local window (causal: chunk c-1 and chunk
   c up to t; bidirectional: chunks c-1..c+1) and to the salient tokens of every other chunk
   that it may see (causal: chunks <= c-2, so a chunk's routing takes effect once it has left
   the window, as STILL delays it). The non-salient tokens of those chunks are summarised by
   linear attention through the feature map phi, as running sums over chunks:
       num = sum_E exp(s - m) v + g * (phi(q)^T sum_L phi(k) v^T)
       den = sum_E exp(s - m)   +      phi(q)^T sum_L phi(k)      + 1e-6
   one normaliser shared by both parts, the linear part not rescaled by exp(-m) (STILL, as
   LoLCATs), the gate ``g = sigmoid(x gate_w^T)`` on the linear numerator only. ``mix``
   (optional, per head) scales the whole linear part, numerator and normaliser, by
   ``sigmoid(mix)``: the window factor of the LoLCATs path in STILL's code (initialised there to
   sigmoid(-2.197) = 0.1). STILL's main path has no such factor; without it the linear
   normaliser, whose floor NP-Map's norm re-injection fixes, cannot be made small where the
   linear summary hurts, and attention transfer converges to a 2.5x larger error (measured on
   the reference LM's layer 2: 0.38 vs 0.15 relative output error on held-out windows).

Feature maps (``feature``): 0 NP-Map (Householder reflection ``u``, per-head linear ``W``, the
pretrained norm re-injected, [softmax, softmax(-)], 2d features), 1 Hedgehog (the same without
reflection and norm), 2 elu+1 (no parameters), 3 none (no linear part: softmax over the exact
set only, the sliding-window baseline when ``top_k=0``). ``exact_window=False`` summarises the
local window linearly too (with ``top_k=0``: pure linear attention, causal within the chunk).

With ``top_k >= chunk`` every token is salient, the linear part is empty and the op is softmax
attention (up to the 1e-6 in the normaliser). Cost per query: ``2 chunk + top_k N / chunk``
exact keys plus an O(d^2) state read, so at a fixed ratio ``top_k / chunk`` the exact part is
``top_k / chunk`` of dense and the rest is linear in N. ``mask``: only its last query row is
read, as the set of valid keys (padding); queries and keys are the same tokens (prefill).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnxscript import opset23 as op

from .registry import AttentionArgs, define_op, differentiable
from .onnx_build import arange, dim, ints, is_bool
from .tca import valid_keys

__all__ = ["STILL", "still_reference", "route", "linear_state", "feature_map", "FEATURES", "EPS"]

FEATURES = {"npmap": 0, "hedgehog": 1, "elu": 2, "none": 3}
EPS = 1e-8       # saliency smoothing (STILL's code)
DEN_EPS = 1e-6   # normaliser floor (STILL's code)


def feature_map(x: torch.Tensor, u: torch.Tensor | None, w: torch.Tensor | None, feature: int) -> torch.Tensor:
    """phi(x) for x [B,H,...,d]; u [H,d], w [H,d,d] per head."""
    if feature == 2:
        return F.elu(x) + 1
    shape = (1, -1) + (1,) * (x.dim() - 3)
    if feature == 0:
        unit = F.normalize(u, dim=-1).reshape(*shape, u.shape[-1])
        y = x - 2 * (x * unit).sum(-1, keepdim=True) * unit
    else:
        y = x
    y = torch.einsum("bh...d,hed->bh...e", y, w)
    if feature == 0:
        y = x.norm(dim=-1, keepdim=True) * y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cat([y.softmax(-1), (-y).softmax(-1)], -1).clamp_min(1e-12)


def _chunks(t: torch.Tensor, c: int, l: int) -> torch.Tensor:
    """[B,H,N,e] -> [B,H,C,l,e], zero-padded."""
    return F.pad(t, (0, 0, 0, c * l - t.shape[2])).reshape(t.shape[0], t.shape[1], c, l, t.shape[-1])


def _shift(t: torch.Tensor, by: int) -> torch.Tensor:
    """Chunk c of the result holds chunk c - by of ``t`` (zeros where that does not exist); dim 2."""
    c = t.shape[2]
    if by >= 0:
        return F.pad(t, (0,) * (2 * (t.dim() - 3)) + (by, 0))[:, :, :c]
    return F.pad(t, (0,) * (2 * (t.dim() - 3)) + (0, -by))[:, :, -by:]


def saliency(logits: torch.Tensor, window: torch.Tensor, self_slot: torch.Tensor, l: int) -> torch.Tensor:
    """STILL's self-saliency from local logits [..., l, K] over the ``window`` slots [..., l, K]
    (bool), ``self_slot`` [l, K] marking each query's own key."""
    neg = torch.finfo(logits.dtype).min
    a = logits.masked_fill(~window, neg).softmax(-1) * window
    others = window & ~self_slot
    b = logits.masked_fill(~others, neg).softmax(-1) * others
    delta = 1.0 / l
    at = (a + EPS) / (1 + l * EPS)
    bt = torch.where(self_slot, torch.full_like(b, delta + EPS), (b + EPS) / (1 + l * EPS + delta))
    return (window * at * torch.log(at / (bt + EPS))).sum(-1)


class Routed(NamedTuple):
    """What the exact and the linear parts share (also the Triton kernel's inputs)."""
    qc: torch.Tensor       # [B,H,C,l,d] chunked queries (zero-padded), GQA-expanded keys and values
    kc: torch.Tensor
    vc: torch.Tensor
    gc: torch.Tensor       # [B,H,C,l,dv] gate
    valid: torch.Tensor    # [B,1,C,l] real, unpadded tokens
    spans: tuple           # chunk offsets of the local window: c - s for s in spans
    local: torch.Tensor    # [B,1,C,l,K] which local keys each query sees
    logits: torch.Tensor   # [B,H,C,l,K] local logits
    top: torch.Tensor      # [B,H,C,kk] salient tokens' in-chunk indices
    salient: torch.Tensor  # [B,H,C,l]


def route(q, k, v, x, gate_w, mask, scale: float, causal: bool, top_k: int, chunk: int) -> Routed:
    """Chunking, local logits, self-saliency and the top-k routing of every chunk."""
    bsz, h, n, _ = q.shape
    dv, l = v.shape[-1], chunk
    g = h // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    c = -(-n // l)
    dev = q.device
    valid = F.pad(valid_keys(mask, bsz, n, dev), (0, c * l - n)).reshape(bsz, 1, c, l)
    qc, kc, vc = _chunks(q, c, l), _chunks(k, c, l), _chunks(v, c, l)
    gate = torch.sigmoid(x @ gate_w.t()).reshape(bsz, n, h, dv).transpose(1, 2)

    # local keys: causal chunks c-1, c; bidirectional c-1, c, c+1 (slot j: offset j - l from chunk c's start)
    spans = (1, 0) if causal else (1, 0, -1)
    kl = torch.cat([_shift(kc, s) for s in spans], 3)                                       # [B,H,C,K,d]
    vall = torch.cat([_shift(valid, s) for s in spans], 3)                                  # [B,1,C,K]
    i = torch.arange(l, device=dev)[:, None]
    j = torch.arange(len(spans) * l, device=dev)[None, :] - l                               # offset of the key
    local = vall[:, :, :, None, :] & ((j <= i) if causal else torch.ones_like(j <= i))     # [B,1,C,l,K]
    logits = (qc @ kl.transpose(-2, -1)) * scale

    win = local & (((j > i - l) & (j <= i)) if causal else ((j >= 0) & (j < l)))
    score = saliency(logits, win.expand_as(logits), (j == i).expand(l, -1), l)
    score = score.masked_fill(~valid, float("-inf"))
    # a stable sort breaks ties toward the lower index, as ONNX's TopK does
    top = score.sort(dim=-1, descending=True, stable=True).indices[..., :min(top_k, l)]
    salient = torch.zeros_like(score, dtype=torch.bool).scatter(-1, top, True) & valid
    return Routed(qc, kc, vc, _chunks(gate, c, l), valid, spans, local, logits, top, salient)


def linear_state(r: Routed, fq_u, fq_w, fk_u, fk_w, mix, feature: int):
    """phi(q) [B,H,C,l,F] (times the head's mixing factor), phi(k), and the linear state each
    chunk's queries read: the sums of phi(k) v^T [B,H,C,F,dv] and of phi(k) [B,H,C,F] over the
    non-salient tokens of the chunks outside the local window."""
    fq = feature_map(r.qc, fq_u, fq_w, feature)
    if mix is not None:
        fq = fq * torch.sigmoid(mix).reshape(1, -1, 1, 1, 1)
    fk = feature_map(r.kc, fk_u, fk_w, feature)
    routed = fk * (r.valid & ~r.salient)[..., None]
    kv = routed.transpose(-2, -1) @ r.vc
    z = routed.sum(3)
    if len(r.spans) == 2:  # causal: chunks up to c - 2
        return fq, fk, _shift(kv.cumsum(2), 2), _shift(z.cumsum(2), 2)
    return (fq, fk, kv.sum(2, keepdim=True) - sum(_shift(kv, s) for s in r.spans),
            z.sum(2, keepdim=True) - sum(_shift(z, s) for s in r.spans))


def still_reference(q, k, v, x, gate_w, fq_u, fq_w, fk_u, fk_w, mix, mask, scale: float, causal: bool, top_k: int,
                    chunk: int, feature: int, exact_window: bool) -> torch.Tensor:
    bsz, h, n, d = q.shape
    dv, l = v.shape[-1], chunk
    r = route(q, k, v, x, gate_w, mask, scale, causal, top_k, chunk)
    c, kk, dev, neg = r.qc.shape[2], r.top.shape[-1], q.device, float("-inf")
    vl = torch.cat([_shift(r.vc, s) for s in r.spans], 3)

    # salient keys of the chunks a query may not see locally
    ks = r.kc.gather(3, r.top[..., None].expand(-1, -1, -1, -1, d)).reshape(bsz, h, c * kk, d)
    vs = r.vc.gather(3, r.top[..., None].expand(-1, -1, -1, -1, dv)).reshape(bsz, h, c * kk, dv)
    src = torch.arange(c, device=dev).repeat_interleave(kk)                                 # chunk of each
    dst = torch.arange(c, device=dev)[:, None]
    seen = (src <= dst - 2) if causal else ((src - dst).abs() >= 2)                         # [C, C*kk]
    sal_ok = seen[None, None, :, None, :] & r.valid.expand(-1, h, -1, -1).gather(3, r.top).reshape(bsz, h, 1, 1, c * kk)
    sal_logits = (r.qc @ ks[:, :, None].transpose(-2, -1)) * scale                          # [B,H,C,l,C*kk]

    parts = ([(r.logits, r.local, vl)] if exact_window else []) + ([(sal_logits, sal_ok, vs[:, :, None])] if kk else [])
    top_m = torch.zeros_like(r.qc[..., 0])
    if parts:
        top_m = torch.stack([lg.masked_fill(~ok, neg).amax(-1) for lg, ok, _ in parts]).amax(0)
        top_m = torch.where(torch.isfinite(top_m), top_m, torch.zeros_like(top_m))
    num = torch.zeros_like(r.qc[..., :1].expand(*r.qc.shape[:-1], dv))
    den = torch.zeros_like(r.qc[..., 0])
    for lg, ok, val in parts:
        p = (lg.masked_fill(~ok, neg) - top_m[..., None]).exp()
        num = num + p @ val
        den = den + p.sum(-1)

    if feature != 3:
        fq, fk, state_kv, state_z = linear_state(r, fq_u, fq_w, fk_u, fk_w, mix, feature)
        lin_num = fq @ state_kv
        lin_den = (fq * state_z[:, :, :, None]).sum(-1)
        if not exact_window:  # the local window through the feature map as well
            fl = torch.cat([_shift(fk * r.valid[..., None], s) for s in r.spans], 3)
            w = (fq @ fl.transpose(-2, -1)) * r.local
            lin_num, lin_den = lin_num + w @ vl, lin_den + w.sum(-1)
        num = num + r.gc * lin_num
        den = den + lin_den
    out = num / (den + DEN_EPS)[..., None]
    return out.reshape(bsz, h, c * l, dv)[:, :, :n].to(q.dtype)


def _still(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, gate_w: torch.Tensor,
           fq_u: torch.Tensor | None, fq_w: torch.Tensor | None, fk_u: torch.Tensor | None,
           fk_w: torch.Tensor | None, mix: torch.Tensor | None, mask: torch.Tensor | None, scale: float,
           causal: bool, top_k: int,
           chunk: int, feature: int, exact_window: bool) -> torch.Tensor:
    return still_reference(q, k, v, x, gate_w, fq_u, fq_w, fk_u, fk_w, mix, mask, scale, causal, top_k, chunk,
                           feature, exact_window)


def _still_fake(q, k, v, x, gate_w, fq_u, fq_w, fk_u, fk_w, mix, mask, scale, causal, top_k, chunk, feature,
                exact_window):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _const(a) -> object:
    return op.Constant(value=onnx.numpy_helper.from_array(np.asarray(a)))


def _f(x: float, like):
    return op.CastLike(op.Constant(value_float=x), like)


def _shift_onnx(t, by: int, rank: int, c):
    """``_shift`` in ONNX: chunk c of the result holds chunk c - by (zeros outside)."""
    pads = [0] * (2 * rank)
    if by >= 0:
        pads[2] = by
        return op.Slice(op.Pad(t, ints(*pads)), ints(0), c, ints(2))
    pads[rank + 2] = -by
    return op.Slice(op.Pad(t, ints(*pads)), ints(-by), op.Add(c, ints(-by)), ints(2))


def _feature_onnx(x, u, w, feature: int):
    if feature == 2:
        return op.Add(op.Elu(x), _f(1.0, x))
    if feature == 0:
        unit = op.Div(u, op.ReduceL2(u, ints(-1), keepdims=1))
        unit = op.Unsqueeze(unit, ints(0, 2, 3))                                          # [1,H,1,1,d]
        y = op.Sub(x, op.Mul(op.Mul(_f(2.0, x), op.ReduceSum(op.Mul(x, unit), ints(-1), keepdims=1)), unit))
    else:
        y = x
    y = op.MatMul(y, op.Unsqueeze(op.Transpose(w, perm=[0, 2, 1]), ints(0, 2)))       # [1,H,1,d,e]
    if feature == 0:
        norm = op.Max(op.ReduceL2(y, ints(-1), keepdims=1), _f(1e-12, y))
        y = op.Div(op.Mul(op.ReduceL2(x, ints(-1), keepdims=1), y), norm)
    return op.Max(op.Concat(op.Softmax(y, axis=-1), op.Softmax(op.Neg(y), axis=-1), axis=-1), _f(1e-12, y))


def _still_onnx(q, k, v, x, gate_w, fq_u=None, fq_w=None, fk_u=None, fk_w=None, mix=None, mask=None, scale: float = 1.0,
                causal: bool = True, top_k: int = 4, chunk: int = 64, feature: int = 0, exact_window: bool = True):
    """The reference, op for op, in standard ONNX (opset 23): chunked MatMuls, TopK routing,
    CumSum for the linear state, one shared normaliser."""
    l = chunk
    b, h, n, d, dv = dim(q, 0), dim(q, 1), dim(q, 2), dim(q, 3), dim(v, 3)
    one, zero = ints(1), ints(0)
    g = op.Div(h, dim(k, 1))
    # GQA: each KV head repeated for its query group
    kv_shape = op.Concat(b, dim(k, 1), g, n, d, axis=0)
    k = op.Reshape(op.Expand(op.Unsqueeze(k, ints(2)), kv_shape), op.Concat(b, h, n, d, axis=0))
    v = op.Reshape(op.Expand(op.Unsqueeze(v, ints(2)), op.Concat(b, dim(v, 1), g, n, dv, axis=0)),
                   op.Concat(b, h, n, dv, axis=0))
    c = op.Div(op.Add(n, ints(l - 1)), ints(l))
    room = op.Sub(op.Mul(c, ints(l)), n)
    neg = _f(float("-inf"), q)
    zero_f = _f(0.0, q)

    def chunks(t, e):
        padded = op.Pad(t, op.Concat(ints(0, 0, 0, 0, 0, 0), room, zero, axis=0))
        return op.Reshape(padded, op.Concat(b, dim(t, 1), c, ints(l), e, axis=0))

    if mask is None:
        valid = op.Expand(op.Constant(value_float=1.0), op.Concat(b, n, axis=0))
    else:
        last = op.Gather(mask, op.Sub(dim(mask, 2), one), axis=2)
        last = op.Reshape(last, op.Concat(dim(mask, 0), n, axis=0))
        ok = last if is_bool(mask) else \
            op.Greater(last, op.CastLike(op.Constant(value_float=-1e30), last))
        valid = op.Expand(op.Cast(ok, to=1), op.Concat(b, n, axis=0))
    valid_f = op.Reshape(op.Pad(valid, op.Concat(ints(0, 0, 0), room, axis=0)),
                         op.Concat(b, one, c, ints(l), axis=0))                            # [B,1,C,l] 0/1
    valid_b = op.Cast(valid_f, to=9)
    qc, kc, vc = chunks(q, d), chunks(k, d), chunks(v, dv)
    gate = op.Sigmoid(op.MatMul(x, op.Transpose(gate_w, perm=[1, 0])))
    gate = op.Transpose(op.Reshape(gate, op.Concat(b, n, h, dv, axis=0)), perm=[0, 2, 1, 3])
    gc = chunks(gate, dv)

    spans = (1, 0) if causal else (1, 0, -1)
    kl = op.Concat(*[_shift_onnx(kc, s, 5, c) for s in spans], axis=3)
    vl = op.Concat(*[_shift_onnx(vc, s, 5, c) for s in spans], axis=3)
    vall = op.Cast(op.Concat(*[_shift_onnx(valid_f, s, 4, c) for s in spans], axis=3), to=9)
    i = np.arange(l)[:, None]
    j = np.arange(len(spans) * l)[None, :] - l
    tri = (j <= i) if causal else np.ones_like(j <= i)
    win_np = tri & (((j > i - l) & (j <= i)) if causal else ((j >= 0) & (j < l)))
    local = op.And(op.Unsqueeze(vall, ints(3)), _const(tri))                              # [B,1,C,l,K]
    logits = op.Mul(op.MatMul(qc, op.Transpose(kl, perm=[0, 1, 2, 4, 3])), _f(scale, q))

    # saliency (STILL's smoothed KL), routing. Masks enter as additive biases and factors built at
    # the head-shared size [B,1,C,l,K]; a softmax row's masked slots come out 0 (exp underflow)
    # unless the row has nothing left: invalid queries (scored -inf below) or, for b, a token
    # alone in its window.
    win = op.And(local, _const(win_np))
    win_f = op.Cast(win, to=1)
    lowest = _f(float(np.finfo(np.float32).min), q)
    others_f = op.Cast(op.And(win, _const(~(j == i))), to=1)
    a = op.Softmax(op.Add(logits, op.Mul(op.Sub(_f(1.0, q), win_f), lowest)), axis=-1)
    # zeroed explicitly: a token alone in its window has no other slot, and its row would be uniform
    bb = op.Mul(op.Softmax(op.Add(logits, op.Mul(op.Sub(_f(1.0, q), others_f), lowest)), axis=-1), others_f)
    at = op.Div(op.Add(a, _f(EPS, q)), _f(1 + l * EPS, q))
    off_self = (1 + l * EPS + 1.0 / l)
    bt = op.Add(op.Div(op.Add(bb, _f(EPS, q)), _f(off_self, q)),
                _const(((j == i) * (1.0 / l + EPS - EPS / off_self)).astype(np.float32)))
    kl_terms = op.Mul(at, op.Log(op.Div(at, op.Add(bt, _f(EPS, q)))))
    score = op.ReduceSum(op.Mul(kl_terms, win_f), ints(-1), keepdims=0)                 # [B,H,C,l]
    score = op.Where(valid_b, score, neg)
    kk = min(top_k, l)
    parts = []  # (logits with their mask bias added, values)
    if exact_window:
        parts.append((op.Add(logits, op.Where(local, zero_f, neg)), vl))
    if kk:
        _, top = op.TopK(score, ints(kk), axis=-1)                                       # [B,H,C,kk]
        hit = op.ScatterElements(op.Expand(op.Constant(value_float=0.0), op.Shape(score)), top,
                                 op.Expand(op.Constant(value_float=1.0), op.Shape(top)), axis=3)
        salient = op.And(op.Cast(hit, to=9), valid_b)
        idx_d = op.Expand(op.Unsqueeze(top, ints(4)), op.Concat(b, h, c, ints(kk), d, axis=0))
        idx_v = op.Expand(op.Unsqueeze(top, ints(4)), op.Concat(b, h, c, ints(kk), dv, axis=0))
        ks = op.Reshape(op.GatherElements(kc, idx_d, axis=3), op.Concat(b, h, ints(-1), d, axis=0))
        vs = op.Reshape(op.GatherElements(vc, idx_v, axis=3), op.Concat(b, h, ints(-1), dv, axis=0))
        src = op.Div(arange(op.Mul(c, ints(kk))), ints(kk))
        dst = op.Unsqueeze(arange(c), one)
        seen = op.LessOrEqual(src, op.Sub(dst, ints(2))) if causal else \
            op.GreaterOrEqual(op.Abs(op.Sub(src, dst)), ints(2))                          # [C, C*kk]
        sval = op.GatherElements(op.Expand(valid_b, op.Shape(score)), top, axis=3)
        sal_ok = op.And(op.Unsqueeze(seen, ints(0, 1, 3)),
                        op.Reshape(sval, op.Concat(b, h, one, one, ints(-1), axis=0)))
        sal_logits = op.Mul(op.MatMul(qc, op.Unsqueeze(op.Transpose(ks, perm=[0, 1, 3, 2]), ints(2))), _f(scale, q))
        parts.append((op.Add(sal_logits, op.Where(sal_ok, zero_f, neg)), op.Unsqueeze(vs, ints(2))))
    else:
        salient = op.And(valid_b, op.Constant(value=onnx.helper.make_tensor("f", onnx.TensorProto.BOOL, [], [False])))
    num, den = None, None
    if parts:
        tops = [op.ReduceMax(lg, ints(-1), keepdims=0) for lg, _ in parts]
        top_m = tops[0] if len(tops) == 1 else op.Max(*tops)
        top_m = op.Unsqueeze(op.Where(op.IsInf(top_m), zero_f, top_m), ints(-1))
        for lg, val in parts:
            p = op.Exp(op.Sub(lg, top_m))
            pn, pd = op.MatMul(p, val), op.ReduceSum(p, ints(-1), keepdims=0)
            num, den = (pn, pd) if num is None else (op.Add(num, pn), op.Add(den, pd))

    if feature != 3:
        fq = _feature_onnx(qc, fq_u, fq_w, feature)
        fk = _feature_onnx(kc, fk_u, fk_w, feature)
        if mix is not None:
            fq = op.Mul(fq, op.Unsqueeze(op.Sigmoid(mix), ints(0, 2, 3, 4)))
        routed = op.Mul(fk, op.Unsqueeze(op.Cast(op.And(valid_b, op.Not(salient)), to=1), ints(-1)))
        kv = op.MatMul(op.Transpose(routed, perm=[0, 1, 2, 4, 3]), vc)                     # [B,H,C,F,dv]
        z = op.ReduceSum(routed, ints(3), keepdims=0)                                     # [B,H,C,F]
        if causal:
            state_kv = _shift_onnx(op.CumSum(kv, ints(2)), 2, 5, c)
            state_z = _shift_onnx(op.CumSum(z, ints(2)), 2, 4, c)
        else:
            state_kv = op.Sub(op.ReduceSum(kv, ints(2), keepdims=1),
                              op.Add(op.Add(_shift_onnx(kv, 1, 5, c), kv), _shift_onnx(kv, -1, 5, c)))
            state_z = op.Sub(op.ReduceSum(z, ints(2), keepdims=1),
                             op.Add(op.Add(_shift_onnx(z, 1, 4, c), z), _shift_onnx(z, -1, 4, c)))
        lin_num = op.MatMul(fq, state_kv)
        lin_den = op.ReduceSum(op.Mul(fq, op.Unsqueeze(state_z, ints(3))), ints(-1), keepdims=0)
        if not exact_window:
            fkv = op.Mul(fk, op.Unsqueeze(valid_f, ints(-1)))
            fl = op.Concat(*[_shift_onnx(fkv, s, 5, c) for s in spans], axis=3)
            w = op.Mul(op.MatMul(fq, op.Transpose(fl, perm=[0, 1, 2, 4, 3])), op.Cast(local, to=1))
            lin_num = op.Add(lin_num, op.MatMul(w, vl))
            lin_den = op.Add(lin_den, op.ReduceSum(w, ints(-1), keepdims=0))
        lin_num = op.Mul(gc, lin_num)
        num, den = (lin_num, lin_den) if num is None else (op.Add(num, lin_num), op.Add(den, lin_den))
    out = op.Div(num, op.Unsqueeze(op.Add(den, _f(DEN_EPS, q)), ints(-1)))
    out = op.Reshape(out, op.Concat(b, h, ints(-1), dv, axis=0))
    return op.Slice(out, zero, n, ints(2))


def _routes_exactly(node) -> bool:
    """Routing is a rank cut on saliency scores that float noise between kernels may reorder
    (near-ties among tokens that barely attend to themselves), unless every token or none is
    salient."""
    top_k, chunk = node.args[13], node.args[14]
    return top_k == 0 or top_k >= chunk


STILL = define_op("tokopt::still_attention", _still, _still_fake, onnx=_still_onnx, tags=("attention", "linear"),
                  exact=_routes_exactly, attention=lambda a: AttentionArgs(a[0], a[1], a[2], a[10], a[11], a[12]))
differentiable("tokopt::still_attention", still_reference, grads_for=10)
