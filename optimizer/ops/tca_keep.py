"""``tokopt::tca_keep``: which cache entries TCA keeps after a prefill (``tca:select=prefill``).

    tca_keep(q[B,H,S,d], k[B,Hkv,T,d], attention_mask[B,T], scale, windows[Hkv],
             sinks, obs, size_budgets, size_windows) -> keep[B,Hkv,K] (int64)
    tca_keep_packed(qkv[B,S,(H+2Hkv)d], present_k[B,Hkv,>=T,d], attention_mask[B,T],
                    position_ids[B,S], cos?[M,r/2], sin?[M,r/2], heads, kv_heads, ...) -> the same

A prefill (a call with no cache before it: T = S) returns, per KV head, the cache entries (key
indices, in context order) the decode steps keep: the row's first ``sinks`` valid keys, its last
``windows[h]`` valid keys, and the keys that score highest under TCA's metric (what ``obs``
observation queries, evenly spaced over the row's valid queries, pay to the keys outside their
windows), ``K`` entries in all. K is
``compact_size(T, T, size_budgets, size_windows, sinks)``: the size rule of every layer of the
model at once, so that all layers keep the same number of entries and one attention mask serves
the whole compacted cache; a head whose own rule is smaller keeps its next-best keys (the heads'
calibrated budgets enter through ``size_budgets`` only). Padding scores
below every valid key, so a row with fewer than K valid keys keeps them all, first (right
padding) or last (left padding) in every head alike. A decode step (S = 1) returns no entries
([B,Hkv,0]): the runner compacts once, after the prefill, and decode steps attend densely to what
was kept and to every new token. So does any call after a cache (T > S), several tokens
wide too: a step that verifies drafted tokens (prompt lookup) is no prefill.

``q`` and ``k`` are the attention's (rotated) queries and keys as the model computes them.
``tca_keep_packed`` is the same on ONNX Runtime's decoder kernel, which rotates inside
``GroupQueryAttention``: it reads the packed projection and the kernel's cache buffer and rotates
the observation rows (only those) itself, all inside the ONNX ``If`` that a decode step skips; the
layers' ``If`` nodes test one value, and the export merges them into one (``merge_ifs``).
"""
from __future__ import annotations

import onnx
import onnx_ir as ir
import torch
from onnxscript import opset23 as op

from .gqa import rotate
from .onnx_build import arange, dim, ints
from .registry import define_op
from .tca import PINNED, compact_size, onnx_if, onnx_sink_keys, sink_keys

__all__ = ["TCA_KEEP", "TCA_KEEP_PACKED", "tca_keep_reference", "tca_keep_packed_reference"]


