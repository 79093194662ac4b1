"""token_prune: after chosen layers, keep the most attended tokens and run the rest of the
network on them only (a rewrite of the exported graph; no model code is patched).

    h_l = block_l(h_{l-1})                      (attention of block l: tokopt.attention(q, k, ...))
    s   = score(q, k, mask)                     [B, N]   from block l's own q and k
    idx = sort(top_K(s)),  K = ceil(keep * N)   [B, K]   K from the *actual* length (``align``:
                                                         N - K rounded down to a multiple of it, >= 1)
    every value the later layers read with a token axis -> gathered by idx
        (hidden states, attention masks on both axes, RoPE cos/sin, position ids)
    every later use of the symbolic length N -> K

The rewritten graph is re-exported with ``torch.export`` (dynamic batch and sequence), so every
downstream view, reshape and mask is re-derived on the new length.

Scores (``auto``, the default: ``cls``, or ``last`` in a causal model): ``cls`` (row of the first
token, EViT), ``last`` (row of the last token, FastV), ``mean`` (attention received, averaged over
heads and queries; computes this layer's full map once), ``debiased`` (``mean`` without the biases that make it
favour some positions: the sink column is dropped and rows renormalised, each probability is
measured against a uniform row over the keys that row sees, and a key's score is averaged over
the rows that can see it, so early tokens in causal models are no longer inflated),
``head_weighted`` (AS-ViT: the first row, or the last in causal models, with each head's
attention weighted per token by the norm of that head's output for the token, normalised over
heads), ``diverse`` (one-pass maximal marginal relevance: that row's importance, max-normalised,
minus 0.5 x the key cosine to the most similar token ranked above it, so near-duplicates of a
kept token give way to distinct ones; IDPruner/ToDRE's balance of importance and diversity
without their sequential greedy loop). Always kept: the first token (CLS / attention sink), and
in causal models the last token. Padded positions score -inf, so they are never kept over real
tokens.

Recovery (``recover=N``): after pruning, N steps distil the pruned graph towards the unpruned
one on ``--calib`` (default: the shipped passages' calibration split), tuning only 1-D
parameters (norm weights and biases, linear biases): encoders match the mean-pooled and the
first-token outputs (cosine), causal LMs the last position's next-token distribution (KL).

Contract: for encoders the pooled outputs (CLS row) keep their shape; ``restore=true`` scatters
every pruned token's last representation (the stream entering the cut that dropped it) back into
the last layer's output, through any number of cuts, so that ``last_hidden_state`` and any head
after the encoder (token classification, answer spans) see every position and keep the input's
shape. For causal LMs the last position's logits are the contract (``restore`` is refused).

A fixed token count (a ViT's patches + CLS, set by its image size) appears in later shapes as
a literal; those are rewritten to the kept count (refused if the count equals the head count,
head size or width, where the token axis could not be told apart).

Refused with a reason: a layer past the model's depth, ``score=cls`` on a causal model (its
first token attends only to itself), a token-level head (an output other than
``last_hidden_state`` with a value per input token, ``per_token_heads``; `tokopt inspect` lists
them) without ``restore``, a value crossing the cut whose length is an expression of N other
than N itself. Modes: ``drop``; ``fuse`` (EViT, encoders): the dropped tokens are folded into one extra token,
their score-weighted mean, appended after the kept ones; ``merge`` (ToMe, encoders, one layer,
keep > 0.5): bipartite soft matching on the layer's keys, merged tokens averaged, later
attentions add log(size) to each key (proportional attention), and ``restore`` gives every
position its merged token's output. Several merging layers carry sizes: a merge reads each key's
size from the previous merge's mask (log size) and averages weighted by size (ToMe's merge_wavg).
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, replace
from fractions import Fraction

import torch

from ..optimizer.errors import PassError, UsageError
from ..optimizer.ops import ATTENTION, TOKEN_SCORES
from ..optimizer.ops.token_scores import SCORES
from ..optimizer.pass_manager import CANONICAL_ATTENTION, Pass, PassResult, opt, register_pass
from ..optimizer.program import Program, Rewrite

__all__ = ["TokenPrunePass", "TokenPruneOptions", "kept_length"]

MODES = ("drop", "fuse", "merge")


def kept_length(n: int, keep: float, align: int = 1) -> int:
    """Tokens left after one pruning step at length ``n`` (at least 1; ``align``: see the option)."""
    f = Fraction(keep).limit_denominator(1000)
    k = max(1, (n * f.numerator + f.denominator - 1) // f.denominator)
    return k if align == 1 else max(1, n - max((n - k) // align * align, 1))


def merged_length(n: int, keep: float) -> int:
    """The stream's length after one ``mode=merge`` step: ``kept_length`` tokens plus the one or
    two masked slots that pad N to an even length."""
    return 2 * (n // 2 + 1) - (n - kept_length(n, keep))


def _shape_args(node):
    """(position, list) of each shape-like argument of ``node``: a list of ints as long as its
    output's rank (view, reshape, expand sizes)."""
    val = node.meta.get("val")
    rank = val.dim() if isinstance(val, torch.Tensor) else -1
    return [(i, a) for i, a in enumerate(node.args) if isinstance(a, (list, tuple)) and len(a) == rank
            and any(isinstance(x, int) for x in a)]


