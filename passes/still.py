"""still: STILL — hybrid softmax/linear attention inserted into a pretrained model, distilled on the CPU.

    tokopt compile MODEL --passes still[:layers=1/2,chunk=64,top_k=4,feature=npmap] --calib text.txt

Rewrite: the canonical attention of each chosen layer (default: all but the first and the last)
becomes ``tokopt::still_attention`` (``optimizer/ops/still.py``): per chunk of ``chunk`` tokens the
``top_k`` most self-salient tokens stay in exact softmax attention (with the local window), the
rest are summarised by linear attention through the NP-Map feature map, gated by a new
``hidden -> heads x head_dim`` projection. New parameters per layer: the gate (initialised to
zero: sigmoid 0.5), NP-Map's Householder vectors and per-head maps for q and for k (the maps
start at the identity here, where STILL's code uses nn.Linear's random init: on a CPU budget of
a few hundred steps the identity starts from the pretrained directions), and a per-head factor
on the linear part (``mix``, from the LoLCATs path of STILL's code; see ``still_op``).

Distillation on ``--calib`` (windows of ``seq_len`` tokens; the last ``eval_windows`` are held
out for perplexity), deterministic (``seed``), cached on disk by (weights, data, options):
1. Attention transfer: per converted layer, only its feature maps and gate train (Adam,
   ``steps``), on the original model's q, k, v and block input, to match the original
   attention output (MSE relative to the output's power; reported per layer, first and last).
2. LoRA (``lora_steps``, rank ``lora_rank``) on the converted layers' q/k/v/o projections with
   the next-token loss, merged into the weights before export. Kept only where it pays: if the
   held-out perplexity after stage 2 is not below stage 1's, the stage-1 weights ship and the
   report says so. Causal LMs only (an encoder has no language-model loss here).

Baselines through the same pass: ``feature=none,top_k=0`` is sliding-window softmax (the
window is chunk c-1 plus chunk c up to the query); ``feature=elu`` or ``hedgehog`` with
``top_k=0`` is linear attention with a standard feature map beside that window, and with
``exact_window=0`` pure linear attention. Not on ``--generate`` graphs yet: decoding needs
STILL's recurrent cache (salient KV + linear state), which the bundle's KV-cache layout lacks.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..calibration.lm_eval import full_feed, passkey_stats, perplexity
from ..calibration.stats import cached_tensors, program_hash
from ..optimizer.data import token_source, token_windows
from ..optimizer.errors import PassError, UsageError
from ..optimizer.ops import STILL, Tap
from ..optimizer.ops.still import FEATURES, still_reference
from ..optimizer.pass_manager import ATTENTION_TO_REPLACE, FLOAT_WEIGHTS, Pass, PassResult, opt, register_pass
from ..optimizer.program import Program, Rewrite, inherit_meta
from .linears import is_weight, projection_input

__all__ = ["StillPass", "StillOptions", "exact_keys"]

aten = torch.ops.aten
CACHE_VERSION = 2
PARAMS = ("gate_w", "fq_u", "fq_w", "fk_u", "fk_w", "mix")
MIX_INIT = -2.197  # sigmoid = 0.1, the window factor's initial value in STILL's code
STAGE2 = ("lora_steps", "lora_rank", "lora_lr", "lora_loss")  # options stage 1 does not depend on


def _cosine(optim, steps: int):
    """Learning rate decayed from its start to 0 over ``steps`` (half a cosine)."""
    return torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))


def exact_keys(n: int, chunk: int, top_k: int, causal: bool = True, exact_window: bool = True) -> float:
    """Mean number of keys a query attends to exactly at length ``n`` (causal prefill)."""
    total = 0
    for t in range(n):
        c, i = divmod(t, chunk)
        if causal:
            local = (i + 1 + (chunk if c else 0)) if exact_window else 0
            total += local + min(top_k, chunk) * max(c - 1, 0)
        else:
            chunks = -(-n // chunk)
            near = min(c + 1, chunks - 1) - max(c - 1, 0) + 1
            total += (min(n, (c + 2) * chunk) - max(0, (c - 1) * chunk) if exact_window else 0) + \
                min(top_k, chunk) * (chunks - near)
    return total / n


@dataclass(frozen=True)
class StillOptions:
    layers: tuple[int, ...] = opt((), "layers converted to hybrid attention", "'/'-separated; empty: all but the "
                                  "first and the last")
    chunk: int = opt(64, "tokens per chunk", ">= 2")
    top_k: int = opt(4, "salient tokens per chunk kept in exact softmax", "0 .. chunk (chunk: exact attention)")
    feature: str = opt("npmap", "feature map of the linear part", "|".join(FEATURES))
    exact_window: bool = opt(True, "the local window in exact softmax (false: linear too)", "true|false")
    steps: int = opt(300, "attention-transfer steps per layer (stage 1)", ">= 0")
    lr: float = opt(1e-2, "stage 1 learning rate", "> 0")
    lora_steps: int = opt(60, "LoRA distillation steps (stage 2, causal LMs)", ">= 0; 0: off")
    lora_rank: int = opt(8, "LoRA rank", ">= 1")
    lora_lr: float = opt(3e-3, "stage 2 learning rate", "> 0")
    lora_loss: str = opt("kd", "stage 2 loss: KL to the original's next-token distribution, or the next-token "
                         "loss", "kd|lm")
    batch: int = opt(2, "windows per training step", ">= 1")
    seq_len: int = opt(1024, "tokens per training window (at most the model's context)", ">= 2 chunks")
    train_windows: int = opt(16, "training windows from --calib (at most: what the text holds past eval_windows)",
                             ">= batch")
    eval_windows: int = opt(4, "held-out windows for perplexity", ">= 0")
    seed: int = opt(0, "random seed", "int")

    def __post_init__(self):
        if self.chunk < 2:
            raise ValueError(f"chunk={self.chunk} must be at least 2")
        if not 0 <= self.top_k <= self.chunk:
            raise ValueError(f"top_k={self.top_k} must be in [0, chunk={self.chunk}] (salient tokens per chunk; "
                             "chunk keeps every token exact)")
        if self.feature not in FEATURES:
            raise ValueError(f"feature={self.feature!r}: use one of {', '.join(FEATURES)}")
        if self.feature == "none" and not self.exact_window and self.top_k == 0:
            raise ValueError("feature=none with exact_window=0 and top_k=0 attends to nothing")
        if min(self.steps, self.lora_steps) < 0 or self.lora_rank < 1 or self.lr <= 0 or self.lora_lr <= 0:
            raise ValueError("steps and lora_steps must be >= 0, lora_rank >= 1 and the learning rates positive")
        if self.lora_loss not in ("kd", "lm"):
            raise ValueError(f"lora_loss={self.lora_loss!r}: use kd (distil the original) or lm (next-token loss)")
        if self.batch < 1 or self.train_windows < self.batch or self.eval_windows < 0:
            raise ValueError("batch must be >= 1, train_windows >= batch and eval_windows >= 0")
        if self.seq_len < 2 * self.chunk:
            raise ValueError(f"seq_len={self.seq_len} must be at least two chunks ({2 * self.chunk})")
        if any(layer < 0 for layer in self.layers):
            raise ValueError(f"layers {self.layers} must be non-negative layer indices")


@register_pass
class StillPass(Pass):
    name = "still"
    Options = StillOptions
    requires = (ATTENTION_TO_REPLACE, FLOAT_WEIGHTS)
    replaces_attention = True
    trains_weights = True   # LoRA on the converted layers' projections, merged into float weights
    on_generate = ("decoding needs STILL's recurrent cache (salient KV + linear state), which the bundle's KV-cache "
                   "layout lacks. Compile with --no-generate.")
    summary = "STILL: salient tokens in exact softmax, the rest in NP-Map linear attention, distilled on --calib"

    def layers(self) -> tuple[int, ...] | None:
        return self.options.layers or None

    def _blocks(self, program: Program):
        opts = self.options
        if program.cache is not None:
            raise UsageError("still does not support --generate graphs yet: decoding needs STILL's recurrent cache "
                             "(salient KV + linear state). Compile with --no-generate.")
        blocks = [b for b in program.attention_blocks("still") if b.layer is not None]
        depth = max(b.layer for b in program.attention if b.layer is not None) + 1
        layers = opts.layers or (tuple(range(1, depth - 1)) if depth > 2 else tuple(range(depth)))
        if max(layers) >= depth:
            raise UsageError(f"still: layer {max(layers)} is past the model's depth (layers: 0-{depth - 1}).")
        blocks = [b for b in blocks if b.layer in layers]
        if any(b.causal is None for b in blocks):
            raise UsageError("still: the causality of some attention blocks could not be read from the graph; "
                             "see `tokopt inspect MODEL`.")
        return blocks, depth

    def _inputs(self, view, block) -> torch.fx.Node:
        """The block's input hidden states: what its q projection reads."""
        x = projection_input(view, block.q_proj)
        if x is not None:
            return x
        raise UsageError(f"still: the input of layer {block.layer}'s attention (what {block.q_proj} reads) is not "
                         "a linear in the graph; this model's attention is not supported yet.")

    def _data(self, program: Program, limit: int):
        opts = self.options
        source, tok = token_source(program, "still", "still distils its feature maps and gates on data: give --calib "
                                            "ids.npy, or a model folder with a tokenizer and --calib text.")
        length = min(opts.seq_len, limit)
        windows = token_windows(source, tok, seq_len=length)
        # a shorter text trains on what is left after the held-out windows (the shipped passages hold
        # 16 windows of 1024 tokens: 12 train with the default 4 held out); too few to train is refused
        train = min(opts.train_windows, len(windows) - opts.eval_windows)
        if train < opts.batch:
            raise UsageError(f"still: {source} holds {len(windows)} windows of {length} tokens; distillation needs "
                             f"eval_windows={opts.eval_windows} held out and at least batch={opts.batch} to train on. "
                             "Give more text or lower eval_windows or seq_len.")
        return windows[:train], windows[len(windows) - opts.eval_windows:], tok

    # -- the rewrite -------------------------------------------------------------------------
    def _rewrite(self, rw: Rewrite, blocks) -> dict[int, dict[str, torch.Tensor]]:
        """Each block's attention -> still_attention reading new constants; their initial values."""
        opts = self.options
        feature = FEATURES[opts.feature]
        g = rw.graph
        nodes = {n.name: n for n in g.nodes}
        gen = torch.Generator().manual_seed(opts.seed)
        params = {}
        for block in blocks:
            node = nodes[block.node]
            q, k, v, mask, scale, _ = node.args
            x = self._inputs(rw, block)
            h, d, dv = block.heads, block.head_dim, q.meta["val"].shape[-1]
            hidden = x.meta["val"].shape[-1]
            u = torch.randn(h, d, generator=gen)
            init = {"gate_w": torch.zeros(h * dv, hidden), "fq_u": u, "fq_w": torch.eye(d).repeat(h, 1, 1),
                    "fk_u": u.clone(), "fk_w": torch.eye(d).repeat(h, 1, 1), "mix": torch.full((h,), MIX_INIT)}
            used = PARAMS if feature < 2 else ("gate_w", "mix")
            consts = {name: rw.constant(f"still{block.layer}_{name}", init[name]) for name in used}
            fmap = [consts.get(name) for name in PARAMS[1:]]
            with g.inserting_before(node):
                new = g.call_function(STILL.overload, (q, k, v, x, consts["gate_w"], *fmap, mask, scale,
                                                       bool(block.causal), opts.top_k, opts.chunk, feature,
                                                       opts.exact_window))
            inherit_meta(new, node)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            params[block.layer] = {name: init[name] for name in used}
        return params

    # -- stage 1: attention transfer ---------------------------------------------------------
    def _collect(self, original: Program, blocks, windows) -> dict[int, tuple[float, list[tuple]]]:
        """Per layer: the attention's scale and, per window, the original attention's inputs
        (q, k, v, mask), the block input and the attention output."""
        names, scales = {}, {}
        for b in blocks:
            node = next(n for n in original.graph.nodes if n.name == b.node)
            names[b.layer] = [a.name if isinstance(a, torch.fx.Node) else a for a in node.args[:4]] + \
                [self._inputs(original, b).name, node.name]
            scales[b.layer] = node.args[4]
        tap = Tap(original.unlifted(), values=[n for v in names.values() for n in v if isinstance(n, str)])
        out: dict[int, list[tuple]] = {layer: [] for layer in names}
        with torch.no_grad():
            for ids in tqdm(windows, desc="still: teacher activations", leave=False):
                tap.run_feed(full_feed(original, ids), original.input_names)
                for layer, ns in names.items():
                    out[layer].append(tuple(tap.values.get(n) if isinstance(n, str) else None for n in ns))
        return {layer: (scales[layer], rows) for layer, rows in out.items()}

    def _transfer(self, blocks, data, params: dict[int, dict[str, torch.Tensor]]) -> dict:
        opts = self.options
        feature = FEATURES[opts.feature]
        losses = {}
        for block in blocks:
            layer = block.layer
            train = {n: t.clone().requires_grad_() for n, t in params[layer].items()}
            fmap = [train.get(n) for n in PARAMS[1:]]
            optim = torch.optim.Adam(list(train.values()), lr=opts.lr)
            sched = _cosine(optim, opts.steps)
            scale, rows = data[layer]
            history = []
            for step in tqdm(range(opts.steps), desc=f"still: layer {layer} attention transfer", leave=False):
                pick = [rows[(step * opts.batch + i) % len(rows)] for i in range(opts.batch)]
                q, k, v, mask, x, y = (torch.cat([p[j] for p in pick]) if pick[0][j] is not None else None
                                       for j in range(6))
                pred = still_reference(q, k, v, x, train["gate_w"], *fmap, mask, scale, bool(block.causal),
                                       opts.top_k, opts.chunk, feature, opts.exact_window)
                loss = F.mse_loss(pred, y) / y.pow(2).mean()
                optim.zero_grad()
                loss.backward()
                optim.step()
                sched.step()
                history.append(float(loss.detach()))
            params[layer] = {n: t.detach() for n, t in train.items()}
            losses[layer] = history
        return losses

    # -- stage 2: LoRA ------------------------------------------------------------------------
    def _lora(self, program: Program, original: Program, blocks, train) -> tuple[dict[str, torch.Tensor], list[float]]:
        """{weight name: merged delta} after ``lora_steps`` of ``lora_loss``."""
        opts = self.options
        gm, teacher = program.unlifted(), original.runner()
        names = {getattr(b, p) for b in blocks for p in ("q_proj", "k_proj", "v_proj", "o_proj") if getattr(b, p)}
        weights = {n: t for n, t in gm.named_parameters() if any(is_weight(n, m) for m in names)}
        for t in gm.parameters():
            t.requires_grad_(False)
        gen = torch.Generator().manual_seed(opts.seed + 1)
        r, alpha = opts.lora_rank, 2.0
        lora = {n: (torch.zeros(w.shape[0], r, requires_grad=True),
                    (torch.randn(r, w.shape[1], generator=gen) / math.sqrt(w.shape[1])).requires_grad_())
                for n, w in weights.items()}
        optim = torch.optim.Adam([t for ab in lora.values() for t in ab], lr=opts.lora_lr)
        sched = _cosine(optim, opts.lora_steps)
        history = []
        for step in tqdm(range(opts.lora_steps), desc="still: LoRA", leave=False):
            ids = torch.cat([train[(step * opts.batch + i) % len(train)] for i in range(opts.batch)])
            feed = full_feed(program, ids)
            over = {n: w + alpha * (lora[n][0] @ lora[n][1]) for n, w in weights.items()}
            out = torch.func.functional_call(gm, over, tuple(feed[n] for n in program.input_names))
            logits = out[0] if isinstance(out, (tuple, list)) else out
            if opts.lora_loss == "lm":
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            else:
                target = teacher(feed)["logits"]
                loss = F.kl_div(logits.log_softmax(-1).flatten(0, 1), target.log_softmax(-1).flatten(0, 1),
                                log_target=True, reduction="batchmean")
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            history.append(float(loss.detach()))
        return {n: (alpha * a @ b).detach() for n, (a, b) in lora.items()}, history

    def call(self, program: Program) -> PassResult:
        opts = self.options
        if any(STILL.matches(n) for n in program.graph.nodes):
            return PassResult(program, False, {"info": "already converted"})
        blocks, depth = self._blocks(program)
        limit = (program.seq_range or (1, None))[1] or opts.seq_len
        if len(blocks) == depth and opts.steps == 0 and opts.feature in ("npmap", "hedgehog"):
            raise UsageError("still: converting every layer without distillation (steps=0) leaves untrained feature "
                             "maps in every layer; distillation needs data (--calib) and steps > 0.")
        original = program
        train, held_out, tok = self._data(program, limit)
        rw = program.rewrite()
        params = self._rewrite(rw, blocks)
        causal_lm = program.task == "causal-lm" and "logits" in program.output_names and program.keeps_positions
        key = {"version": CACHE_VERSION, "weights": program_hash(original),
               "data": hashlib.sha256(torch.cat(train, 1).numpy().tobytes()).hexdigest() if train else None,
               "options": {k: v for k, v in opts.__dict__.items() if k not in STAGE2 + ("eval_windows",)}}
        start = time.perf_counter()
        stats: dict = {"converted_layers": [b.layer for b in blocks], "train_windows": len(train),
                       "dense_layers": [layer for layer in range(depth) if layer not in params],
                       "exact_keys_per_query": round(exact_keys(min(opts.seq_len, limit), opts.chunk, opts.top_k,
                                                                bool(blocks[0].causal), opts.exact_window), 1),
                       "dense_keys_per_query": round((min(opts.seq_len, limit) + 1) / 2, 1)}

        def stage1():
            losses = {}
            if opts.steps and opts.feature != "none" and train:
                losses = self._transfer(blocks, self._collect(original, blocks, train), params)
            return {"params": {f"{layer}.{n}": t for layer, ps in params.items() for n, t in ps.items()},
                    "losses": {str(layer): h for layer, h in losses.items()}}

        first, hit1 = cached_tensors("still", {**key, "stage": 1}, stage1)
        for layer, ns in params.items():
            for n in ns:
                rw.set_tensor(f"tokopt_still{layer}_{n}", first["params"][f"{layer}.{n}"])
        program = rw.commit("still")
        report = {"stage1": {layer: {"loss_first": round(h[0], 4), "loss_last": round(sum(h[-10:]) / len(h[-10:]), 4)}
                             for layer, h in first["losses"].items()}}
        stats["cached"] = hit1
        if held_out and causal_lm:
            stats["perplexity_original"] = perplexity(original, held_out)
            stats["perplexity_stage1"] = perplexity(program, held_out)
        if opts.lora_steps and causal_lm and train:
            second, hit2 = cached_tensors("still", {**key, "stage": 2, **{k: getattr(opts, k) for k in STAGE2}},
                                          lambda: dict(zip(("deltas", "losses"), self._lora(program, original, blocks, train))))
            state = program.ep.state_dict
            merged = program.with_tensors({n: state[n] + d for n, d in second["deltas"].items()}, "still: LoRA")
            h = second["losses"]
            report["stage2"] = {"loss_first": round(h[0], 4), "loss_last": round(sum(h[-10:]) / len(h[-10:]), 4),
                                "rank": opts.lora_rank, "weights": sorted(second["deltas"])}
            stats["cached"] = hit1 and hit2
            pays = True
            if held_out:
                stats["perplexity_stage2"] = perplexity(merged, held_out)
                pays = stats["perplexity_stage2"] < stats["perplexity_stage1"]
            report["stage2"]["kept"] = pays
            if pays:
                program = merged
            else:
                stats["info"] = "stage 2 (LoRA) did not lower held-out perplexity; the stage-1 weights ship"
        if held_out and causal_lm:
            stats["perplexity_still"] = stats.get("perplexity_stage2") if report.get("stage2", {}).get("kept") \
                else stats["perplexity_stage1"]
            stats["eval_tokens"] = sum(w.shape[1] for w in held_out)
            if tok is not None:  # far context: a number planted early, asked for at the end
                stats.update(passkey_stats({"original": original, "still": program}, tok, held_out))
        stats["train_seconds"] = round(time.perf_counter() - start, 1)
        stats["stages"] = report
        program.artifacts["still.json"] = {"options": opts.__dict__, **stats}
        return PassResult(program, True, stats)

    def ensures(self, program: Program, stats: dict) -> None:
        converted = {b.layer for b in program.attention if b.spelling == "still_attention"}
        missing = sorted(set(stats.get("converted_layers", ())) - converted)
        if missing:
            raise PassError(f"still converted layers {missing}, but the index finds no still_attention there")
