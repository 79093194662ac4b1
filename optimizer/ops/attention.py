"""``tokopt::attention``: the canonical attention op every recognised spelling becomes.

    attention(q[B,H,Nq,d], k[B,Hkv,Nk,d], v[B,Hkv,Nk,dv], mask?, scale, causal, softcap=0) -> [B,H,Nq,dv]

SDPA's semantics (a bool mask keeps True, a float mask is added; GQA when Hkv < H; ``causal``
is bottom-right aligned when Nq < Nk). ``softcap`` c > 0 (Gemma 2's attention logit soft cap)
makes the scaled scores tanh(s / c) * c before the mask, as ONNX's ``Attention`` and ONNX
Runtime's ``GroupQueryAttention`` do with their ``softcap``. Hand lowering: ONNX's opset-23
``Attention``, one fused kernel in ONNX Runtime where the decomposition is a chain of
MatMul/Softmax/Where nodes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from onnxscript import opset23 as op23

from .registry import AttentionArgs, define_op, differentiable

__all__ = ["ATTENTION", "attention_reference", "attention_primitive", "expand_kv"]


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """KV heads repeated for the query heads that share them (GQA)."""
    rep = heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float, causal: bool, softcap: float = 0.0) -> torch.Tensor:
    if softcap:   # SDPA has no soft cap
        return attention_primitive(q, k, v, mask, scale, causal, softcap)
    if causal and mask is not None:
        nq, nk = q.shape[-2], k.shape[-2]
        tri = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        mask = mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))
        causal = False
    return F.scaled_dot_product_attention(q, expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1]),
                                          attn_mask=mask, is_causal=causal, scale=scale)


def attention_primitive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float, causal: bool, softcap: float = 0.0) -> torch.Tensor:
    """The same attention as MatMul, Softmax and masking, for a runtime whose parser has no fused
    attention (TensorRT before 10.14): the ops every ONNX consumer takes."""
    h = q.shape[1]
    scores = (q @ expand_kv(k, h).transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if causal:
        nq, nk = q.shape[-2], k.shape[-2]
        scores = scores.masked_fill(~torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1) @ expand_kv(v, h)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float, causal: bool, softcap: float = 0.0) -> torch.Tensor:
    return attention_reference(q, k, v, mask, scale, causal, softcap)


def _attention_fake(q, k, v, mask, scale, causal, softcap=0.0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _attention_onnx(q, k, v, mask=None, scale: float = 1.0, causal: bool = False, softcap: float = 0.0):
    # ONNX Attention has four outputs; the first is the attention result.
    return op23.Attention(q, k, v, mask, scale=scale, is_causal=int(causal), softcap=softcap)[0]


ATTENTION = define_op("tokopt::attention", _attention, _attention_fake, onnx=_attention_onnx, tags=("attention",),
                      attention=lambda a: AttentionArgs(*a[:7]))
differentiable("tokopt::attention", attention_reference, grads_for=3)