def _check_fixed_length(n: int, q_shape) -> None:
    """With a fixed token count its literal ``n`` is what marks the token axis in later shapes
    (view / reshape / expand sizes hold heads, head size and width besides): refused when one of
    those is also ``n``."""
    _, heads, _, head_dim = q_shape
    if n in (heads, head_dim, heads * head_dim):
        raise UsageError(f"token_prune: this model's token count is fixed at {n}, which is also its number "
                         "of heads, head size or width, so the token axis cannot be told apart in its "
                         "shapes; use an input size that gives another token count.")


def _rewrite_fixed_length(after, n: int, kept: int) -> None:
    """Every later shape argument that spells the fixed token count ``n`` now spells ``kept``."""
    for node in after:
        val = node.meta.get("val")
        for i, shape in _shape_args(node):
            new = [kept if x == n and _expr(d) == n else x for x, d in zip(shape, val.shape)]
            node.update_arg(i, type(shape)(new))


@dataclass(frozen=True)
class TokenPruneOptions:
    keep: float = opt(0.5, "fraction of the tokens kept at each cut (at least one)", "(0, 1]")
    layers: tuple[int, ...] = opt((1,), "layers after which tokens are cut", "'/'-separated, increasing")
    schedule: str = opt("", "keep@layer list, overrides keep and layers", "e.g. 0.7@2/0.5@4")
    score: str = opt("auto", "how a token's importance is read (auto: cls, or last in a causal model)",
                     "auto|" + "|".join(SCORES))
    mode: str = opt("drop", "what happens to the tokens not kept", "|".join(MODES))
    align: int = opt(1, "tokens dropped in multiples of this (fewer, never more; at least one), so a length that "
                     "fills whole tiles still does: a CPU's int8/bf16 kernels work in tiles of 16 rows, and a ragged "
                     "count costs a whole tile (16 for OpenVINO on x86)", ">= 1")
    restore: bool = opt(False, "give every pruned token its last representation back after the last layer "
                        "(token-level heads need it)", "true|false")
    recover: int = opt(0, "steps tuning norms and biases towards the unpruned model", ">= 0; 0: off")
    recover_lr: float = opt(3e-4, "learning rate of recover", "> 0")

    def __post_init__(self):
        for keep, _ in self.steps():
            if not 0 < keep <= 1:
                raise ValueError(f"keep={keep} must be in (0, 1]")
        if self.score != "auto" and self.score not in SCORES:
            raise ValueError(f"score={self.score!r} is unknown; choose one of {', '.join(SCORES)}")
        if self.mode == "merge" and any(keep <= 0.5 for keep, _ in self.steps()):
            raise ValueError("mode=merge needs keep > 0.5: ToMe merges tokens of one half (its set A) into "
                             "the other, and the first token never merges")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if self.align < 1 or (self.align > 1 and self.mode == "merge"):
            raise ValueError(f"align={self.align} must be >= 1, and 1 with mode=merge (ToMe's length follows "
                             "its pairs)")
        if self.recover < 0 or self.recover_lr <= 0:
            raise ValueError("recover must be >= 0 steps and recover_lr positive")

    def steps(self) -> list[tuple[float, int]]:
        if self.schedule:
            try:
                pairs = [item.split("@") for item in self.schedule.replace(" ", "").split("/") if item]
                steps = [(float(k), int(layer)) for k, layer in pairs]
            except ValueError:
                raise ValueError(f"schedule={self.schedule!r} is not 'keep@layer/keep@layer'") from None
        else:
            steps = [(self.keep, layer) for layer in self.layers]
        layers = [layer for _, layer in steps]
        if layers != sorted(set(layers)):
            raise ValueError(f"layers {layers} must be distinct and increasing")
        return steps


