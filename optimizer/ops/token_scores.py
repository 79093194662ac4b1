"""``tokopt::token_scores``: the attention each token receives at a layer, from its q and k.

    token_scores(q[B,H,N,d], k[B,Hkv,N,d], mask?, scale, causal, score, o?[B,H,N,dv]) -> [B, N]

Shared by the passes that rank tokens: ``token_prune`` keeps the best, ``rsq`` weights its
Hessians by them (AttnCon). Scores: ``cls`` (row of the first token, EViT), ``last`` (row of the
last token, FastV), ``mean`` (attention received, averaged over heads and queries), ``debiased``
(``mean`` without the sink column and the bias towards early positions in causal models),
``head_weighted`` (AS-ViT: a row's attention per head weighted by the norm of that head's output
``o``), ``diverse`` (importance minus ``DIVERSITY`` x the key cosine to the most similar token
ranked above it). ``head_weighted@cls`` / ``diverse@last`` name the row such a score reads.
GQA without repeating k: q's heads are grouped by the kv head they share.
"""
from __future__ import annotations

import onnx_ir as ir
import torch
from onnxscript import opset23 as op23

from .registry import define_op

__all__ = ["TOKEN_SCORES", "SCORES", "DIVERSITY"]

SCORES = ("cls", "last", "mean", "debiased", "head_weighted", "diverse")
DIVERSITY = 0.5  # score=diverse: weight of redundancy against (max-normalised) importance


def _row(score: str) -> str | None:
    """Which query rows a score reads: "cls" (the first), "last", or None (every row).
    ``head_weighted@cls`` / ``diverse@last``: the row the pass chose for the model."""
    base, _, row = score.partition("@")
    return row or (base if base in ("cls", "last") else None)


