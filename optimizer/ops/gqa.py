"""``tokopt::cached_attention``: a decoder layer's attention with its KV cache, in one op.

    cached_attention(qkv[B,S,(H+2Hkv)d], past_k[B,Hkv,P,d], past_v[B,Hkv,P,d], attention_mask[B,T],
                     padding?[B,1,S,T], cos?[M,r/2], sin?[M,r/2], heads, kv_heads, scale)
        -> out[B,S,H*d], present_k[B,Hkv,T,d], present_v[B,Hkv,T,d]          (T = P + S)

q, k and v arrive packed, as the projections compute them (token-major). With ``cos``/``sin``
(a rotary cache over positions 0..M-1, the first r dims rotated, non-interleaved halves) q and
the new k are rotated at their *cache index* (P + i for new token i), the convention of ONNX
Runtime's GroupQueryAttention: for a row without left padding that is the model's own position,
and with left padding every relative distance, which is all RoPE attention sees, is unchanged.
Every query attends to the keys at or before its index (causal). Padding comes one of two ways:

- ``padding`` given (left-padded rows, any mask): the new k, v are appended after the whole cache
  (index P + i) and ``padding`` is added to the logits (``padding_bias``: 0 where
  ``attention_mask`` marks a key valid, the dtype's lowest finite value elsewhere, as the kernel
  takes it; computed once for all layers).
- ``padding`` None (right-padded rows, onnxruntime-genai's convention): row b holds
  ``attention_mask[b].sum()`` tokens, its first ones; the new tokens go at that length minus S
  (at 0 in a prefill), so a shorter row writes and reads only its own entries and needs no bias.
  The ONNX node then reads ``seqlens_k`` off the mask's sum and takes no bias input: the graph
  genai builds, without the six nodes that make the bias at every call.

The hand lowering is the point of the op: one ``com.microsoft.GroupQueryAttention`` node
(rotary fused, GQA without repeating k/v, the cache written into a preallocated buffer when the
runner binds one buffer as both past and present) in place of the reshapes, transposes, RoPE,
concatenations, mask construction and attention of the exported decoder layer.
"""
from __future__ import annotations

import onnx
import torch
from onnxscript import opset23 as op
from onnxscript.values import Op, Opset

from .attention import attention_reference
from .onnx_build import dim, ints
from .registry import define_op