# --- the functions the rewritten graph calls (traced into ATen ops on re-export) ---------


def _keep_indices(scores, mask, num: int, den: int, keep_last: bool, align: int = 1):
    """Sorted indices of the K = ceil(num/den * N) best tokens (``align``: N - K rounded down to a
    multiple of it, at least 1); first (and last) forced in. A key no query may attend to (padding)
    scores -inf, read from the layer's own mask."""
    n = scores.shape[1]
    if align > 1:
        # drop a multiple of align (at least one token: a graph that may keep N takes a guard);
        # N - ceil(N num / den) is floor(N (den - num) / den), and floors nest: five scalar nodes
        k = n - torch.sym_max(n * (den - num) // (den * align) * align, 1)
    else:
        k = (n * num + den - 1) // den
    s = scores
    if mask is not None:
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        # keys some query may attend to, as one reduction over rows and heads (any(dim=(1, 2)) exports
        # as two, the size-1 head axis first: a copy of the whole map)
        valid = (allowed.to(torch.int64).amax(dim=(1, 2)) > 0).expand(s.shape[0], n)
        s = torch.where(valid, s, float("-inf"))
    pos = torch.arange(n, device=s.device)
    forced = (pos == 0) | (pos == n - 1) if keep_last else pos == 0
    s = s.masked_fill(forced, float("inf"))  # not an in-place store: that lifts a constant tensor
    # equal scores (keys the score's rows never see: outside a local attention's window) go to the
    # earlier position, as ONNX's TopK breaks ties and torch's topk need not: pos * 2^-40 is exact
    # in both runtimes and below any score's rounding but an exact tie's
    s = s - pos * 2.0 ** -40
    # the K best, then in order (the smallest K indices, sorted): two TopKs on the K already computed
    return s.topk(k, dim=1).indices.topk(k, dim=1, largest=False).values


def _gather_tokens(v, idx, dims: tuple[int, ...]):
    """``v`` with every axis in ``dims`` (of length N) indexed by idx [B, K], per batch row, in one
    ONNX GatherND: the token axes moved next to the batch's, the rows of that [B*N^m, ...] view
    picked at b*N^m plus the kept positions' flat index (a mask's K x K entries at once). (A
    gather over an index expanded to v's size is a GatherElements, a reference kernel in OpenVINO
    that reads an index as large as the values; take_along_dim's meta specialises symbolic sizes.)"""
    b, k = idx.shape
    if v.shape[0] == 1 and b != 1:
        v = v.expand(b, *v.shape[1:])
    at = tuple(range(1, len(dims) + 1))
    moved = v.movedim(dims, at)
    n = moved.shape[1]
    flat = torch.arange(b, device=idx.device)   # the row's flat position, one token axis at a time
    for j in range(len(dims)):
        flat = flat[..., None] * n + idx[(slice(None),) + (None,) * j]
    # indexed by the [B, K, ...] index itself, so the result's shape is the index's (a reshape of a
    # flat pick to K x K left an unsimplified K**2 // K that a second cut could not prune)
    return moved.flatten(0, len(dims))[flat].movedim(at, dims)


def _fuse_hidden(x, idx, scores):
    """EViT fusion: the kept tokens, then one token that is the score-weighted mean of the
    dropped ones (normalised by their total score; EViT's code leaves it unnormalised)."""
    kept = _gather_tokens(x, idx, (1,))
    w = scores.scatter(1, idx, torch.zeros_like(idx, dtype=scores.dtype))
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    fused = (w.unsqueeze(-1) * x).sum(1, keepdim=True)
    return torch.cat([kept, fused], 1)


def _fuse_mask(mask, idx):
    """The kept tokens' mask, grown by the fused token: everyone may attend to it, and it
    attends to what any query may attend to."""
    m = _gather_tokens(mask, idx, (2, 3))
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    row = torch.cat([allowed.any(dim=-2, keepdim=True), torch.ones_like(allowed[..., :1, :1])], -1)
    col = torch.ones_like(allowed[..., :1])
    grown = torch.cat([torch.cat([allowed, col], -1), row], -2)
    return grown if m.dtype == torch.bool else torch.zeros_like(grown, dtype=m.dtype).masked_fill(
        ~grown, torch.finfo(m.dtype).min)


def _merge(x, k, mask, num: int, den: int):
    """ToMe bipartite soft matching on this layer's keys (mean over heads, cosine): tokens split
    alternately into a and b; the r = N - K a-tokens most similar to some b-token are averaged
    into it. CLS (a[0]) and padding never merge. Returns the merged stream, a float mask for the
    later attentions that adds log(size) to each key's logits (proportional attention) and hides
    padding, and, per original position, the index of its merged token. The sequence is first
    padded by one or two invalid tokens to an even length (every size is then a function of
    N // 2 alone, which keeps the exported shapes free of parity guards); they stay as masked
    slots in the output."""
    b, n, d = x.shape
    metric = k.mean(1)
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if mask is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
    else:
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        valid = allowed.any(dim=-2).any(dim=1).expand(b, n)
    # sizes so far: an earlier merge's mask adds log(size) to each key (a plain mask adds 0: size 1)
    if mask is None or mask.dtype == torch.bool:
        size_in = torch.ones(b, n, dtype=x.dtype, device=x.device)
    else:
        bias_in = mask.amax(dim=-2).amax(dim=1).expand(b, n)
        size_in = torch.where(valid, bias_in.clamp(max=30.0).exp(), torch.ones_like(bias_in))
    na = n // 2 + 1
    extra = 2 * na - n  # 1 or 2, never 0: a zero pad would be specialised away at export
    pairs = torch.nn.functional.pad(x, (0, 0, 0, extra)).view(b, na, 2, d)
    mpairs = torch.nn.functional.pad(metric, (0, 0, 0, extra)).view(b, na, 2, metric.shape[-1])
    vpairs = torch.nn.functional.pad(valid, (0, extra), value=False).view(b, na, 2)
    spairs = torch.nn.functional.pad(size_in, (0, extra), value=1.0).view(b, na, 2)
    xa, xb, ma, mb, va, vb = pairs[:, :, 0], pairs[:, :, 1], mpairs[:, :, 0], mpairs[:, :, 1], vpairs[..., 0], vpairs[..., 1]
    sa, sb = spairs[..., 0], spairs[..., 1]
    sim = ma @ mb.transpose(-2, -1)
    first = torch.arange(na, device=x.device) == 0
    sim = sim.masked_fill(~vb[:, None, :] | ~va[:, :, None] | first[None, :, None], float("-inf"))
    best, dst_all = sim.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    r = n - (n * num + den - 1) // den
    src = order[:, :r]
    unm = order[:, r:].sort(dim=-1).values
    dst = dst_all.gather(1, src)
    # size-weighted averages (ToMe's merge_wavg): a token standing for s originals counts s times
    wa = (xa * sa.unsqueeze(-1)).gather(1, src.unsqueeze(-1).expand(-1, -1, d))
    summed = (xb * sb.unsqueeze(-1)).scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, d), wa)
    size_b = sb.scatter_add(1, dst, sa.gather(1, src))
    merged = torch.cat([xa.gather(1, unm.unsqueeze(-1).expand(-1, -1, d)), summed / size_b.unsqueeze(-1)], 1)
    size = torch.cat([sa.gather(1, unm), size_b], 1)
    key_valid = torch.cat([va.gather(1, unm), vb], 1)
    bias = size.log().masked_fill(~key_valid, torch.finfo(x.dtype).min)
    kk = merged.shape[1]
    new_mask = bias[:, None, None, :].expand(b, 1, kk, kk)
    kept_a = unm.shape[1]
    map_a = torch.zeros_like(va, dtype=torch.long)
    map_a = map_a.scatter(1, unm, torch.arange(kept_a, device=x.device).expand(b, kept_a))
    map_a = map_a.scatter(1, src, dst + kept_a)
    map_b = (torch.arange(na, device=x.device) + kept_a).expand(b, na)
    mapping = torch.stack([map_a, map_b], dim=-1).view(b, 2 * na)
    return merged, new_mask, mapping