def _token_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool,
                  score: str, o: torch.Tensor | None = None) -> torch.Tensor:
    """Attention each token receives at this layer, [B, N], from q and k (and, for
    head_weighted, the layer's attention output o). GQA without repeating k: q's heads are
    grouped by the kv head they share."""
    b, _, _, d = q.shape
    row, base = _row(score), score.partition("@")[0]
    rows = {"cls": q[:, :, :1], "last": q[:, :, -1:]}.get(row, q)
    r = rows.shape[2]
    grouped = rows.reshape(b, k.shape[1], -1, d)                  # [B, Hkv, rep*R, d]
    logits = grouped @ k.transpose(-2, -1) * scale                # [B, Hkv, rep*R, N]
    if mask is not None:
        m = {"cls": mask[:, :, :1], "last": mask[:, :, -1:]}.get(row, mask)
        m = m.repeat(1, 1, grouped.shape[2] // r, 1)
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m
    if causal and row != "last":  # the last row sees every key anyway
        n = k.shape[2]
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[: r]  # rows of query 0.. r-1
        logits = logits.masked_fill(~allowed.repeat(grouped.shape[2] // r, 1), float("-inf"))
    probs = logits.softmax(-1).nan_to_num(0.0)
    if base == "head_weighted":
        # AS-ViT: each head's attention weighted, per token, by the norm of that head's output
        # for the token, normalised over heads
        w = o.norm(dim=-1)
        w = (w / w.sum(1, keepdim=True).clamp_min(1e-30)).reshape(b, k.shape[1], -1, w.shape[-1])
        return (probs * w).sum(dim=(1, 2))
    if base == "diverse":
        # one-pass maximal marginal relevance: importance (max-normalised) minus DIVERSITY x the
        # key cosine to the most similar token ranked above it, so near-duplicates of a kept
        # token give way to distinct ones
        imp = probs.mean(dim=(1, 2))
        metric = k.mean(1)
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sim = metric @ metric.transpose(-2, -1)                                      # [B, N, N]
        above = imp[:, None, :] > imp[:, :, None]
        redundancy = sim.masked_fill(~above, -1.0).amax(-1).clamp_min(0.0)
        return imp / imp.amax(-1, keepdim=True).clamp_min(1e-30) - DIVERSITY * redundancy
    if score != "debiased":
        return probs.mean(dim=(1, 2))
    # debiased: drop the sink column and renormalise; measure each probability against a uniform
    # row over the keys that row sees (short causal rows no longer inflate early keys); average
    # over the rows that see the key (not over all rows); masked keys never count
    not_sink = (torch.arange(k.shape[2], device=q.device) > 0).to(probs.dtype)
    seen = (logits > -1e30).to(probs.dtype) * not_sink
    rest = probs * not_sink
    rest = rest / rest.sum(-1, keepdim=True).clamp_min(1e-30)
    relative = rest * seen.sum(-1, keepdim=True).clamp_min(1.0)
    return (relative.sum(2) / seen.sum(2).clamp_min(1.0)).mean(1)


def _token_scores_fake(q, k, mask, scale, causal, score, o=None):
    return q.new_empty((q.shape[0], k.shape[2]))


def _token_scores_onnx(q, k, mask=None, scale: float = 1.0, causal: bool = False, score: str = "cls", o=None):
    # heads and head_dim are static: a constant reshape target (0 = copy the batch) keeps a
    # single -1 even after ORT's fusions fold shape arithmetic (a computed one came out with two)
    kv_heads, head_dim = int(k.shape[1]), int(q.shape[3])
    base, score = score.partition("@")[0], _row(score) or score
    if score == "cls":
        q = op23.Slice(q, op23.Constant(value_ints=[0]), op23.Constant(value_ints=[1]), op23.Constant(value_ints=[2]))
    elif score == "last":
        q = op23.Slice(q, op23.Constant(value_ints=[-1]), op23.Constant(value_ints=[_BIG]),
                       op23.Constant(value_ints=[2]))
    target = op23.Constant(value_ints=[0, kv_heads, -1, head_dim])
    grouped = op23.Reshape(q, target)
    logits = op23.Mul(op23.MatMul(grouped, op23.Transpose(k, perm=[0, 1, 3, 2])),
                      op23.CastLike(op23.Constant(value_float=scale), grouped))
    rep = op23.Div(op23.Slice(op23.Shape(grouped), op23.Constant(value_ints=[2]), op23.Constant(value_ints=[3])),
                   op23.Slice(op23.Shape(q), op23.Constant(value_ints=[2]), op23.Constant(value_ints=[3])))
    tiles = op23.Concat(op23.Constant(value_ints=[1, 1]), rep, op23.Constant(value_ints=[1]), axis=0)
    neg = op23.CastLike(op23.Constant(value_float=float("-inf")), logits)
    if mask is not None:
        is_bool = mask.dtype == ir.DataType.BOOL  # read on the input: fresh values carry no dtype yet
        if score == "cls":
            mask = op23.Slice(mask, op23.Constant(value_ints=[0]), op23.Constant(value_ints=[1]),
                              op23.Constant(value_ints=[2]))
        elif score == "last":
            mask = op23.Slice(mask, op23.Constant(value_ints=[-1]), op23.Constant(value_ints=[_BIG]),
                              op23.Constant(value_ints=[2]))
        mask = op23.Tile(mask, tiles)
        logits = op23.Where(mask, logits, neg) if is_bool else op23.Add(logits, mask)
    if causal and score != "last":
        n = op23.Slice(op23.Shape(k), op23.Constant(value_ints=[2]), op23.Constant(value_ints=[3]))
        r = op23.Slice(op23.Shape(q), op23.Constant(value_ints=[2]), op23.Constant(value_ints=[3]))
        ones = op23.ConstantOfShape(op23.Concat(r, n, axis=0), value=_ones_int32())
        tri = op23.Tile(op23.Trilu(ones, upper=0), op23.Concat(rep, op23.Constant(value_ints=[1]), axis=0))
        logits = op23.Where(op23.Cast(tri, to=9), logits, neg)
    probs = op23.Softmax(logits, axis=-1)
    zero = op23.CastLike(op23.Constant(value_float=0.0), logits)
    probs = op23.Where(op23.IsNaN(probs), zero, probs)
    if base == "head_weighted":
        w = op23.ReduceL2(o, op23.Constant(value_ints=[-1]), keepdims=0)                    # [B, H, N]
        w = op23.Div(w, op23.Max(op23.ReduceSum(w, op23.Constant(value_ints=[1]), keepdims=1),
                                 op23.CastLike(op23.Constant(value_float=1e-30), w)))
        w = op23.Unsqueeze(w, op23.Constant(value_ints=[2]))                                  # [B, H, 1, N]
        w = op23.Reshape(w, op23.Constant(value_ints=[0, kv_heads, -1, 0]))                   # [B, Hkv, rep, N]
        return op23.ReduceSum(op23.Mul(probs, w), op23.Constant(value_ints=[1, 2]), keepdims=0)
    if base == "diverse":
        imp = op23.ReduceMean(probs, op23.Constant(value_ints=[1, 2]), keepdims=0)           # [B, N]
        metric = op23.ReduceMean(k, op23.Constant(value_ints=[1]), keepdims=0)                # [B, N, d]
        metric = op23.Div(metric, op23.Max(op23.ReduceL2(metric, op23.Constant(value_ints=[-1]), keepdims=1),
                                           op23.CastLike(op23.Constant(value_float=1e-12), metric)))
        sim = op23.MatMul(metric, op23.Transpose(metric, perm=[0, 2, 1]))
        above = op23.Greater(op23.Unsqueeze(imp, op23.Constant(value_ints=[1])),
                             op23.Unsqueeze(imp, op23.Constant(value_ints=[2])))
        red = op23.ReduceMax(op23.Where(above, sim, op23.CastLike(op23.Constant(value_float=-1.0), sim)),
                             op23.Constant(value_ints=[-1]), keepdims=0)
        red = op23.Max(red, zero)
        top = op23.Max(op23.ReduceMax(imp, op23.Constant(value_ints=[-1]), keepdims=1),
                       op23.CastLike(op23.Constant(value_float=1e-30), imp))
        return op23.Sub(op23.Div(imp, top), op23.Mul(op23.CastLike(op23.Constant(value_float=DIVERSITY), red), red))
    if score != "debiased":
        return op23.ReduceMean(probs, op23.Constant(value_ints=[1, 2]), keepdims=0)
    one = op23.CastLike(op23.Constant(value_float=1.0), logits)
    last, rows, heads = (op23.Constant(value_ints=[a]) for a in (-1, 2, 1))
    n = op23.Squeeze(op23.Slice(op23.Shape(k), op23.Constant(value_ints=[2]), op23.Constant(value_ints=[3])))
    positions = op23.Range(op23.Constant(value_int=0), n, op23.Constant(value_int=1))
    not_sink = op23.CastLike(op23.Greater(positions, op23.Constant(value_int=0)), logits)
    seen = op23.Mul(op23.CastLike(op23.Greater(logits, op23.CastLike(op23.Constant(value_float=-1e30), logits)),
                                  logits), not_sink)
    rest = op23.Mul(probs, not_sink)
    rest = op23.Div(rest, op23.Max(op23.ReduceSum(rest, last, keepdims=1),
                                   op23.CastLike(op23.Constant(value_float=1e-30), logits)))
    relative = op23.Mul(rest, op23.Max(op23.ReduceSum(seen, last, keepdims=1), one))
    per_key = op23.Div(op23.ReduceSum(relative, rows, keepdims=0),
                       op23.Max(op23.ReduceSum(seen, rows, keepdims=0), one))
    return op23.ReduceMean(per_key, heads, keepdims=0)


_BIG = 2 ** 62


def _ones_int32():
    import onnx
    return onnx.helper.make_tensor("one", onnx.TensorProto.INT32, [1], [1])


TOKEN_SCORES = define_op("tokopt::token_scores", _token_scores, _token_scores_fake, onnx=_token_scores_onnx,
                         tags=("scores",))

