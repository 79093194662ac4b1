"""Finding attention in exported ATen graphs, with no per-architecture code.

Spellings recognised:

    sdpa:      aten.scaled_dot_product_attention(q, k, v, mask?, is_causal?, scale?)
    eager:     matmul(softmax(cap(matmul(q, k^T) [*|/ c]) [+ mask]) [-> to/dropout], v)
               cap(s) = tanh(s / cap) * cap where present (Gemma 2's attention logit soft cap)
    canonical: tokopt.attention(q, k, v, mask?, scale, causal, softcap?)   (after the canonicalize pass)
    any other tokopt attention op (tca_attention, still_attention ...), which a pass put in
    place of a canonical one: the spelling is the op's name

For each one the index records q/k/v/o projections (walking back to the nearest ``linear`` /
``addmm`` and forward from the output), heads, kv heads (through HF's ``repeat_kv``
expand/reshape), head dim, RoPE (a ``neg`` of rotate_half between q and its projection) and
causality (the ``is_causal`` flag, else the owning module's ``is_causal`` attribute).

A softmax that is not in that shape is reported with the reason, never silently skipped.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .program import AttentionBlock, Program, Rejected, block_meta, call_function_nodes

__all__ = ["AttentionMatch", "match_attention", "index_attention", "unrepeat_kv", "module_path"]

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
_SUM = (aten.add.Tensor, aten.add_.Tensor)
MATMUL = (aten.matmul.default, aten.bmm.default)
LINEAR = (aten.linear.default, aten.addmm.default, aten.mm.default)
PASS_THROUGH = (aten.to.dtype, aten.dropout.default, aten.clone.default, aten.contiguous.default,
                aten.alias.default, aten.type_as.default)
TRANSPOSE = (aten.transpose.int, aten.permute.default)
_ASSERTS = (aten._assert_tensor_metadata.default,)


@dataclass
class AttentionMatch:
    """One attention occurrence: the nodes a rewrite needs."""
    spelling: str
    out: torch.fx.Node               # node whose value is the attention output [B,H,N,dv]
    q: torch.fx.Node
    k: torch.fx.Node                 # as fed to attention (may be repeated for GQA)
    v: torch.fx.Node
    mask: torch.fx.Node | tuple[torch.fx.Node, ...] | None   # several: additive terms to sum (a bias and a mask)
    scale: float | None
    causal_flag: bool
    softcap: float = 0.0


def module_path(node: torch.fx.Node, prefix: str = "") -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<unknown>"
    path = list(stack.values())[-1][0]
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _users(node):
    return [u for u in node.users if u.target not in _ASSERTS]


def _scalar(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def unrepeat_kv(node: torch.fx.Node) -> tuple[torch.fx.Node, int]:
    """Undo HF's repeat_kv: reshape(expand(unsqueeze(x, 2) [+ full slices])) -> (x, n_rep)."""
    if node.op != "call_function" or node.target not in (aten.reshape.default, aten.view.default):
        return node, 1
    exp = node.args[0]
    if not (isinstance(exp, torch.fx.Node) and exp.target == aten.expand.default):
        return node, 1
    shape = _val(exp).shape
    if len(shape) != 5:
        return node, 1
    x = exp.args[0]
    while isinstance(x, torch.fx.Node) and x.target in (aten.slice.Tensor, aten.unsqueeze.default):
        if x.target == aten.unsqueeze.default:
            base = x.args[0]
            bval = _val(base)
            if bval is not None and bval.dim() == 4 and x.args[1] == 2:
                return base, int(shape[2])
            return node, 1
        x = x.args[0]
    return node, 1


def _terms(x) -> list:
    """The terms of ``x`` where it is a sum (through sums nothing else reads), else [x]."""
    if not (isinstance(x, torch.fx.Node) and x.target in _SUM) or x.kwargs.get("alpha", 1) != 1:
        return [x]
    return [t for a in x.args[:2]
            for t in (_terms(a) if isinstance(a, torch.fx.Node) and len(a.users) == 1 else [a])]