def _unmerge(full, mapping, pruned):
    """Every original position gets its merged token's output (DyMU's virtual unmerging)."""
    mapping = mapping.narrow(1, 0, full.shape[1])
    return pruned.gather(1, mapping.unsqueeze(-1).expand(-1, -1, pruned.shape[-1]))


def _restore(full, idx, pruned):
    """Scatter the pruned stream back into the pre-pruning one: shape [B, N, D] again (a fused
    token, if any, is dropped: it has no position of its own)."""
    index = idx.unsqueeze(-1).expand(-1, -1, full.shape[-1])
    return full.scatter(1, index, pruned[:, : idx.shape[1]])


# --- the rewrite ---------------------------------------------------------------------------

def _layer_of(node) -> int | None:
    for path, _ in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
        m = re.search(r"\.(\d+)(\.|$)", path)
        if m:
            return int(m.group(1))
    return None


def _expr(x):
    """The sympy expression of a size (symbolic or not)."""
    import sympy
    return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


def _depends_on(x, seq) -> bool:
    return bool(_expr(x).free_symbols & seq.free_symbols)


def _prune_once(rw: Rewrite, layer: int, keep: float, opts: TokenPruneOptions, causal: bool, n_out: int,
                last: bool = True) -> None:
    """One cut after ``layer`` in the graph being rewritten (``n_out``: the program's own outputs;
    earlier cuts' streams for ``restore`` ride after them)."""
    graph = rw.graph
    nodes = list(graph.nodes)
    in_layer = [i for i, n in enumerate(nodes) if _layer_of(n) == layer]
    att = [n for n in nodes if ATTENTION.matches(n) and _layer_of(n) == layer]
    if not in_layer or len(att) != 1:
        layers = [_layer_of(n) for n in nodes if ATTENTION.matches(n)]
        shared = sorted({x for x in layers if layers.count(x) > 1 and x is not None})
        why = (f"; the graph runs one layer's module {layers.count(shared[0])} times (weights shared across "
               "layers, as ALBERT's), and layers are told apart by module" if shared else "")
        raise PassError(f"token_prune: cannot find exactly one attention in layer {layer} (found {len(att)}){why}")
    cut = nodes[in_layer[-1] + 1]
    before = set(nodes[: in_layer[-1] + 1])
    after = set(nodes[in_layer[-1] + 1:])
    q, k, _v, mask, scale, is_causal = att[0].args
    seq = _expr(q.meta["val"].shape[2])  # the token count at this layer (already pruned before?)
    if not seq.free_symbols:  # a fixed token count (a ViT's patches): its literal is rewritten below
        _check_fixed_length(int(seq), q.meta["val"].shape)
    frac = Fraction(keep).limit_denominator(1000)
    scores = idx = new_len = None
    if opts.mode != "merge":  # merge matches on keys instead of scoring
        with graph.inserting_before(cut):
            score = opts.score
            if score in ("head_weighted", "diverse"):  # from the first row (encoders) or the last (causal)
                score = f"{score}@{'last' if causal else 'cls'}"
            extra = (att[0],) if opts.score == "head_weighted" else ()
            scores = graph.call_function(TOKEN_SCORES.overload, (q, k, mask, scale, is_causal, score, *extra))
            idx = graph.call_function(_keep_indices, (scores, mask, frac.numerator, frac.denominator, causal,
                                                      opts.align))
            new_len = graph.call_function(torch.ops.aten.sym_size.int, (idx, 1))
            if opts.mode == "fuse":
                new_len = graph.call_function(operator.add, (new_len, 1))
    carried = set(graph.output_node().args[0][n_out:])   # earlier cuts' (restore)
    crossing = {a for n in after for a in n.all_input_nodes if a in before and a.op != "get_attr"} - carried
    hidden = after_cut = None   # the hidden stream crossing the cut, and what replaces it after
    merged = None
    if opts.mode == "merge":
        streams = [a for a in crossing if isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dim() == 3
                   and _expr(a.meta["val"].shape[1]) == seq]
        if len(streams) != 1:
            raise UsageError("token_prune: mode=merge needs exactly one hidden stream crossing the cut; "
                             "use mode=drop for this model.")
        with graph.inserting_before(cut):
            merged = graph.call_function(_merge, (streams[0], k, mask, frac.numerator, frac.denominator))
            merged_parts = [graph.call_function(operator.getitem, (merged, i)) for i in range(3)]
            new_len = graph.call_function(torch.ops.aten.sym_size.int, (merged_parts[0], 1))
    for value in sorted(crossing, key=nodes.index):
        val = value.meta.get("val")
        if isinstance(val, torch.SymInt):
            if _expr(val) == seq:
                value.replace_all_uses_with(new_len, delete_user_cb=lambda u: u in after)
            elif _depends_on(val, seq):
                raise PassError(f"token_prune: {value.name} = {val} depends on the sequence length; "
                                "this layer cannot be pruned")
            continue
        if not isinstance(val, torch.Tensor):
            continue
        dims = tuple(i for i, d in enumerate(val.shape) if _expr(d) == seq)
        if any(_depends_on(d, seq) for i, d in enumerate(val.shape) if i not in dims):
            raise PassError(f"token_prune: {value.name} has shape {list(val.shape)}, a length that is an "
                            "expression of the sequence length; this layer cannot be pruned")
        if not dims:
            continue
        if opts.mode == "merge":
            part = 0 if val.dim() == 3 and dims == (1,) else 1 if val.dim() == 4 and dims == (2, 3) else None
            if part is None:
                raise UsageError(f"token_prune: mode=merge cannot re-derive {value.name} (shape {list(val.shape)}) "
                                 "for merged tokens; use mode=drop for this model.")
            value.replace_all_uses_with(merged_parts[part], delete_user_cb=lambda u: u in after)
            if part == 0:
                hidden, after_cut = value, merged_parts[0]
            continue
        if opts.mode == "drop":
            fn, args = _gather_tokens, (value, idx, dims)
        elif val.dim() == 3 and dims == (1,) and hidden is None:
            fn, args = _fuse_hidden, (value, idx, scores)
        elif val.dim() == 4 and dims == (2, 3):
            fn, args = _fuse_mask, (value, idx)
        else:
            raise UsageError(f"token_prune: mode=fuse cannot extend {value.name} (shape {list(val.shape)}) by a "
                             "fused token; use mode=drop for this model.")
        with graph.inserting_before(cut):
            gathered = graph.call_function(fn, args)
        value.replace_all_uses_with(gathered, delete_user_cb=lambda u, g=gathered: u in after and u is not g)
        if val.dim() == 3 and dims == (1,) and hidden is None:
            hidden, after_cut = value, gathered
    if not seq.free_symbols:
        n = int(seq)
        kept = merged_length(n, keep) if opts.mode == "merge" else kept_length(n, keep, opts.align) + (opts.mode == "fuse")
        _rewrite_fixed_length(after, n, kept)
    if opts.restore:
        if hidden is None:
            raise PassError("token_prune: restore needs the hidden stream crossing the cut")
        point = _restore_point(graph, seq, hidden.meta["val"].shape[2], len(rw.attention) - 1)
        if point is None:
            raise PassError("token_prune: restore found no [batch, tokens, hidden] output of the last layer "
                            "to give the pruned tokens back to")
        if point is hidden:  # a cut after the last layer: restore what replaced its output
            point, anchor = after_cut, cut
        else:
            anchor = point.next
        _restore_at(rw, point, anchor, hidden, merged_parts[2] if merged is not None else idx, n_out, last,
                    merged is not None)


