"""canonicalize: every recognised attention spelling -> one ``tokopt.attention`` op.

    sdpa(q, repeat_kv(k), repeat_kv(v), mask, is_causal, scale)
        -> tokopt.attention(q, k, v, mask, scale, causal)
    matmul(dropout(softmax(q @ k^T * c + mask)), v)
        -> tokopt.attention(q, k, v, mask, c, False)
    matmul(softmax(tanh(q @ k^T * c / cap) * cap + mask), v)      (Gemma 2's soft cap)
        -> tokopt.attention(q, k, v, mask, c, False, cap)

    matmul(x, W.T)                      (W a 2-D weight: a linear spelled out, Falcon's)
        -> linear(x, W)
    addmm(b, x, W), mm(x, W)            (W a 2-D weight stored [in, out]: GPT-2's Conv1D)
        -> linear(x, W.T, b)            (W.T a new weight, a view of the stored one)

GQA's repeat_kv (unsqueeze/expand/reshape) is folded into the op, which takes k and v with
their own kv-head count. Exact: the op's reference is SDPA itself. Blocks the index refused
(see ``tokopt inspect``) are left as they are. Runs first in every pipeline, so later passes
match one pattern. Idempotent: a second run finds only canonical nodes.
"""
from __future__ import annotations

import torch

from ..optimizer.errors import PassError
from ..optimizer.ops import ATTENTION
from ..optimizer.pass_manager import Pass, PassResult, register_pass
from ..optimizer.patterns import match_attention, module_path, unrepeat_kv
from ..optimizer.program import META_BLOCK, Program, call_function_nodes, inherit_meta

aten = torch.ops.aten

__all__ = ["CanonicalizePass"]


def _transposed_weight(program: Program, node):
    """W where ``node`` is ``x @ W.T`` with W a 2-D weight (a linear spelled out, as Falcon's), else
    None: it becomes ``linear(x, W)``, the one spelling the passes that quantize weights find."""
    if node.target != aten.matmul.default or not isinstance(node.args[1], torch.fx.Node):
        return None
    t = node.args[1]
    swapped = t.op == "call_function" and (
        t.target in (aten.numpy_T.default, aten.t.default)
        or (t.target == aten.transpose.int and sorted(d % 2 for d in t.args[1:]) == [0, 1])
        or (t.target == aten.permute.default and list(t.args[1]) == [1, 0]))
    w = t.args[0] if swapped else None
    weight = program.tensor(w) if isinstance(w, torch.fx.Node) else None
    return w if weight is not None and weight.dim() == 2 else None


def _input_major_weight(program: Program, node):
    """(x, W, bias) where ``node`` is ``addmm(b, x, W)`` or ``mm(x, W)`` with W a 2-D weight stored
    [in, out] and b a vector (GPT-2's Conv1D), else None: it becomes ``linear(x, W.T, b)``."""
    if node.target == aten.addmm.default and not node.kwargs and len(node.args) == 3:
        bias, x, w = node.args
        if not (isinstance(bias, torch.fx.Node) and bias.meta["val"].dim() == 1):
            return None
    elif node.target == aten.mm.default:
        (x, w), bias = node.args, None
    else:
        return None
    weight = program.tensor(w) if isinstance(w, torch.fx.Node) else None
    if weight is None or weight.dim() != 2 or program.tensor(x) is not None:
        return None
    return x, w, bias


@register_pass
class CanonicalizePass(Pass):
    name = "canonicalize"
    tolerance = 1e-4
    half_weights = True
    summary = ("every attention spelling (SDPA, eager softmax, GQA repeat_kv) -> tokopt.attention; "
               "x @ W.T and GPT-2's addmm(b, x, W) -> linear")

    def call(self, program: Program) -> PassResult:
        rw = program.edit()   # one node for another of the same value: no re-export
        graph = rw.graph
        causal = {b.node: b.causal for b in program.attention}
        prefix = program.source.get("module_prefix", "")
        counts = {"sdpa": 0, "eager": 0, "gqa_folded": 0}
        for node in list(call_function_nodes(graph)):
            m = match_attention(node)
            if m is None or isinstance(m, str) or m.spelling not in ("sdpa", "eager"):
                continue
            k, rep_k = unrepeat_kv(m.k)
            v, rep_v = unrepeat_kv(m.v)
            if rep_k != rep_v:
                k, v = m.k, m.v  # asymmetric repeat: keep the repeated tensors
            scale = m.scale if m.scale is not None else m.q.meta["val"].shape[-1] ** -0.5
            mask = m.mask
            if isinstance(mask, tuple):   # a bias beside the mask: one additive mask
                total = mask[0]
                with graph.inserting_before(m.out):
                    for term in mask[1:]:
                        total = graph.call_function(aten.add.Tensor, (total, term))
                        total.meta["val"] = total.args[0].meta["val"] + term.meta["val"]
                mask = total
            with graph.inserting_before(m.out):
                new = graph.call_function(ATTENTION.overload, (m.q, k, v, mask, float(scale), m.causal_flag,
                                                               *([m.softcap] if m.softcap else [])))
            inherit_meta(new, m.out)
            new.meta.setdefault("custom", {})[META_BLOCK] = {
                "causal": causal.get(m.out.name), "module": module_path(m.out, prefix), "spelling": m.spelling}
            m.out.replace_all_uses_with(new)
            counts[m.spelling] += 1
            counts["gqa_folded"] += k is not m.k
        linears, transposed = 0, {}   # a stored [in, out] weight two nodes read is transposed once
        for node in list(call_function_nodes(graph)):
            w = _transposed_weight(program, node)
            if w is not None:
                args = (node.args[0], w)
            elif (found := _input_major_weight(program, node)) is not None:
                x, w, bias = found
                if w.name not in transposed:
                    # a view of the stored weight: no copy in memory (written contiguous where it is saved)
                    transposed[w.name] = rw.constant(f"{program.weight_name(w)}.T", program.tensor(w).t())
                args = (x, transposed[w.name], *([bias] if bias is not None else []))
            else:
                continue
            with graph.inserting_before(node):
                new = graph.call_function(aten.linear.default, args)
            inherit_meta(new, node)
            node.replace_all_uses_with(new)
            linears += 1
        modified = counts["sdpa"] + counts["eager"] + linears > 0
        stats = {"attention_canonicalized": counts["sdpa"] + counts["eager"], **counts,
                 **({"linears": linears} if linears else {})}
        return PassResult(rw.commit("canonicalize") if modified else program, modified, stats)

    def ensures(self, program: Program, stats: dict) -> None:
        left = [b.module for b in program.attention if b.spelling != "canonical"]
        if left:
            raise PassError(f"attention blocks still in their original spelling: {left}")
        if any(n.target == torch.ops.aten.scaled_dot_product_attention.default
               for n in call_function_nodes(program.graph)):
            raise PassError("an SDPA node survived canonicalization")