def _obs_rows(valid: torch.Tensor, s: int, obs: int) -> torch.Tensor:
    """[B,m]: the observation queries of a call of ``s`` new tokens (``valid`` [B,T]), evenly
    spaced over each row's valid queries, its last one included."""
    n = valid.shape[1]
    qvalid = valid[:, n - s:]
    m = min(obs, s)
    target = ((torch.arange(1, m + 1, device=valid.device) * qvalid.sum(1, keepdim=True)) // m - 1).clamp(min=0)
    rank = qvalid.long().cumsum(1) - 1
    return ((rank[:, None, :] == target[:, :, None]) & qvalid[:, None, :]).long().argmax(-1)


def _keep(qo: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, s: int, scale: float,
          windows, sinks: int, size_budgets, size_windows) -> torch.Tensor:
    """The kept entries, given the observation queries ``qo`` [B,H,m,d] at ``rows``."""
    b, h, m, d = qo.shape
    hkv, n, dev = k.shape[1], k.shape[2], k.device
    logits = (qo.reshape(b, hkv, -1, d) @ k.transpose(-2, -1) * scale).reshape(b, hkv, h // hkv, m, n)
    gap = (rows + (n - s))[:, None, :, None] - torch.arange(n, device=dev)                 # [B,1,m,T]
    far = gap >= torch.tensor(windows, device=dev)[:, None, None]                           # [B,Hkv,m,T]
    ok = (far & valid[:, None, None, :])[:, :, None]
    score = logits.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0.0).sum((2, 3))  # [B,Hkv,T]
    after = valid.flip(-1).long().cumsum(-1).flip(-1)                                        # valid keys at or after
    window = valid[:, None] & (after[:, None] <= torch.tensor(windows, device=dev)[:, None])   # [B,Hkv,T]
    prio = torch.where(valid[:, None], score, -1.0).masked_fill(sink_keys(valid, sinks)[:, None] | window, PINNED)
    keep = compact_size(n, n, size_budgets, size_windows, sinks)
    # a stable sort ranks ties toward the lower index, as ONNX's TopK does
    return prio.sort(dim=-1, descending=True, stable=True).indices[..., :keep].sort(-1).values


def tca_keep_reference(q: torch.Tensor, k: torch.Tensor, attention_mask: torch.Tensor, scale: float,
                       windows: list[int], sinks: int, obs: int, size_budgets: list[float],
                       size_windows: list[int]) -> torch.Tensor:
    b, h, s, d = q.shape
    if k.shape[2] != s:   # a cache before these tokens: not a prefill
        return torch.zeros(b, k.shape[1], 0, dtype=torch.long, device=q.device)
    valid = attention_mask[:, :k.shape[2]] > 0
    rows = _obs_rows(valid, s, obs)
    qo = q.gather(2, rows[:, None, :, None].expand(b, h, rows.shape[1], d))
    return _keep(qo, rows, k, valid, s, scale, windows, sinks, size_budgets, size_windows)


def tca_keep_packed_reference(qkv: torch.Tensor, present_k: torch.Tensor, attention_mask: torch.Tensor,
                              position_ids: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                              heads: int, kv_heads: int, scale: float, windows: list[int],
                              sinks: int, obs: int, size_budgets: list[float], size_windows: list[int]) -> torch.Tensor:
    b, s, _ = qkv.shape
    if attention_mask.shape[1] != s:
        return torch.zeros(b, kv_heads, 0, dtype=torch.long, device=qkv.device)
    d, n = present_k.shape[-1], attention_mask.shape[1]
    valid = attention_mask > 0
    rows = _obs_rows(valid, s, obs)
    m = rows.shape[1]
    # only the observation rows are sliced from the projection and rotated
    qo = qkv.gather(1, rows[..., None].expand(b, m, qkv.shape[-1]))[..., :heads * d]
    qo = qo.reshape(b, m, heads, d).transpose(1, 2)
    if cos is not None:
        at = position_ids.gather(1, rows)
        qo = rotate(qo, cos[at], sin[at])
    return _keep(qo, rows, present_k[:, :, :n], valid, s, scale, windows, sinks, size_budgets, size_windows)


def _keep_fake(q, k, attention_mask, scale, windows, sinks, obs, size_budgets, size_windows):
    return q.new_empty((q.shape[0], k.shape[1], torch.library.get_ctx().new_dynamic_size()), dtype=torch.long)


def _keep_packed_fake(qkv, present_k, attention_mask, position_ids, cos, sin, heads, kv_heads, scale, windows, sinks,
                      obs, size_budgets, size_windows):
    return qkv.new_empty((qkv.shape[0], kv_heads, torch.library.get_ctx().new_dynamic_size()), dtype=torch.long)


def _obs_rows_onnx(valid, s, obs: int):
    """``_obs_rows`` in ONNX."""
    one, zero = ints(1), ints(0)
    n = dim(valid, 1)
    qvalid = op.Slice(valid, op.Sub(n, s), n, one)                                                   # [B,S]
    m = op.Min(s, ints(obs))
    counts = op.ReduceSum(op.Cast(qvalid, to=7), one, keepdims=1)                                    # [B,1]
    target = op.Max(op.Sub(op.Div(op.Mul(op.Unsqueeze(op.Add(arange(m), one), zero), counts), m), one), zero)
    rank = op.Sub(op.CumSum(op.Cast(qvalid, to=7), op.Constant(value_int=1)), one)                  # [B,S]
    hit = op.And(op.Equal(op.Unsqueeze(rank, one), op.Unsqueeze(target, ints(2))), op.Unsqueeze(qvalid, one))
    return op.ArgMax(op.Cast(hit, to=7), axis=-1, keepdims=0)                                        # [B,m]


def _keep_onnx_core(qo, rows, k, valid, s, scale, windows, sinks, size_budgets, size_windows):
    """``_keep`` in standard ONNX."""
    b, h, m, d, hkv, n = dim(qo, 0), dim(qo, 1), dim(qo, 2), dim(qo, 3), dim(k, 1), dim(k, 2)
    one = ints(1)
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), qo)
    zero_f = op.CastLike(op.Constant(value_float=0.0), qo)
    g = op.Div(h, hkv)
    qo = op.Reshape(qo, op.Concat(b, hkv, ints(-1), d, axis=0))
    logits = op.Mul(op.MatMul(qo, op.Transpose(k, perm=[0, 1, 3, 2])), op.CastLike(op.Constant(value_float=scale), qo))
    logits = op.Reshape(logits, op.Concat(b, hkv, g, m, n, axis=0))
    gap = op.Sub(op.Unsqueeze(op.Add(rows, op.Sub(n, s)), ints(1, 3)), arange(n))                  # [B,1,m,T]
    far = op.GreaterOrEqual(gap, op.Reshape(ints(*windows), ints(-1, 1, 1)))                        # [B,Hkv,m,T]
    ok = op.Unsqueeze(op.And(far, op.Unsqueeze(valid, ints(1, 2))), ints(2))
    probs = op.Softmax(op.Where(ok, logits, neg_inf), axis=-1)
    score = op.ReduceSum(op.Where(op.IsNaN(probs), zero_f, probs), ints(2, 3), keepdims=0)          # [B,Hkv,T]
    after = op.CumSum(op.Cast(valid, to=7), op.Constant(value_int=1), reverse=1)
    window = op.And(op.Unsqueeze(valid, one),
                    op.LessOrEqual(op.Unsqueeze(after, one), op.Reshape(ints(*windows), ints(-1, 1))))
    pinned = op.Or(op.Unsqueeze(onnx_sink_keys(valid, sinks), one), window)
    prio = op.Where(op.Unsqueeze(valid, one), score, op.CastLike(op.Constant(value_float=-1.0), score))
    prio = op.Where(pinned, op.CastLike(op.Constant(value_float=PINNED), score), prio)
    # compact_size(T, T, size_budgets, size_windows, sinks), as _budget_counts rounds it
    counts = op.Cast(op.Ceil(op.Mul(op.Constant(value_floats=list(size_budgets)), op.Cast(n, to=1))), to=7)
    sizes = op.Add(op.Add(op.Min(n, ints(sinks)), ints(*size_windows)), counts)
    keep = op.Min(n, op.ReduceMax(sizes, keepdims=1))
    _, sel = op.TopK(prio, keep, axis=-1)
    sel, _ = op.TopK(sel, keep, axis=-1, largest=0)                                                  # context order
    return (sel,)


