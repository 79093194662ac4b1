"""``tokopt::cached_attention``: a decoder layer's attention with its KV cache, in one op.

    cached_attention(qkv[B,S,(H+2Hkv)d], past_k[B,Hkv,P,d], past_v[B,Hkv,P,d], attention_mask[B,T],
                     cos?[M,r/2], sin?[M,r/2], heads, kv_heads, scale, position_ids?[B,S], window=0, softcap=0)
        -> out[B,S,H*d], present_k[B,Hkv,T,d], present_v[B,Hkv,T,d]          (T = P + S)

q, k and v arrive packed, as the projections compute them (token-major). Rows are right-padded,
onnxruntime-genai's convention: row b holds ``attention_mask[b].sum()`` tokens, its first ones,
and this call's S new tokens go at that length minus S (at 0 into an empty cache, where a
shorter row's padding follows its tokens), so each row writes and reads only its own entries and
no padding bias is needed; the ONNX node reads ``seqlens_k`` off the mask's sum. With
``cos``/``sin`` (a rotary cache over positions 0..M-1, the first r dims rotated, non-interleaved
halves) q and the new k are rotated at that cache index, which is the token's position in its
row, or at ``position_ids`` where given (a cache compacted after the prefill, whose index is no
longer the position: ``tca:select=prefill``). Every query attends to the keys at or before its
index (causal), and with ``window`` W only the last W of them, itself included (sliding-window
attention as transformers masks it; the kernel's ``local_window_size`` W gives the same, checked
at lowering); ``softcap`` c > 0 caps the scaled scores at tanh(s / c) * c (Gemma 2; the kernel's
``softcap``). A padding query's output is whatever the kernel leaves (nothing reads it).

A windowed layer's node also sets ``sliding_window_cache`` (where ONNX Runtime has it): its
past/present buffer may then be window-sized (at least W rows), the kernel keeping the most
recent positions at its start and evicting the rest, so a step reads about W keys instead of all
T (onnxruntime-genai's CPU builds do the same). Such a buffer must hold W rows even before it
fills: ``backends.windowed_cache.WindowedSession`` feeds a full-length past through a buffer of
max(T, W) rows, where nothing is evicted and the layout is the op's above.

The hand lowering is the point of the op: one ``com.microsoft.GroupQueryAttention`` node
(rotary fused, GQA without repeating k/v, the cache written into a preallocated buffer when the
runner binds one buffer as both past and present) in place of the reshapes, transposes, RoPE,
concatenations, mask construction and attention of the exported decoder layer.
"""
from __future__ import annotations

import functools

import onnx
import torch
from onnxscript import opset23 as op
from onnxscript.values import Op, Opset

from .attention import attention_reference
from .onnx_build import dim, ints
from .registry import define_op

