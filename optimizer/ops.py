"""The tokopt op set: the contract between passes and backends.

A pass that introduces new math declares a ``tokopt::`` op here (or in its own module) with
``define_op``: a ``torch.library`` custom op whose eager body is the plain-torch reference (the
oracle for tests and the CPU fallback), a fake kernel for tracing, an ONNX lowering (an
onnxscript function handed to ``torch.onnx.export(custom_translation_table=...)``) and, where a
fused kernel pays, a Triton implementation. Backends look ops up by name and never import passes.

The canonical op is ``tokopt::attention``: every recognised attention spelling becomes

    attention(q[B,H,Nq,d], k[B,Hkv,Nk,d], v[B,Hkv,Nk,dv], mask?, scale, causal) -> [B,H,Nq,dv]

with SDPA's semantics (a bool mask keeps True, a float mask is added; GQA when Hkv < H).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from onnxscript import opset23 as op23

__all__ = ["OpSpec", "define_op", "OPS", "onnx_translation_table", "standardize", "differentiable", "attention_reference",
           "ATTENTION", "round_values", "rounding_jitter"]

OPSET = 23  # the first opset with a standard Attention op (GQA, bool/float masks, causal)


@dataclass(frozen=True)
class OpSpec:
    name: str                      # "tokopt::attention"
    op: object                     # the torch.ops overload packet
    reference: Callable
    onnx: Callable | None = None   # onnxscript lowering, traced by torch.onnx
    triton: Callable | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    # rewrites this op's contrib-op lowering into standard ONNX in an exported onnx_ir model,
    # for targets that take standard ONNX only (TensorRT); returns how many nodes it rewrote
    standardize: Callable | None = None
    # False (or a node -> bool): the op makes rounding decisions that float noise between kernels
    # may flip (a quantizer, a rank cut), so a lowering reproduces it closely, not to float tolerance
    exact: bool | Callable = True

    def is_exact(self, node) -> bool:
        return self.exact(node) if callable(self.exact) else self.exact

    @property
    def overload(self):
        ns, short = self.name.split("::")
        return getattr(getattr(torch.ops, ns), short).default

    def matches(self, node) -> bool:
        """Is ``node`` a call of this op? By schema name: OpOverload objects are not unique
        across re-registrations and re-exports, names are."""
        schema = getattr(node.target, "_schema", None) if getattr(node, "op", None) == "call_function" else None
        return schema is not None and schema.name == self.name


OPS: dict[str, OpSpec] = {}

_JITTER: contextvars.ContextVar[float] = contextvars.ContextVar("tokopt_rounding_jitter", default=0.0)


def round_values(x: torch.Tensor) -> torch.Tensor:
    """``torch.round`` for the reference kernels of rounding ops; under ``rounding_jitter(eps)``
    the input is scaled by 1 + eps first."""
    eps = _JITTER.get()
    return torch.round(x * (1 + eps) if eps else x)


@contextlib.contextmanager
def rounding_jitter(eps: float):
    """Nudge every rounding op's input by a relative ``eps``: how far float noise alone moves a
    graph of rounding decisions (a flip early on changes later inputs, which flips more)."""
    token = _JITTER.set(eps)
    try:
        yield
    finally:
        _JITTER.reset(token)


def define_op(name: str, schema_fn: Callable, fake: Callable, onnx: Callable | None = None,
              triton: Callable | None = None, tags: tuple[str, ...] = (),
              standardize: Callable | None = None, exact: bool | Callable = True) -> OpSpec:
    """Register ``schema_fn`` (type-annotated plain torch) as custom op ``name`` and record it."""
    if name in OPS:
        return OPS[name]
    op = torch.library.custom_op(name, mutates_args=())(schema_fn)
    op.register_fake(fake)
    ns, short = name.split("::")
    spec = OpSpec(name, getattr(getattr(torch.ops, ns), short), schema_fn, onnx, triton, tags, standardize, exact)
    OPS[name] = spec
    return spec


def onnx_translation_table() -> dict:
    return {spec.overload: spec.onnx for spec in OPS.values() if spec.onnx is not None}


def standardize(model) -> dict[str, int]:
    """Rewrite every contrib-op lowering in ``model`` (onnx_ir) into standard ONNX."""
    counts = {spec.name: spec.standardize(model) for spec in OPS.values() if spec.standardize is not None}
    return {k: v for k, v in counts.items() if v}


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    rep = heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float, causal: bool) -> torch.Tensor:
    if causal and mask is not None:
        nq, nk = q.shape[-2], k.shape[-2]
        tri = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        mask = mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))
        causal = False
    return F.scaled_dot_product_attention(q, _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1]),
                                          attn_mask=mask, is_causal=causal, scale=scale)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float, causal: bool) -> torch.Tensor:
    return attention_reference(q, k, v, mask, scale, causal)


def _attention_fake(q, k, v, mask, scale, causal):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _attention_onnx(q, k, v, mask=None, scale: float = 1.0, causal: bool = False):
    # ONNX Attention has four outputs; the first is the attention result.
    return op23.Attention(q, k, v, mask, scale=scale, is_causal=int(causal))[0]


ATTENTION = define_op("tokopt::attention", _attention, _attention_fake, onnx=_attention_onnx,
                      tags=("attention",))


def differentiable(name: str, reference: Callable, grads_for: int) -> None:
    """Give op ``name`` gradients through its reference (written with differentiable torch ops)
    for its first ``grads_for`` arguments, so passes can train graphs that hold the op."""
    def setup(ctx, inputs, output):
        ctx.inputs = inputs

    def backward(ctx, grad):
        with torch.enable_grad():
            head = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                    for t in ctx.inputs[:grads_for]]
            out = reference(*head, *ctx.inputs[grads_for:])
            leaves = [t for t in head if isinstance(t, torch.Tensor) and t.requires_grad]
            got = iter(torch.autograd.grad(out, leaves, grad, allow_unused=True))
        return tuple(next(got) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in head) + \
            (None,) * (len(ctx.inputs) - grads_for)

    torch.library.register_autograd(name, backward, setup_context=setup)


differentiable("tokopt::attention", attention_reference, grads_for=3)