def _token_axis_outputs(program: Program) -> dict[int, int]:
    """{output index: rank} of the unpruned graph's outputs whose axis 1 is the input's tokens."""
    seq = _expr(program.input_nodes()["input_ids"].meta["val"].shape[1])
    outs = [n.meta.get("val") for n in program.graph.output_node().args[0]]
    return {i: v.dim() for i, v in enumerate(outs)
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and _expr(v.shape[1]) == seq}


def per_token_heads(program: Program) -> list[str]:
    """An encoder's outputs that predict per input token (token classification, answer spans):
    pruning would drop positions from them. (``last_hidden_state`` may shrink: an encoder's
    contract is its pooled outputs.)"""
    if program.task == "causal-lm" or "input_ids" not in program.input_names:
        return []
    return [program.output_names[i] for i in _token_axis_outputs(program) if program.output_names[i] != "last_hidden_state"]


def _restore_point(graph, seq, width: int, last_layer: int):
    """The last layer's output (its last [B, N, width] value): where ``restore`` gives the pruned
    tokens back, so that whatever follows the encoder (``last_hidden_state``, a token-classification
    or answer-span head) sees every position. None if the last layer has no such value."""
    point = None
    for n in graph.nodes:
        v = n.meta.get("val")
        if (_layer_of(n) == last_layer and isinstance(v, torch.Tensor) and v.dim() == 3
                and _expr(v.shape[1]) == seq and v.shape[2] == width):
            point = n
    return point