def _valid(attention_mask):
    return op.Greater(attention_mask, op.CastLike(op.Constant(value_int=0), attention_mask))


def _nothing(b, hkv):
    return (op.ConstantOfShape(op.Concat(b, hkv, ints(0), axis=0),
                               value=onnx.helper.make_tensor("zero", onnx.TensorProto.INT64, [1], [0])),)


def _keep_onnx(q, k, attention_mask, scale: float = 1.0, windows=(64,), sinks: int = 4,
               obs: int = 16, size_budgets=(1.0,), size_windows=(64,)):
    def prefill():
        s, valid = dim(q, 2), _valid(op.Slice(attention_mask, ints(0), dim(k, 2), ints(1)))
        rows = _obs_rows_onnx(valid, s, obs)
        idx = op.Expand(op.Unsqueeze(rows, ints(1, 3)),
                        op.Concat(dim(q, 0), dim(q, 1), dim(rows, 1), dim(q, 3), axis=0))
        return _keep_onnx_core(op.GatherElements(q, idx, axis=2), rows, k, valid, s, scale, windows, sinks,
                               size_budgets, size_windows)

    return onnx_if(op.Squeeze(op.Equal(dim(q, 2), dim(k, 2))), prefill,
                   lambda: _nothing(dim(q, 0), dim(k, 1)), dtype=ir.DataType.INT64)[0]