def _soft_cap(x) -> tuple[torch.fx.Node, float] | None:
    """(s, c) where ``x`` is ``tanh(s / c) * c`` (or ``tanh(s * (1/c)) * c``), else None."""
    if x.target != aten.mul.Tensor or _scalar(x.args[1]) is None:
        return None
    t = x.args[0]
    if not (isinstance(t, torch.fx.Node) and t.target == aten.tanh.default and len(_users(t)) == 1):
        return None
    d, cap = t.args[0], float(x.args[1])
    if not (isinstance(d, torch.fx.Node) and len(_users(d)) == 1 and len(d.args) == 2 and cap > 0
            and _scalar(d.args[1])):
        return None
    inner = float(d.args[1]) if d.target == aten.div.Tensor else \
        1.0 / float(d.args[1]) if d.target == aten.mul.Tensor else None
    return (d.args[0], cap) if inner is not None and abs(inner - cap) <= 1e-6 * cap else None


def _match_eager(sm: torch.fx.Node) -> AttentionMatch | str:
    dim = sm.args[1] if len(sm.args) > 1 else -1
    if dim not in (-1, 3):
        return f"softmax over dim {dim}, not the key dimension"
    x, scale = sm.args[0], None
    while x.target in PASS_THROUGH:
        x = x.args[0]
    # scores + mask, or scores + bias + mask (MPNet's relative position bias)
    terms = _terms(x)
    scores = [t for t in terms if isinstance(t, torch.fx.Node) and t.target in (aten.mul.Tensor, aten.div.Tensor, *MATMUL)]
    if len(terms) > 1 and len(scores) != 1:
        return "softmax input is a sum without one q @ k^T term"
    if any(not isinstance(t, torch.fx.Node) for t in terms):
        return "softmax input is a sum with a constant, not a mask"
    if len(terms) > 1:
        x = scores[0]
        rest = tuple(t for t in terms if t is not x)
        mask = rest[0] if len(rest) == 1 else rest
    else:
        mask = None
    capped = _soft_cap(x)
    x, softcap = capped if capped is not None else (x, 0.0)
    if x.target in (aten.mul.Tensor, aten.div.Tensor):
        c = _scalar(x.args[1])
        if c is None:
            return "scores scaled by a tensor, not a constant"
        scale = c if x.target == aten.mul.Tensor else 1.0 / c
        x = x.args[0]
    if x.target not in MATMUL:
        return f"softmax input comes from {x.target}, not from q @ k^T"
    q, kt = x.args
    if not (isinstance(kt, torch.fx.Node) and kt.target == aten.transpose.int):
        return "scores are not q @ k.transpose(-2, -1)"
    if sorted(d % 4 for d in kt.args[1:]) != [2, 3]:
        return "k is transposed over the wrong dims"
    k = kt.args[0]
    probs, users = sm, _users(sm)
    while len(users) == 1 and users[0].target in PASS_THROUGH:
        probs, users = users[0], _users(users[0])
    if len(users) != 1 or users[0].target not in MATMUL or users[0].args[0] is not probs:
        return "attention probabilities are used by more than the value matmul"
    out = users[0]
    v = out.args[1]
    for t in (q, k, v, out):
        val = _val(t)
        if val is None or val.dim() != 4:
            return "attention tensors are not 4-D [batch, heads, tokens, head_dim]"
    return AttentionMatch("eager", out, q, k, v, mask, scale if scale is not None else 1.0, False, softcap)


def match_attention(node: torch.fx.Node) -> AttentionMatch | str | None:
    """An ``AttentionMatch``, a reason string (looks like attention but refused), or None."""
    if node.op != "call_function":
        return None
    from .ops import ATTENTION, attention_spec
    spec = attention_spec(node)
    if spec is not None:
        a = spec.attention(node.args)
        return AttentionMatch("canonical" if spec is ATTENTION else spec.short, node, a.q, a.k, a.v, a.mask, a.scale,
                              a.causal, a.softcap)
    if node.target == SDPA:
        a = list(node.args) + [None] * (7 - len(node.args))
        kw = node.kwargs
        mask = kw.get("attn_mask", a[3])
        dropout = kw.get("dropout_p", a[4] or 0.0)
        causal = bool(kw.get("is_causal", a[5] or False))
        if dropout:
            return "attention dropout is active (export in eval mode)"
        q, k, v = a[:3]
        if any(_val(t) is None or _val(t).dim() != 4 for t in (q, k, v)):
            return "attention tensors are not 4-D [batch, heads, tokens, head_dim]"
        return AttentionMatch("sdpa", node, q, k, v, mask, kw.get("scale"), causal)
    if node.target in SOFTMAX:
        return _match_eager(node)
    return None