def _restore_at(rw: Rewrite, point, anchor, hidden, link, n_out: int, last: bool, merge: bool) -> None:
    """Before the last cut, carry this cut's stream and index out of the graph (extra outputs
    after the ``n_out`` real ones, so that they survive re-export). At the last cut, give
    ``point`` (the last layer's output) back its original length for everything that reads it
    (the scatters go before ``anchor``): the innermost cut first, each pruned token getting its
    representation from just before the cut that dropped it."""
    graph, outputs = rw.graph, rw.outputs
    args = list(outputs.values())
    if not last:
        i = (len(args) - n_out) // 2
        rw.set_outputs({**outputs, f"tokopt_cut{i}_stream": hidden, f"tokopt_cut{i}_index": link})
        return
    cuts = [(args[i], args[i + 1]) for i in range(n_out, len(args), 2)] + [(hidden, link)]
    nodes = list(graph.nodes)
    readers = set(nodes[nodes.index(anchor):])  # a merge's own length reads it before the anchor
    value = point
    with graph.inserting_before(anchor):
        for stream, index in reversed(cuts):
            value = graph.call_function(_unmerge if merge else _restore, (stream, index, value))
    point.replace_all_uses_with(value, delete_user_cb=lambda u: u in readers)
    rw.set_outputs(dict(list(rw.outputs.items())[:n_out]))