def _rotate_onnx(x, cos, sin):
    """``gqa.rotate`` in ONNX: ``x`` [B,h,S,d], ``cos``/``sin`` [B,S,r/2]."""
    half, three = dim(cos, 2), ints(3)
    c, s = op.Unsqueeze(cos, ints(1)), op.Unsqueeze(sin, ints(1))
    x1 = op.Slice(x, ints(0), half, three)
    x2 = op.Slice(x, half, op.Add(half, half), three)
    rest = op.Slice(x, op.Add(half, half), ints(2 ** 62), three)
    return op.Concat(op.Sub(op.Mul(x1, c), op.Mul(x2, s)), op.Add(op.Mul(x2, c), op.Mul(x1, s)), rest, axis=3)


def _keep_packed_onnx(qkv, present_k, attention_mask, position_ids, cos=None, sin=None, heads: int = 1,
                      kv_heads: int = 1, scale: float = 1.0, windows=(64,), sinks: int = 4,
                      obs: int = 16, size_budgets=(1.0,), size_windows=(64,)):
    def prefill():
        b, s, d = dim(qkv, 0), dim(qkv, 1), dim(present_k, 3)
        valid = _valid(attention_mask)
        rows = _obs_rows_onnx(valid, s, obs)
        m = dim(rows, 1)
        # only the observation rows are sliced from the projection and rotated
        qo = op.GatherElements(qkv, op.Expand(op.Unsqueeze(rows, ints(2)), op.Concat(b, m, dim(qkv, 2), axis=0)),
                               axis=1)
        qo = op.Slice(qo, ints(0), op.Mul(ints(heads), d), ints(2))
        qo = op.Transpose(op.Reshape(qo, op.Concat(b, m, ints(heads), d, axis=0)), perm=[0, 2, 1, 3])
        if cos is not None:
            at = op.GatherElements(position_ids, rows, axis=1)
            qo = _rotate_onnx(qo, op.Gather(cos, at, axis=0), op.Gather(sin, at, axis=0))
        k = op.Slice(present_k, ints(0), dim(attention_mask, 1), ints(2))
        return _keep_onnx_core(qo, rows, k, valid, s, scale, windows, sinks, size_budgets, size_windows)

    # the test and the empty result read the graph inputs position_ids and attention_mask alone,
    # the same in every layer: outside the If they are computed once, and merge_ifs makes the
    # layers' Ifs one
    empty = _nothing(dim(position_ids, 0), ints(kv_heads))[0]
    return onnx_if(op.Squeeze(op.Equal(dim(position_ids, 1), dim(attention_mask, 1))), prefill,
                   lambda: (op.Identity(empty),), dtype=ir.DataType.INT64)[0]


TCA_KEEP = define_op("tokopt::tca_keep", tca_keep_reference, _keep_fake, onnx=_keep_onnx, tags=("sparse", "cache"))
TCA_KEEP_PACKED = define_op("tokopt::tca_keep_packed", tca_keep_packed_reference, _keep_packed_fake,
                            onnx=_keep_packed_onnx, tags=("sparse", "cache"))