def _param_name(program: Program, node) -> str | None:
    name = program.weight_name(node)
    prefix = program.source.get("module_prefix", "")
    return name[len(prefix):] if name and prefix and name.startswith(prefix) else name


def _linear_weight(program: Program, node: torch.fx.Node) -> str | None:
    w = node.args[2] if node.target == aten.addmm.default else node.args[1]
    return _param_name(program, w)


def _find_back(program: Program, start, limit: int = 16):
    """Nearest projection feeding ``start`` and whether a rotate_half (``neg``) lies on the way."""
    seen, frontier, rope = set(), [start], False
    for _ in range(limit):
        nxt = []
        for n in frontier:
            if not isinstance(n, torch.fx.Node) or n in seen or n.op != "call_function":
                continue
            seen.add(n)
            if n.target in LINEAR:
                return _linear_weight(program, n), rope
            rope |= n.target == aten.neg.default
            for a in n.args:
                nxt.extend(a if isinstance(a, (list, tuple)) else [a])
        frontier = nxt
    return None, rope


def _find_forward(program: Program, start, limit: int = 8) -> str | None:
    frontier = [start]
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for u in _users(n):
                if u.target in LINEAR:
                    return _linear_weight(program, u)
                if u.target in PASS_THROUGH or u.target in TRANSPOSE or u.target in (
                        aten.reshape.default, aten.view.default, aten._unsafe_view.default,
                        operator.getitem, aten.flatten.using_ints):
                    nxt.append(u)
        frontier = nxt
    return None


def _causal(program: Program, match: AttentionMatch, path: str) -> bool | None:
    if match.causal_flag:
        return True
    block = block_meta(match.out)
    if block is not None:
        return block.get("causal")
    if program.module is not None:
        try:
            mod = program.module.get_submodule(path)
        except AttributeError:
            return None
        flag = getattr(mod, "is_causal", None)
        return bool(flag) if flag is not None else None
    return None


def index_attention(program: Program) -> tuple[list[AttentionBlock], list[Rejected]]:
    prefix = program.source.get("module_prefix", "")
    blocks, rejected = [], []
    for node in list(call_function_nodes(program.graph)):
        m = match_attention(node)
        if m is None:
            continue
        path = module_path(node, prefix)
        if isinstance(m, str):
            rejected.append(Rejected(path, node.name, m))
            continue
        k_base, _ = unrepeat_kv(m.k)
        qv, kv = _val(m.q), _val(k_base)
        heads, kv_heads, head_dim = qv.shape[1], kv.shape[1], qv.shape[3]
        if not all(is_concrete_int(x) for x in (heads, kv_heads, head_dim)):
            rejected.append(Rejected(path, node.name, "heads or head_dim are not static"))
            continue
        qw, rope = _find_back(program, m.q)
        kw, _ = _find_back(program, m.k)
        vw, _ = _find_back(program, m.v)
        layer = re.search(r"\.(\d+)(\.|$)", path)
        blocks.append(AttentionBlock(
            layer=int(layer.group(1)) if layer else None, module=path, node=m.out.name,
            spelling=m.spelling, heads=int(heads), kv_heads=int(kv_heads), head_dim=int(head_dim),
            causal=_causal(program, m, path), q_proj=qw, k_proj=kw, v_proj=vw,
            o_proj=_find_forward(program, m.out), fused_qkv=qw is not None and qw == kw == vw,
            rope=rope, mask=m.mask.name if isinstance(m.mask, torch.fx.Node) else
            m.mask[-1].name if isinstance(m.mask, tuple) else None,
            scale=m.scale if m.scale is not None else head_dim ** -0.5, softcap=m.softcap))
    return blocks, rejected