@register_pass
class TokenPrunePass(Pass):
    name = "token_prune"
    Options = TokenPruneOptions
    requires = (CANONICAL_ATTENTION,)
    changes_tokens = True
    on_generate = ("a pruned prefill leaves the KV cache without the dropped tokens, which the decode steps then "
                   "need. Prune the prefill-only graph (compile with --no-generate).")
    tolerance = None  # approximate by design; keep=1.0 is exact (tested)
    summary = "keep the most attended tokens after chosen layers; later layers run on fewer tokens"

    def call(self, program: Program) -> PassResult:
        opts = self.options
        steps = opts.steps()
        depth = len(program.attention_blocks("token_prune"))
        causal = program.task == "causal-lm" or any(b.causal for b in program.attention)
        if program.cache is not None:
            raise UsageError("token_prune cannot run on a --generate graph: a pruned prefill leaves the KV "
                             "cache without the dropped tokens, which the decode steps then need. Prune the "
                             "prefill-only graph (compile with --no-generate).")
        for _, layer in steps:
            if not 0 <= layer < depth:
                raise UsageError(f"token_prune: layer {layer} is past the model's depth ({depth} attention "
                                 f"layers: 0-{depth - 1}).")
        if opts.score == "auto":
            opts = replace(opts, score="last" if causal else "cls")
        if causal and opts.score == "cls":
            raise UsageError("token_prune: score=cls needs a bidirectional model; in a causal model the first "
                             "token attends only to itself. Use score=last or score=mean.")
        if causal and opts.mode in ("fuse", "merge"):
            raise UsageError(f"token_prune: mode={opts.mode} is for encoders; a fused or merged token has no "
                             "position in a causal sequence. Use mode=drop.")
        if causal and opts.restore:
            raise UsageError("token_prune: restore=true is for encoders; a causal LM's contract is the last "
                             "position's logits.")
        if all(keep == 1.0 for keep, _ in steps):
            return PassResult(program, False, {"pruned_layers": []})
        heads = per_token_heads(program)
        if heads and not opts.restore:
            raise UsageError(f"token_prune: output {heads[0]!r} has a value per input token (a token-level "
                             "head); pruning would drop positions from it. Pass restore=true, which gives "
                             "every pruned token its last representation back before the head.")
        original = program
        cuts = [layer for keep, layer in steps if keep < 1.0]
        n_out = len(program.output_names)
        for keep, layer in steps:
            if keep == 1.0:
                continue
            rw = program.rewrite()
            _prune_once(rw, layer, keep, opts, causal, n_out, last=layer == cuts[-1])
            program = rw.commit("token_prune: the pruned graph")
        n_layers = max(depth, 1)
        work, frac = 0.0, 1.0
        for i in range(n_layers):
            work += frac
            frac *= dict((layer, keep) for keep, layer in steps).get(i, 1.0)
        stats = {"pruned_layers": [layer for _, layer in steps], "keep": [keep for keep, _ in steps],
                 "score": opts.score, "token_layer_fraction": round(work / n_layers, 4)}
        if opts.recover:
            stats["recovery"], program = recover(original, program, opts.recover, opts.recover_lr)
        return PassResult(program, True, stats)

    def ensures(self, program: Program, stats: dict) -> None:
        cuts = sum(1 for n in program.graph.nodes if TOKEN_SCORES.matches(n))
        if self.options.mode != "merge" and cuts < sum(keep < 1 for keep in stats["keep"]):
            raise PassError(f"token_prune cut after {stats['pruned_layers']}, but the graph scores tokens {cuts} times")


