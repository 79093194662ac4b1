"""The op registry: the contract between passes and backends.

A tokopt op is a ``torch.library`` custom op declared with ``define_op``: its eager body is the
plain-torch reference (the oracle for tests, the CPU fallback, and what a backend without a
kernel for it compiles, decomposed into ATen ops), a fake kernel for tracing, and, where it
buys a runtime kernel or saves the export a decomposition (a re-trace of the whole graph, seconds
per compile), a hand-written ONNX lowering (an onnxscript function handed to
``torch.onnx.export(custom_translation_table=...)``). Backends register further kernels for an
op by name (``register_kernel``: a Triton kernel, later others) and look them up with ``kernel``;
nothing here imports a backend or a pass.

Ops that compute attention also say where their q, k, v, mask, scale, causal flag (and soft cap) sit among
their arguments (``attention``), so that analyses (token importance, value taps, the attention
index) read any of them, not only the canonical one.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

__all__ = ["OpSpec", "AttentionArgs", "define_op", "OPS", "OPSET", "onnx_translation_table", "standardize",
           "decompose", "register_kernel", "kernel", "differentiable", "round_values", "rounding_jitter",
           "attention_spec"]

OPSET = 23  # the first opset with a standard Attention op (GQA, bool/float masks, causal)


class AttentionArgs(NamedTuple):
    """Where an attention op's inputs are: fx nodes in a graph, or tensors at run time."""
    q: Any
    k: Any
    v: Any
    mask: Any
    scale: float
    causal: bool
    softcap: float = 0.0   # scores become tanh(s / c) * c before the mask (Gemma 2); 0: none


@dataclass(frozen=True)
class OpSpec:
    name: str                      # "tokopt::attention"
    op: object                     # the torch.ops overload packet
    reference: Callable
    onnx: Callable | None = None   # a hand-written onnxscript lowering; None: the reference is decomposed
    tags: tuple[str, ...] = field(default_factory=tuple)
    # rewrites this op's contrib-op lowering into standard ONNX in an exported onnx_ir model,
    # for targets that take standard ONNX only (TensorRT); returns how many nodes it rewrote
    standardize: Callable | None = None
    # False (or a node -> bool): the op makes rounding decisions that float noise between kernels
    # may flip (a quantizer, a rank cut), so a lowering reproduces it closely, not to float tolerance
    exact: bool | Callable = True
    # an attention op: its arguments -> AttentionArgs
    attention: Callable[[tuple], AttentionArgs] | None = None
    kernels: dict = field(default_factory=dict, compare=False)   # backend -> kernel, or "module:function"

    def is_exact(self, node) -> bool:
        return self.exact(node) if callable(self.exact) else self.exact

    @property
    def overload(self):
        ns, short = self.name.split("::")
        return getattr(getattr(torch.ops, ns), short).default

    @property
    def short(self) -> str:
        return self.name.split("::")[1]

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


def define_op(name: str, reference: Callable, fake: Callable, onnx: Callable | None = None,
              tags: tuple[str, ...] = (), standardize: Callable | None = None, exact: bool | Callable = True,
              attention: Callable[[tuple], AttentionArgs] | None = None) -> OpSpec:
    """Register ``reference`` (type-annotated plain torch) as custom op ``name`` and record it."""
    if name in OPS:
        return OPS[name]
    op = torch.library.custom_op(name, mutates_args=())(reference)
    op.register_fake(fake)
    ns, short = name.split("::")
    spec = OpSpec(name, getattr(getattr(torch.ops, ns), short), reference, onnx, tags, standardize, exact, attention)
    OPS[name] = spec
    return spec


def attention_spec(node) -> OpSpec | None:
    """The spec of the attention op ``node`` calls, if it calls one."""
    return next((s for s in OPS.values() if s.attention is not None and s.matches(node)), None)


def onnx_translation_table() -> dict:
    return {spec.overload: spec.onnx for spec in OPS.values() if spec.onnx is not None}


def decompose(ep: torch.export.ExportedProgram, keep: Callable[[OpSpec], bool],
              replace: dict[str, Callable] | None = None) -> torch.export.ExportedProgram:
    """``ep`` with every tokopt op it calls that ``keep`` rejects replaced by its torch reference,
    traced into ATen ops: how a backend runs an op it has no kernel for. ``replace`` (op name ->
    a function with the reference's arguments) traces another body instead for the ops it names."""
    present = {spec for node in ep.graph.nodes for spec in OPS.values() if spec.matches(node)}
    table = {spec.overload: (replace or {}).get(spec.name, spec.reference) for spec in present if not keep(spec)}
    return ep.run_decompositions(table) if table else ep


def is_exact(graph) -> bool:
    """Whether every tokopt op in the FX ``graph`` is exact (no rounding decisions)."""
    return all(spec.is_exact(n) for n in graph.nodes for spec in OPS.values() if spec.matches(n))


def standardize(model) -> dict[str, int]:
    """Rewrite every contrib-op lowering in ``model`` (onnx_ir) into standard ONNX."""
    counts = {spec.name: spec.standardize(model) for spec in OPS.values() if spec.standardize is not None}
    return {k: v for k, v in counts.items() if v}


def register_kernel(op_name: str, backend: str, impl: Callable | str) -> None:
    """Give op ``op_name`` a kernel for ``backend``: a callable with the reference's arguments,
    or ``"package.module:function"``, imported when first asked for (Triton imports slowly)."""
    if op_name not in OPS:
        raise KeyError(f"no tokopt op named {op_name}; known: {', '.join(sorted(OPS))}")
    OPS[op_name].kernels[backend] = impl


def kernel(op_name: str, backend: str) -> Callable | None:
    """The kernel ``backend`` registered for ``op_name``, or None."""
    impl = OPS[op_name].kernels.get(backend)
    if isinstance(impl, str):
        module, _, fn = impl.partition(":")
        impl = getattr(importlib.import_module(module), fn)
        OPS[op_name].kernels[backend] = impl
    return impl


def differentiable(name: str, reference: Callable, grads_for: int) -> None:
    """Give op ``name`` gradients through its reference (written with differentiable torch ops)
    for its first ``grads_for`` arguments, so passes can train graphs that hold the op."""
    def setup(ctx, inputs, output):
        ctx.inputs = inputs

    def backward(ctx, *grads):
        with torch.enable_grad():
            head = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                    for t in ctx.inputs[:grads_for]]
            out = reference(*head, *ctx.inputs[grads_for:])
            outs = out if isinstance(out, (tuple, list)) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.is_floating_point()]
            leaves = [t for t in head if isinstance(t, torch.Tensor) and t.requires_grad]
            got = iter(torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True))
        return tuple(next(got) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in head) + \
            (None,) * (len(ctx.inputs) - grads_for)

    torch.library.register_autograd(name, backward, setup_context=setup)
