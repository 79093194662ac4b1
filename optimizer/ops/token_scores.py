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


# No hand lowering: torch.onnx's export of the decomposed reference is as fast in ONNX Runtime
# (MiniLM, token_prune keep=0.7 after layer 3, 256 tokens: 49.6 vs 49.8 ms median, outputs equal).
TOKEN_SCORES = define_op("tokopt::token_scores", _token_scores, _token_scores_fake, tags=("scores",))
# token_prune's mode=fuse weights the dropped tokens by their scores, so recover= trains through them
differentiable("tokopt::token_scores", _token_scores, grads_for=7)