def _samples(program: Program) -> list[torch.Tensor]:
    """Token windows to recover on: ``--calib``, else the shipped passages' calibration split
    (reports measure on the other split), one passage per sample, at most 256 tokens."""
    from ..optimizer.data import default_texts, token_source, token_windows
    from ..optimizer.runtime import load_tokenizer
    if program.calib is None and program.tokenizer_dir is not None:
        tok = load_tokenizer(program.tokenizer_dir)
        return [torch.tensor([ids]) for ids in tok(default_texts("calib"), truncation=True, max_length=256)["input_ids"]]
    source, tok = token_source(program, "token_prune", "token_prune: recover= trains on data: give --calib ids.npy, or a model "
                                        "folder with a tokenizer.")
    return token_windows(source, tok, seq_len=256)


def _recovery_loss(student: torch.Tensor, teacher: torch.Tensor, causal: bool) -> torch.Tensor:
    """Causal LMs: KL of the last position's next-token distribution. Encoders: 1 - cosine of the
    mean-pooled and of the first-token representations (what pooled outputs are made of)."""
    if causal:
        return torch.nn.functional.kl_div(student[:, -1].log_softmax(-1), teacher[:, -1].log_softmax(-1),
                                          log_target=True, reduction="batchmean")
    cos = torch.nn.functional.cosine_similarity
    return (1 - cos(student.mean(1), teacher.mean(1))).mean() + (1 - cos(student[:, 0], teacher[:, 0])).mean()


def recover(original: Program, pruned: Program, steps: int, lr: float) -> tuple[dict, Program]:
    """Distil the pruned graph towards the unpruned one, tuning only its 1-D parameters (norm
    weights and biases, linear biases); deterministic (fixed data order, no sampling). Returns
    what it did and the tuned program."""
    import time

    from tqdm import tqdm

    from ..calibration.lm_eval import full_feed
    start = time.perf_counter()
    data = _samples(original)
    gm, teacher = pruned.unlifted(), original.runner()
    tuned = {n: p.detach().clone().requires_grad_() for n, p in gm.named_parameters()
             if p.dim() == 1 and p.is_floating_point()}
    optim = torch.optim.Adam(list(tuned.values()), lr=lr)
    first = pruned.output_names[0]
    causal = original.task == "causal-lm"
    losses = []
    for step in tqdm(range(steps), desc="token_prune: recovery", leave=False):
        feed = full_feed(original, data[step % len(data)])
        with torch.no_grad():
            target = teacher(feed)[first]
        out = torch.func.functional_call(gm, tuned, tuple(feed[n] for n in original.input_names))
        loss = _recovery_loss(out[0] if isinstance(out, (tuple, list)) else out, target, causal)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    tail = losses[-max(1, steps // 10):]
    return ({"steps": steps, "parameters": sum(t.numel() for t in tuned.values()), "samples": len(data),
             "loss_first": round(losses[0], 5), "loss_last": round(sum(tail) / len(tail), 5),
             "seconds": round(time.perf_counter() - start, 1)}, pruned.with_tensors(tuned, "token_prune: recovery"))
