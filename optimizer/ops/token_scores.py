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

import torch
from onnxscript import opset23 as op

from .onnx_build import arange, dim, ints, is_bool
from .registry import define_op, differentiable

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
    # [B, Hkv, rep*R, N]; a one-row score is scaled on its row (OpenVINO moved the scale onto all of
    # k); the full map keeps the product's order, which rsq's importance weights were measured with
    logits = (grouped * scale) @ k.transpose(-2, -1) if r == 1 else grouped @ k.transpose(-2, -1) * scale
    if mask is not None:
        m = {"cls": mask[:, :, :1], "last": mask[:, :, -1:]}.get(row, mask)
        m = m.repeat(1, 1, grouped.shape[2] // r, 1)
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m
    if causal and row != "last":  # the last row sees every key anyway
        n = k.shape[2]
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[: r]  # rows of query 0.. r-1
        logits = logits.masked_fill(~allowed.repeat(grouped.shape[2] // r, 1), float("-inf"))
    probs = logits.softmax(-1)
    probs = probs.masked_fill(probs.isnan(), 0.0)   # a row with no key; two ONNX nodes, nan_to_num's nine
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


def _token_scores_onnx(q, k, mask=None, scale: float = 1.0, causal: bool = False, score: str = "mean", o=None):
    # the reference, node for node: the decomposed reference runs as fast in ONNX Runtime, but
    # decomposing it re-traces the whole graph (2.2 s of a 15 s MiniLM token_prune compile)
    row, base = _row(score), score.partition("@")[0]

    def const(x: float):
        return op.CastLike(op.Constant(value_float=x), q)

    def pick(x):   # the query rows the score reads (axis 2): one Slice, or all of x
        if row is None:
            return x
        start, end = (0, 1) if row == "cls" else (-1, 2**62)
        return op.Slice(x, ints(start), ints(end), ints(2))
    rows = pick(q)
    # one kv head per query head (no GQA) where the shapes say so: no regrouping nodes, as torch's
    # decomposition leaves none for a reshape to the same shape
    plain = q.shape is not None and k.shape is not None and isinstance(q.shape[1], int) and q.shape[1] == k.shape[1]
    rep = None if plain else op.Div(dim(q, 1), dim(k, 1))
    # [B, Hkv, rep*R, d]
    grouped = rows if plain else op.Reshape(rows, op.Concat(ints(0), dim(k, 1), ints(-1, 0), axis=0))
    kt = op.Transpose(k, perm=[0, 1, 3, 2])
    logits = op.MatMul(op.Mul(grouped, const(scale)), kt) if row else op.Mul(op.MatMul(grouped, kt), const(scale))
    if mask is not None:
        m = pick(mask)
        m = m if plain else op.Tile(m, op.Concat(ints(1, 1), rep, ints(1), axis=0))
        logits = op.Where(m, logits, const(float("-inf"))) if is_bool(mask) else op.Add(logits, m)
    if causal and row != "last":
        allowed = op.LessOrEqual(op.Unsqueeze(arange(dim(k, 2)), ints(0)),
                                 op.Unsqueeze(arange(dim(rows, 2)), ints(1)))     # [R, N]: key <= query
        allowed = allowed if plain else op.Tile(allowed, op.Concat(rep, ints(1), axis=0))
        logits = op.Where(allowed, logits, const(float("-inf")))
    probs = op.Softmax(logits, axis=-1)
    probs = op.Where(op.IsNaN(probs), const(0.0), probs)
    if base == "head_weighted":
        w = op.ReduceL2(o, ints(-1), keepdims=0)
        w = op.Div(w, op.Max(op.ReduceSum(w, ints(1), keepdims=1), const(1e-30)))
        w = op.Reshape(w, op.Concat(dim(q, 0), dim(k, 1), ints(-1), dim(w, 2), axis=0))
        return op.ReduceSum(op.Mul(probs, w), ints(1, 2), keepdims=0)
    if base == "diverse":
        imp = op.ReduceMean(probs, ints(1, 2), keepdims=0)
        metric = op.ReduceMean(k, ints(1), keepdims=0)
        metric = op.Div(metric, op.Max(op.ReduceL2(metric, ints(-1), keepdims=1), const(1e-12)))
        sim = op.MatMul(metric, op.Transpose(metric, perm=[0, 2, 1]))
        above = op.Greater(op.Unsqueeze(imp, ints(1)), op.Unsqueeze(imp, ints(2)))
        redundancy = op.Max(op.ReduceMax(op.Where(above, sim, const(-1.0)), ints(-1), keepdims=0), const(0.0))
        top = op.Max(op.ReduceMax(imp, ints(-1), keepdims=1), const(1e-30))
        return op.Sub(op.Div(imp, top), op.Mul(const(DIVERSITY), redundancy))
    if score != "debiased":
        return op.ReduceMean(probs, ints(1, 2), keepdims=0)
    not_sink = op.CastLike(op.Greater(arange(dim(k, 2)), op.Constant(value_int=0)), q)
    seen = op.Mul(op.CastLike(op.Greater(logits, const(-1e30)), q), not_sink)
    rest = op.Mul(probs, not_sink)
    rest = op.Div(rest, op.Max(op.ReduceSum(rest, ints(-1), keepdims=1), const(1e-30)))
    relative = op.Mul(rest, op.Max(op.ReduceSum(seen, ints(-1), keepdims=1), const(1.0)))
    return op.ReduceMean(op.Div(op.ReduceSum(relative, ints(2), keepdims=0),
                                op.Max(op.ReduceSum(seen, ints(2), keepdims=0), const(1.0))), ints(1), keepdims=0)


TOKEN_SCORES = define_op("tokopt::token_scores", _token_scores, _token_scores_fake, onnx=_token_scores_onnx,
                         tags=("scores",))
# token_prune's mode=fuse weights the dropped tokens by their scores, so recover= trains through them
differentiable("tokopt::token_scores", _token_scores, grads_for=7)