__all__ = ["CACHED_ATTENTION", "cached_attention_reference", "rotate"]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [B,h,S,d] with ``cos``/``sin`` [B,S,r/2] (non-interleaved halves
    of the first r dims)."""
    half = cos.shape[-1]
    c, s = cos[:, None], sin[:, None]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], -1)


def cached_attention_reference(qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                               attention_mask: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                               heads: int, kv_heads: int, scale: float, position_ids: torch.Tensor | None = None,
                               window: int = 0, softcap: float = 0.0):
    b, s, _ = qkv.shape
    d, p = past_k.shape[-1], past_k.shape[2]
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
    q, k, v = (t.reshape(b, s, -1, d).transpose(1, 2) for t in (q, k, v))
    start = (attention_mask.sum(1) - s).clamp(min=0) if p else attention_mask.new_zeros(b)
    index = start[:, None] + torch.arange(s, device=qkv.device)                                    # [B, S]
    at_pos = index if position_ids is None else position_ids
    if cos is not None:
        q, k = rotate(q, cos[at_pos], sin[at_pos]), rotate(k, cos[at_pos], sin[at_pos])
    at = index[:, None, :, None].expand(-1, kv_heads, -1, d)
    present_k = torch.cat([past_k, torch.zeros_like(k)], 2).scatter(2, at, k)
    present_v = torch.cat([past_v, torch.zeros_like(v)], 2).scatter(2, at, v)
    keys = torch.arange(present_k.shape[2], device=qkv.device)[None, None, :]
    hidden = keys > index[:, :, None]                                                               # [B, S, T]
    if window:
        hidden = hidden | (keys <= index[:, :, None] - window)
    bias = qkv.new_zeros(hidden.shape).masked_fill(hidden, float("-inf"))[:, None]
    out = attention_reference(q, present_k, present_v, bias, scale, False, softcap)
    return out.transpose(1, 2).reshape(b, s, heads * d), present_k, present_v


def _cached_attention(qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, attention_mask: torch.Tensor,
                      cos: torch.Tensor | None, sin: torch.Tensor | None, heads: int, kv_heads: int, scale: float,
                      position_ids: torch.Tensor | None = None, window: int = 0, softcap: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cached_attention_reference(qkv, past_k, past_v, attention_mask, cos, sin, heads, kv_heads, scale,
                                      position_ids, window, softcap)


def _cached_attention_fake(qkv, past_k, past_v, attention_mask, cos, sin, heads, kv_heads, scale, position_ids=None,
                           window=0, softcap=0.0):
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
                P("sin_cache", "T", param_option=S), P("position_ids", "P", param_option=S),
                *(P(name, "T", param_option=S) for name in ("attention_bias", "head_sink", "k_scale", "v_scale",
                                                           "q_norm_weight", "k_norm_weight")),
                P("query_seqlens", "M", param_option=S)],
        outputs=[P("output", "T"), P("present_key", "T"), P("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], ""),
                          ("P", ["tensor(int64)"], "")],
        attributes=[a("num_heads", t.INT, ""), a("kv_num_heads", t.INT, ""), a("scale", t.FLOAT, ""),
                    a("do_rotary", onnx.helper.make_attribute("do_rotary", 0), ""),
                    a("local_window_size", onnx.helper.make_attribute("local_window_size", -1), ""),
                    a("softcap", onnx.helper.make_attribute("softcap", 0.0), ""),
                    a("sliding_window_cache", onnx.helper.make_attribute("sliding_window_cache", 0), "")])


GroupQueryAttention = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())


@functools.cache
def windowed_cache_supported() -> bool:
    """Whether the installed ONNX Runtime's GroupQueryAttention takes ``sliding_window_cache`` and
    ``query_seqlens`` (added in 2026; an older one refuses them, and its layers keep the whole cache)."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
        return any(s.name == "GroupQueryAttention" and "sliding_window_cache" in s.attributes
                   and "query_seqlens" in [i.name for i in s.inputs] for s in get_all_operator_schema())
    except Exception:
        return False


def _cached_attention_onnx(qkv, past_k, past_v, attention_mask, cos=None, sin=None, heads: int = 1,
                           kv_heads: int = 1, scale: float = 1.0, position_ids=None, window: int = 0,
                           softcap: float = 0.0):
    # seqlens_k = each row's tokens - 1 (right padding), total = the mask's width; shared by all
    # layers once the optimizer merges the identical subgraphs
    lengths = op.ReduceSum(attention_mask, ints(1), keepdims=0)                                    # [B]
    seqlens = op.Cast(op.Sub(lengths, ints(1)), to=6)                                              # int32
    total = op.Cast(op.Squeeze(dim(attention_mask, 1)), to=6)
    tail = [] if position_ids is None or cos is None else [position_ids]
    windowed = window > 0 and windowed_cache_supported()
    if windowed:
        # a windowed cache reads each row's new tokens off query_seqlens, not off seqlens_k: a ragged
        # prefill's row holds min(S, its length) of the S (a step's rows one each, a draft's all S)
        tail = [*(tail or [None]), None, None, None, None, None, None, op.Cast(op.Min(lengths, dim(qkv, 1)), to=6)]
    return GroupQueryAttention(qkv, None, None, past_k, past_v, seqlens, total, cos, sin, *tail,
                               num_heads=heads, kv_num_heads=kv_heads, scale=scale, do_rotary=int(cos is not None),
                               local_window_size=window if window else -1, softcap=softcap,
                               sliding_window_cache=int(windowed))


# Hand lowering: ONNX Runtime's decoder kernel (see the module docstring; measured in the README's
# decode table against onnxruntime-genai, which builds the same node).
CACHED_ATTENTION = define_op("tokopt::cached_attention", _cached_attention, _cached_attention_fake,
                             onnx=_cached_attention_onnx, tags=("attention", "cache"))
