"""Generation graphs onto ONNX Runtime's decoder kernel (targets that allow contrib ops).

For every canonical attention of a ``--generate`` program whose keys and values are the layer's
cache input with this call's keys appended (``cat(past_key_i, k)``), the attention index and a
walk over the graph find:

    q, k, v   the token-major projection outputs [B,S,H*d] the attention's inputs are views of
              (through the view to heads, the transpose and, for q and k, RoPE), or, where a
              per-head norm comes between (Qwen3, Gemma 3), the normed heads viewed token-major
    RoPE      ``x cos + rotate_half(x) sin``; cos and sin are functions of ``position_ids`` alone,
              evaluated once over every position the model supports into a [M, d/2] cache
    out       the token-major [B,S,H*d] the output projection reads

and the layer becomes one ``tokopt::cached_attention`` (ONNX: ``GroupQueryAttention``, RoPE
fused, ``present`` written into the cache buffer when the runner binds one buffer as past and
present), its inputs one packed projection: q, k and v linears (or ``matmul_nbits``) of the same
input are concatenated into one. What the index cannot place (no cache concatenation, RoPE
that reads more than ``position_ids``, a head size ONNX Runtime's rotary kernel refuses) is
reported, and then no layer is lowered: the kernel's rows are right-padded (``seqlens_k`` from
the mask's sum, as onnxruntime-genai feeds them) and a standard layer's left-padded, and one graph
takes one convention. A layer whose cache TCA chooses once after the prefill (a
``tokopt::tca_keep`` reading the attention's q and keys) rotates at ``position_ids`` (its cache
index stops being the position once the runner compacts the cache), and its ``tca_keep``
becomes ``tca_keep_packed``, which reads the packed projection and the kernel's cache. The
result is checked against the program on the probe and on unseen shapes before the export sees
it.
"""
from __future__ import annotations

import operator

import torch

from ..optimizer.errors import BackendError
from ..optimizer.ops import ATTENTION, CACHED_ATTENTION, TCA_KEEP, TCA_KEEP_PACKED
from ..optimizer.ops.gqa import windowed_cache_supported
from ..optimizer.patterns import PASS_THROUGH
from ..optimizer.program import Program, Rewrite, inherit_meta
from .projections import fused_projection

__all__ = ["lower_decoder", "decoder_feeds"]

# GroupQueryAttention takes several new tokens after a cache for one row only
# ("batch_size must be 1 when sequence_length > 1 and past context is given"): a batch
# prefills into an empty cache and decodes a token at a time, a chunk after a cache is one row
FEEDS = ((2, 7, 0), (3, 1, 9), (1, 4, 5))

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_FULL = 2 ** 63 - 1