__all__ = ["CACHED_ATTENTION", "cached_attention_reference", "rotate", "padding_bias"]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [B,h,S,d] with ``cos``/``sin`` [B,S,r/2] (non-interleaved halves
    of the first r dims)."""
    half = cos.shape[-1]
    c, s = cos[:, None], sin[:, None]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], -1)


def padding_bias(attention_mask: torch.Tensor, new_tokens: int, dtype=torch.float32) -> torch.Tensor:
    """[B,1,S,T]: 0 at the keys ``attention_mask`` [B,T] marks valid, the lowest finite value at padding."""
    lowest = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    bias = torch.where(attention_mask[:, None, None, :] > 0, torch.tensor(0.0, dtype=dtype), lowest)
    return bias.expand(-1, -1, new_tokens, -1)


def cached_attention_reference(qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                               attention_mask: torch.Tensor, padding: torch.Tensor | None, cos: torch.Tensor | None,
                               sin: torch.Tensor | None, heads: int, kv_heads: int, scale: float):
    b, s, _ = qkv.shape
    d, p = past_k.shape[-1], past_k.shape[2]
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
    q, k, v = (t.reshape(b, s, -1, d).transpose(1, 2) for t in (q, k, v))
    if padding is None and p:   # right-padded: each row's new tokens follow its own length
        start = (attention_mask.sum(1) - s).clamp(min=0)
    else:
        start = torch.full((b,), p, dtype=torch.long, device=qkv.device)
    index = start[:, None] + torch.arange(s, device=qkv.device)                                    # [B, S]
    if cos is not None:
        q, k = rotate(q, cos[index], sin[index]), rotate(k, cos[index], sin[index])
    at = index[:, None, :, None].expand(-1, kv_heads, -1, d)
    present_k = torch.cat([past_k, torch.zeros_like(k)], 2).scatter(2, at, k)
    present_v = torch.cat([past_v, torch.zeros_like(v)], 2).scatter(2, at, v)
    t = present_k.shape[2]
    later = torch.arange(t, device=qkv.device)[None, None, :] > index[:, :, None]                 # [B, S, T]
    bias = padding if padding is not None else qkv.new_zeros((b, 1, s, t))
    out = attention_reference(q, present_k, present_v, bias.masked_fill(later[:, None], float("-inf")), scale, False)
    return out.transpose(1, 2).reshape(b, s, heads * d), present_k, present_v


def _cached_attention(qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, attention_mask: torch.Tensor,
                      padding: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None, heads: int,
                      kv_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cached_attention_reference(qkv, past_k, past_v, attention_mask, padding, cos, sin, heads, kv_heads, scale)


def _cached_attention_fake(qkv, past_k, past_v, attention_mask, padding, cos, sin, heads, kv_heads, scale):
    b, s, _ = qkv.shape
    t = attention_mask.shape[1]
    return (qkv.new_empty((b, s, heads * past_k.shape[-1])), past_k.new_empty((b, kv_heads, t, past_k.shape[-1])),
            past_v.new_empty((b, kv_heads, t, past_v.shape[-1])))


def _gqa_schema() -> onnx.defs.OpSchema:
    """ONNX Runtime's contrib op (the inputs tokopt feeds), declared for onnxscript."""
    P, S = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption.Optional
    a, t = onnx.defs.OpSchema.Attribute, onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[P("query", "T"), P("key", "T", param_option=S), P("value", "T", param_option=S),
                P("past_key", "T", param_option=S), P("past_value", "T", param_option=S), P("seqlens_k", "M"),
                P("total_sequence_length", "M"), P("cos_cache", "T", param_option=S),
                P("sin_cache", "T", param_option=S), P("position_ids", "I", param_option=S),
                P("attention_bias", "T", param_option=S)],
        outputs=[P("output", "T"), P("present_key", "T"), P("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], ""),
                          ("I", ["tensor(int64)"], "")],
        attributes=[a("num_heads", t.INT, ""), a("kv_num_heads", t.INT, ""), a("scale", t.FLOAT, ""),
                    a("do_rotary", onnx.helper.make_attribute("do_rotary", 0), "")])


GroupQueryAttention = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())


def _cached_attention_onnx(qkv, past_k, past_v, attention_mask, padding=None, cos=None, sin=None, heads: int = 1,
                           kv_heads: int = 1, scale: float = 1.0):
    # seqlens_k = (tokens in the row) - 1: T - 1 for every row where the left padding is in
    # ``padding``, the mask's sum - 1 for right-padded rows; shared by all layers once the
    # optimizer merges the identical subgraphs
    total = dim(attention_mask, 1)
    if padding is None:
        seqlens = op.Cast(op.Sub(op.ReduceSum(attention_mask, ints(1), keepdims=0), ints(1)), to=6)
    else:
        seqlens = op.Cast(op.Expand(op.Sub(total, ints(1)), dim(attention_mask, 0)), to=6)          # [B] int32
    return GroupQueryAttention(qkv, None, None, past_k, past_v, seqlens, op.Cast(op.Squeeze(total), to=6), cos, sin,
                               None, padding, num_heads=heads, kv_num_heads=kv_heads, scale=scale,
                               do_rotary=int(cos is not None))


# Hand lowering: ONNX Runtime's decoder kernel (see the module docstring; measured in the README's
# decode table against onnxruntime-genai, which builds the same node).
CACHED_ATTENTION = define_op("tokopt::cached_attention", _cached_attention, _cached_attention_fake,
                             onnx=_cached_attention_onnx, tags=("attention", "cache"))