def _strip(node):
    """Through pass-through ops and full slices."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        if node.target in PASS_THROUGH:
            node = node.args[0]
        elif node.target == aten.slice.Tensor and list(node.args[2:]) in ([0, _FULL], [0, _FULL, 1]):
            node = node.args[0]
        else:
            break
    return node


def _cache_concat(node, inputs: dict, longest: int | None) -> tuple[str, torch.fx.Node] | None:
    """(the cache input's name, the new keys) of ``cat([past, new], -2)``; past may itself be a
    concatenation with an empty tensor (how a cache object starts), or the cache's last W
    entries where W is at least the longest sequence the bundle takes (a sliding-window cache
    that never slides)."""
    node = _strip(node)
    if not (node.op == "call_function" and node.target == aten.cat.default and len(node.args[0]) == 2
            and (node.args[1] if len(node.args) > 1 else 0) in (-2, 2)):
        return None
    past, new = node.args[0]
    while past.op == "call_function":
        if past.target == aten.cat.default:
            parts = [p for p in past.args[0] if not (p.meta.get("val") is not None and p.meta["val"].numel() == 0)]
            if len(parts) != 1:
                return None
            past = _strip(parts[0])
        elif past.target == aten.slice.Tensor and past.args[1] in (2, -2) and list(past.args[3:4]) == [_FULL] \
                and isinstance(past.args[2], int) and past.args[2] < 0 and longest is not None \
                and -past.args[2] >= longest - 1:
            past = _strip(past.args[0])
        else:
            return None
    names = {n: name for name, n in inputs.items()}
    return (names[past], new) if past in names else None


def _rope(node):
    """(x, cos, sin) of ``x * cos + rotate_half(x) * sin``, or of its partial form
    ``cat([rope(x[..., :r]), x[..., r:]], -1)`` (cos and sin then r wide), else (node, None, None)."""
    node = _strip(node)
    if node.target == aten.cat.default and len(node.args[0]) == 2 and (node.args[1] if len(node.args) > 1 else 0) \
            in (-1, 3):
        rotated, rest = node.args[0]
        x, cos, sin = _rope(rotated)
        if cos is not None and all(isinstance(t, torch.fx.Node) and t.target == aten.slice.Tensor for t in (x, rest)) \
                and x.args[0] is rest.args[0] and x.args[1] == rest.args[1] in (3, -1) \
                and list(x.args[2:4]) == [0, rest.args[2]] and list(rest.args[3:4]) == [_FULL]:
            return x.args[0], cos, sin
        return node, None, None
    if node.target != aten.add.Tensor:
        return node, None, None
    for a, b in (node.args, node.args[::-1]):
        if not all(isinstance(t, torch.fx.Node) and t.target == aten.mul.Tensor for t in (a, b)):
            continue
        for x, cos in (a.args, a.args[::-1]):
            for rot, sin in (b.args, b.args[::-1]):
                if _rotates_half(rot, x):
                    return x, cos, sin
    return node, None, None


def _rotates_half(rot, x) -> bool:
    """Is ``rot`` ``cat([-x[..., h:], x[..., :h]], -1)``?"""
    if not (isinstance(rot, torch.fx.Node) and rot.target == aten.cat.default and len(rot.args[0]) == 2):
        return False
    neg, low = rot.args[0]
    if not (isinstance(neg, torch.fx.Node) and neg.target == aten.neg.default):
        return False
    high = neg.args[0]
    d = x.meta["val"].shape[-1]
    return all(isinstance(t, torch.fx.Node) and t.target == aten.slice.Tensor and t.args[0] is x and t.args[1] in (3, -1)
               for t in (high, low)) and list(high.args[2:4]) == [d // 2, _FULL] and list(low.args[2:4]) == [0, d // 2]


def _token_major(node):
    """How to read ``node`` ([B,H,S,d], the attention's q, k or v before RoPE) token-major, for
    ``_flat``: the [B,S,H*d] projection output it is ``transpose(view(., [B,S,H,d]), 1, 2)`` of; else
    (a per-head norm between, as Qwen3's before the transpose and Gemma 3's after it) the [B,S,H,d]
    tensor it is the transpose of, or itself."""
    node = _strip(node)
    if node.meta["val"].dim() != 4:
        return None
    if node.target != aten.transpose.int or sorted(a % 4 for a in node.args[1:]) != [1, 2]:
        return node, "heads"
    heads = _strip(node.args[0])
    if heads.target in _VIEWS and heads.args[0].meta["val"].dim() == 3:
        return heads.args[0], "flat"
    return heads, "tokens"


def _flat(rw: Rewrite, found):
    """The [B,S,H*d] tensor ``_token_major`` found, viewed (or transposed) where it is per head."""
    t, layout = found
    if layout == "flat":
        return t
    if layout == "heads":
        with rw.graph.inserting_after(t):
            t = rw.graph.call_function(aten.transpose.int, (t, 1, 2))
        t.meta["val"] = t.args[0].meta["val"].transpose(1, 2)
    with rw.graph.inserting_after(t):
        flat = rw.graph.call_function(aten.flatten.using_ints, (t, 2))
    flat.meta["val"] = t.meta["val"].flatten(2)
    return flat


def _output_flat(att):
    """The [B,S,H*d] view of ``att``'s output that the output projection reads."""
    node, transposed = att, False
    while len(node.users) == 1:
        (user,) = node.users
        if user.target == aten.transpose.int and sorted(a % 4 for a in user.args[1:]) == [1, 2] and not transposed:
            transposed = True
        elif user.target in _VIEWS and transposed and user.meta["val"].dim() == 3:
            return user
        elif user.target not in PASS_THROUGH + _VIEWS or user.meta["val"].dim() != 4:
            return None
        node = user
    return None


def _rotary_cache(rw: Rewrite, cos, sin, positions: int):
    """cos and sin over positions 0..positions-1, [positions, d/2], from the graph's own
    computation (which must read ``position_ids`` and constants only); None if it reads more or
    its halves differ (not rotate_half's layout)."""
    keep = {cos, sin}
    todo = [cos, sin]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in keep:
                keep.add(a)
                todo.append(a)
    inputs = rw.inputs
    if {n for n in keep if n.op == "placeholder"} - {inputs.get("position_ids")}:
        return None
    graph, env = torch.fx.Graph(), {}
    env[inputs["position_ids"]] = graph.placeholder("position_ids")
    for n in rw.graph.nodes:
        if n in keep and n.op != "placeholder":
            env[n] = graph.node_copy(n, env.__getitem__)
    graph.output((env[cos], env[sin]))
    with torch.no_grad():
        c, s = torch.fx.GraphModule(rw.gm, graph)(torch.arange(positions)[None])
    c, s = (t.reshape(positions, -1) for t in (c, s))
    half = c.shape[-1] // 2
    if not (torch.equal(c[:, :half], c[:, half:]) and torch.equal(s[:, :half], s[:, half:])):
        return None
    return c[:, :half].contiguous(), s[:, :half].contiguous()


def _packed(rw: Rewrite, projections: list, name: str):
    """One projection computing q, k and v side by side: their linears (or matmul_nbits) fused
    when they read the same input, else their outputs concatenated."""
    lins = [_strip(p) for p in projections]
    g = rw.graph
    splits = {p.args[0] for p in lins if p.target == operator.getitem}
    if len(splits) == 1 and [p.args[1] for p in lins] == [0, 1, 2] and next(iter(splits)).target in (
            aten.split.Tensor, aten.split_with_sizes.default) and next(iter(splits)).args[2] in (-1, 2):
        return next(iter(splits)).args[0]    # already one projection, split into q, k, v (GPT-2's c_attn)
    fused = fused_projection(rw, lins, f"{name}_qkv")
    if fused is not None:
        return fused
    with g.inserting_after(max(projections, key=list(g.nodes).index)):
        return g.call_function(aten.cat.default, (list(projections), -1))


def lower_decoder(program: Program) -> tuple[Program, dict]:
    """``program`` with its decoder attention on ``cached_attention`` (see the module
    docstring), and what was done: {"cached_attention": layers, "padding_side": "right"} (rows then
    take right padding), or where some layer cannot be lowered none is: {"kept": {layer: why}}."""
    spec = program.cache
    if spec is None or spec.index:
        return program, {}
    rw = program.rewrite()
    nodes = {n.name: n for n in rw.graph.nodes}
    inputs, outputs = rw.inputs, rw.outputs
    kept, done, rotary = {}, [], {}
    keeps = {n.args[0]: n for n in rw.graph.nodes if TCA_KEEP.matches(n)}   # by the attention's q
    for block in program.attention:
        att = nodes.get(block.node)
        why = None
        if block.spelling != "canonical" or att is None or not ATTENTION.matches(att):
            why = f"attention is {block.spelling}"
        elif not block.causal:
            why = "not causal"
        if why is None:
            q_arg, k_arg, v_arg = att.args[:3]
            kc, vc = _cache_concat(k_arg, inputs, spec.max_length), _cache_concat(v_arg, inputs, spec.max_length)
            if kc is None or vc is None or not kc[0].startswith("past_key_") or not vc[0].startswith("past_value_"):
                why = "its keys and values are not the cache input with this call's appended"
        if why is None:
            q0, cos, sin = _rope(q_arg)
            k0, kcos, ksin = _rope(kc[1])
            q, k, v = _token_major(q0), _token_major(k0), _token_major(vc[1])
            out = _output_flat(att)
            if None in (q, k, v, out) or (cos is None) != (kcos is None) or (cos is not None and (cos, sin) != (kcos, ksin)):
                why = "its q, k, v or output are not views of token-major projections with one RoPE"
            elif cos is not None and block.head_dim % 16:
                why = f"head size {block.head_dim}: ONNX Runtime's fused rotary needs a multiple of 16"
        if why is None and cos is not None and (cos, sin) not in rotary:
            rotary[(cos, sin)] = _rotary_cache(rw, cos, sin, spec.max_length or 4096)
            if rotary[(cos, sin)] is not None:
                c, s = rotary[(cos, sin)]
                rotary[(cos, sin)] = (rw.constant(f"rotary_cos_{len(rotary)}", c), rw.constant(f"rotary_sin_{len(rotary)}", s))
        if why is None and cos is not None and rotary[(cos, sin)] is None:
            why = "its RoPE reads more than position_ids, or does not rotate halves"
        elif why is None and cos is not None and rw.tensor(rotary[(cos, sin)][0]).shape[1] % 8:
            why = (f"its RoPE rotates {2 * rw.tensor(rotary[(cos, sin)][0]).shape[1]} dims: ONNX Runtime's fused "
                   "rotary needs a multiple of 16")
        if why is not None:
            kept[block.layer] = why
            continue
        layer = kc[0].removeprefix("past_key_")
        qkv = _packed(rw, [_flat(rw, found) for found in (q, k, v)], f"layer{layer}")
        c, s = rotary[(cos, sin)] if cos is not None else (None, None)
        keep = keeps.get(q_arg)
        window = spec.windows[int(layer)] if spec.windows else 0
        positions = inputs["position_ids"] if keep is not None and c is not None else None
        tail = [positions, window, block.softcap]   # the op's optional arguments, as far as one is set
        while tail and tail[-1] in (None, 0):
            tail.pop()
        with rw.graph.inserting_before(out):
            call = rw.graph.call_function(CACHED_ATTENTION.overload, (
                qkv, inputs[kc[0]], inputs[vc[0]], inputs["attention_mask"], c, s, block.heads,
                block.kv_heads, float(block.scale), *tail))
            parts = [rw.graph.call_function(operator.getitem, (call, i)) for i in range(3)]
        inherit_meta(call, att)
        if keep is not None:
            with rw.graph.inserting_after(parts[-1]):
                packed = rw.graph.call_function(TCA_KEEP_PACKED.overload, (
                    qkv, parts[1], inputs["attention_mask"], inputs["position_ids"], c, s, block.heads,
                    block.kv_heads, *keep.args[3:]))
            inherit_meta(packed, keep)
            keep.replace_all_uses_with(packed)
            rw.graph.erase_node(keep)
            outputs.update({name: packed for name, node in outputs.items() if node is keep})
        out.replace_all_uses_with(parts[0])
        outputs[f"present_key_{layer}"], outputs[f"present_value_{layer}"] = parts[1], parts[2]
        done.append(block.layer)
    if kept or len(done) != spec.layers:
        # every layer or none: the kernel's layers take right-padded rows, the others' left
        if not kept:
            kept = {"-": f"the attention of {spec.layers - len(done)} of {spec.layers} layers was not found"}
        return program, {"kept": kept, "lowered": "no layer: every layer goes on the kernel or none (one padding "
                                                  "convention for the graph)"}
    rw.set_outputs(outputs)
    lowered = rw.commit("lowering the decoder attention")
    _check(program, lowered)
    windowed = {str(layer): w for layer, w in enumerate(spec.windows) if w} if windowed_cache_supported() else {}
    return lowered, {"cached_attention": done, "padding_side": "right",
                     **({"windowed_cache": windowed} if windowed else {})}


def decoder_feeds(program: Program) -> list[dict]:
    """Inputs a lowered decoder takes (see FEEDS), as numpy; with sliding windows, also a step
    after a cache one longer than the widest, where the kernel's window must agree with the mask's."""
    from ..optimizer.generation import example_feed
    spec = program.cache
    shapes = list(FEEDS)
    widest = max(spec.windows, default=0)
    if widest and (spec.max_length is None or widest + 2 <= spec.max_length):
        shapes.append((1, 1, widest + 1))
    return [{k: v.numpy() for k, v in example_feed(spec, *shape, seed=2).items()} for shape in shapes]


def _check(program: Program, lowered: Program) -> None:
    from ..optimizer.pass_manager import max_abs_error
    for feed in decoder_feeds(program):
        feed = {k: torch.from_numpy(v) for k, v in feed.items()}
        want, got = program.run(feed), lowered.run(feed)
        err = max_abs_error(want, got)
        if not err <= 1e-4 * max(1.0, max(float(v.abs().max()) for v in want.values() if v.numel())):
            shape = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items() if not k.startswith("past_value"))
            raise BackendError(f"the decoder lowering changed the graph's outputs by {err:.3g} at {shape}; this is "
                               "a tokopt bug, report it.")
