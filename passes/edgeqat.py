"""edgeqat: EdgeQAT — W4 weights, token-importance-aware A8/A4 activations, trained on the CPU.

    tokopt compile MODEL --passes edgeqat[:steps=200,a_bits=8,low_bits=4,low_fraction=0.5] --calib text.txt

1. Insert quantizers (``optimizer/ops/quantizers.py``) into the exported graph, as EdgeQAT places them
   in each layer l: the inputs of every linear except the output projection (attention input,
   MLP input, MLP intermediate), q and k as the attention reads them (after RoPE) and v, which
   is what the KV cache holds. Every body linear's weight gets a per-tensor W4 quantizer. After
   layer l's quantized q and k, ``low_tokens`` marks the ``low_fraction`` of tokens whose
   queries give the first token the lowest logit; those tokens use ``low_bits`` in layer l's v,
   MLP input and intermediate, and in layer l+1's attention input, q and k (layer 0 reads at
   ``a_bits``). Activation scales are per token by default (``scales=token``: ``max|x_t| / Qp``
   at run time, per token and head for q/k/v), as the issue asks of the lowering;
   ``scales=static`` is EdgeQAT's learned per-tensor scale and zero point (LSQ, starting at
   ``2 mean|x| / sqrt(Qp)`` on one calibration batch).
2. Train (quantization-aware, every parameter and quantizer scale/zero point) on ``--calib``
   windows of ``seq_len`` tokens for ``steps`` steps, deterministic (seed, fixed data order):
   ``alpha CE + (1 - alpha) T^2 KL(teacher || student) + lambda_attn (1 - cos(S_student, S_teacher))
   + lambda_ent * -log sum(log(1 + Var q) + log(1 + Var k))`` with the full-precision graph as
   teacher and S the pre-softmax attention logits. (EdgeQAT's code adds ``log sum cos``, which
   lowers the similarity; ALGORITHMS.md flags it as a sign slip: here the similarity is raised.)
3. Lower: weights become ``tokopt::matmul_nbits`` (MatMulNBits, the learned per-tensor scale in
   every block), activations QDQ pairs (per-row scales over the flattened tokens, or the learned
   scalars) with a per-token ``Where`` between the two widths.

Not done as EdgeQAT does: the softmax probabilities are not quantized (they live inside the
fused attention op); the teachers are the model itself, not an ensemble; and the token split
ranks a whole prefill, so a token's width depends on the tokens after it (as in EdgeQAT's
training). Causal LMs only, without --generate (a one-token decode step has no split).
``low_fraction=0`` gives the uniform baseline (every token at ``a_bits``); ``steps=0`` is
post-training quantization with the initial scales.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..calibration.lm_eval import full_feed, perplexity
from ..optimizer.data import token_source, token_windows
from ..optimizer.errors import PassError, UsageError
from ..optimizer.ops import ACT_QUANT, LOW_TOKENS, MATMUL_NBITS, TOKEN_QUANT, WEIGHT_QUANT, Tap, attention_spec
from ..optimizer.ops.nbits import pack
from ..optimizer.ops.quantizers import qrange
from ..optimizer.pass_manager import (CANONICAL_ATTENTION, EVERY_POSITION, FLOAT_WEIGHTS, Pass, PassResult, opt,
                                      register_pass)
from ..optimizer.program import Program, Rewrite, call_function_nodes, inherit_meta
from .linears import is_weight, layer_of_linears, linear_layers, replace_linear

__all__ = ["EdgeQATPass", "EdgeQATOptions"]

aten = torch.ops.aten
BLOCK = 32  # MatMulNBits block carrying the per-tensor scale


@dataclass(frozen=True)
class EdgeQATOptions:
    w_bits: int = opt(4, "weight bits", "4|8")
    a_bits: int = opt(8, "activation bits of the important tokens", "low_bits .. 8")
    low_bits: int = opt(4, "activation bits of the low-importance tokens", "2 .. a_bits")
    low_fraction: float = opt(0.5, "fraction of tokens at low_bits", "[0, 1)")
    scales: str = opt("token", "dynamic per-token scales, or learned per tensor (EdgeQAT's LSQ)", "token|static")
    steps: int = opt(200, "QAT steps", ">= 0; 0: post-training quantization")
    batch: int = opt(4, "windows per step", ">= 1")
    seq_len: int = opt(128, "tokens per window", ">= 8")
    lr: float = opt(2e-5, "learning rate of the weights", "> 0")
    lr_quant: float = opt(1e-3, "learning rate of the scales and zero points", "> 0")
    alpha: float = opt(0.5, "weight of the next-token loss against distillation", "[0, 1]")
    temperature: float = opt(2.0, "distillation temperature", "> 0")
    lambda_attn: float = opt(1.0, "weight of the attention-map loss", "float")
    lambda_ent: float = opt(0.5, "weight of the q/k entropy term", "float")
    eval_windows: int = opt(16, "held-out windows (the end of the data) for perplexity", ">= 0")
    seed: int = opt(0, "random seed", "int")

    def __post_init__(self):
        if self.w_bits not in (4, 8):
            raise ValueError(f"w_bits={self.w_bits} is not supported: use 4 or 8 (MatMulNBits)")
        if not 2 <= self.low_bits <= self.a_bits <= 8:
            raise ValueError(f"activation widths must satisfy 2 <= low_bits <= a_bits <= 8 (got a_bits="
                             f"{self.a_bits}, low_bits={self.low_bits}): QDQ runs them as int8")
        if self.scales not in ("token", "static"):
            raise ValueError(f"scales={self.scales!r}: use token (dynamic per-token) or static (learned per tensor)")
        if not 0 <= self.low_fraction < 1:
            raise ValueError(f"low_fraction={self.low_fraction} must be in [0, 1)")
        if self.steps < 0 or self.batch < 1 or self.seq_len < 8 or self.lr <= 0 or self.lr_quant <= 0:
            raise ValueError("steps must be >= 0, batch >= 1, seq_len >= 8 and the learning rates positive")
        if not 0 <= self.alpha <= 1 or self.temperature <= 0:
            raise ValueError("alpha must be in [0, 1] and temperature positive")


def _attention_qk(tap: Tap, gm) -> list[tuple]:
    """(q, k, scale) of every attention op the tap's last run went through, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.name in tap.args:
            a = attention_spec(node).attention(tap.args[node.name])
            out.append((a.q, a.k, a.scale))
    return out


def _attention_names(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if attention_spec(n) is not None]


def _attn_logits(q, k, scale):
    g = q.shape[1] // k.shape[1]
    return (q @ k.repeat_interleave(g, 1).transpose(-2, -1)) * scale


def _init_scale(x: torch.Tensor, bits: int, signed: bool) -> float:
    return float(2 * x.detach().abs().mean() / math.sqrt(qrange(bits, signed)[1])) or 1e-3


@register_pass
class EdgeQATPass(Pass):
    name = "edgeqat"
    Options = EdgeQATOptions
    requires = (CANONICAL_ATTENTION, FLOAT_WEIGHTS, EVERY_POSITION)
    quantizes_weights = True
    trains_weights = True
    needs_positions = True
    on_generate = ("its per-token widths rank the tokens of a whole prefill, which a one-token decode step does "
                   "not have. Compile with --no-generate.")
    summary = "EdgeQAT: W4 weights, per-token A8/A4 activations by attention importance, QAT with distillation"

    def _data(self, program: Program):
        opts = self.options
        source, tok = token_source(program, "edgeqat", "edgeqat trains on data: give --calib ids.npy, or a model folder with a "
                                            "tokenizer and --calib text.")
        windows = token_windows(source, tok, seq_len=opts.seq_len)
        if len(windows) < opts.eval_windows + opts.batch:
            raise UsageError(f"edgeqat: {source} holds {len(windows)} windows of {opts.seq_len} tokens; training "
                             f"needs at least {opts.batch} besides the {opts.eval_windows} held out. Give more text.")
        train = windows[:len(windows) - opts.eval_windows]
        return train, windows[len(windows) - opts.eval_windows:]

    # -- 1. quantizers -----------------------------------------------------------------------
    def _insert(self, rw: Rewrite, sample: dict) -> dict:
        opts = self.options
        g = rw.graph
        body, _ = linear_layers(rw)
        layer_of = layer_of_linears(rw, body)
        blocks = {b.node: b for b in rw.attention}
        o_proj = {b.o_proj for b in rw.attention if b.o_proj}
        qkv = {n for b in rw.attention for n in (b.q_proj, b.k_proj, b.v_proj) if n}

        def named(lin, names):
            return any(is_weight(rw.weight_name(lin.args[1]), n) for n in names)

        # (node to quantize, token dim, layer whose split applies (None: all at a_bits))
        points = {}
        for lin in body:
            if named(lin, o_proj):
                continue
            layer = layer_of[lin.name]
            points.setdefault(lin.args[0], (1, layer - 1 if named(lin, qkv) else layer))
        attn = [n for n in call_function_nodes(g) if n.name in blocks]
        for node in attn:
            layer = blocks[node.name].layer
            a = attention_spec(node).attention(node.args)
            for src, lay in ((a.q, layer - 1), (a.k, layer - 1), (a.v, layer)):
                points.setdefault(src, (2, lay))
        values = {}
        if opts.scales == "static":  # initial scales from one batch
            tap = Tap(rw.module(), values=[n.name for n in points])
            with torch.no_grad():
                tap.run_feed(sample, rw.input_names)
            values = tap.values
        low_of: dict[int, torch.fx.Node] = {}
        quantized: dict = {}
        count = 0

        def quantize(src, token_dim, layer, before=None):
            nonlocal count
            if src in quantized:
                return quantized[src]
            if opts.scales == "token":
                target, args = TOKEN_QUANT.overload, (src, low_of.get(layer), opts.a_bits, opts.low_bits, token_dim)
            else:
                x = values[src.name]
                signed = bool(x.min() < -1e-5)
                consts = [rw.constant(f"eq_{src.name}_{k}", torch.tensor([v], dtype=torch.float32))
                          for k, v in (("s_hi", _init_scale(x, opts.a_bits, signed)), ("z_hi", 0.0),
                                       ("s_lo", _init_scale(x, opts.low_bits, signed)), ("z_lo", 0.0))]
                target = ACT_QUANT.overload
                args = (src, low_of.get(layer), *consts, opts.a_bits, opts.low_bits, signed, token_dim)
            users = list(src.users)
            with g.inserting_after(src) if before is None else g.inserting_before(before):
                new = g.call_function(target, args)
            inherit_meta(new, src)
            for u in users:
                u.replace_input_with(src, new)
            quantized[src] = new
            count += 1
            return new

        for node in list(g.nodes):  # graph order: a layer's split exists before the next layer reads it
            if node.name in blocks:
                layer = blocks[node.name].layer
                a = attention_spec(node).attention(node.args)
                q = quantize(a.q, 2, layer - 1)
                k = quantize(a.k, 2, layer - 1)
                if opts.low_fraction > 0:
                    with g.inserting_before(node):
                        low_of[layer] = g.call_function(LOW_TOKENS.overload, (q, k, a.scale, opts.low_fraction))
                quantize(a.v, 2, layer, before=node)  # after the split it reads
            elif node.op == "call_function" and node.target == aten.linear.default and node in body \
                    and node.args[0] in points:
                token_dim, layer = points[node.args[0]]
                quantize(node.args[0], token_dim, layer)
        weights = 0
        for lin in body:
            w = rw.tensor(lin.args[1])
            s = rw.constant(f"eq_{lin.name}_s_w", torch.tensor([_init_scale(w, opts.w_bits, True)]))
            with g.inserting_before(lin):
                wq = g.call_function(WEIGHT_QUANT.overload, (lin.args[1], s, opts.w_bits))
            lin.replace_input_with(lin.args[1], wq)
            weights += 1
        return {"activation_quantizers": count, "weight_quantizers": weights, "token_splits": len(low_of)}

    # -- 2. training -------------------------------------------------------------------------
    def _train(self, rw: Rewrite, teacher: Program, train: list[torch.Tensor]) -> dict:
        """QAT on the module being rewritten: its weights and the quantizers' scales train in place."""
        opts = self.options
        torch.manual_seed(opts.seed)
        gm = rw.module()
        quant_params, weights = [], []
        # fresh tensors: the module's parameters are the very objects the input program (and
        # the teacher) hold; the quantizers' constants are buffers until now
        trainable = [(n, t) for n, t in gm.named_parameters()] + \
            [(n, t) for n, t in gm.named_buffers() if n.rpartition(".")[2].startswith("tokopt_eq_")]
        for name, t in trainable:
            prefix, _, short = name.rpartition(".")
            mod = gm.get_submodule(prefix) if prefix else gm
            delattr(mod, short)
            p = torch.nn.Parameter(t.detach().clone(), requires_grad=t.is_floating_point())
            mod.register_parameter(short, p)
            (quant_params if short.startswith("tokopt_eq_") else weights).append(p)
        optim = torch.optim.AdamW([{"params": weights, "lr": opts.lr}, {"params": quant_params, "lr": opts.lr_quant}],
                                  weight_decay=0.0)
        warm = max(1, opts.steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warm) * 0.5 *
                                                  (1 + math.cos(math.pi * min(s, opts.steps) / max(opts.steps, 1))))
        teacher_gm = teacher.unlifted()
        student, tutor = Tap(gm, args=_attention_names(gm)), Tap(teacher_gm, args=_attention_names(teacher_gm))
        losses, start = [], time.perf_counter()
        names = rw.input_names
        for step in tqdm(range(opts.steps), desc="edgeqat: training", leave=False):
            ids = torch.cat([train[(step * opts.batch + i) % len(train)] for i in range(opts.batch)])
            feed = full_feed(teacher, ids)
            with torch.no_grad():
                t_logits = tutor.run_feed(feed, names)[0]
            s_logits = student.run_feed(feed, names)[0]
            ce = F.cross_entropy(s_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            temp = opts.temperature
            kd = F.kl_div(F.log_softmax(s_logits / temp, -1), F.log_softmax(t_logits / temp, -1), log_target=True,
                          reduction="batchmean") * temp ** 2 / ids.shape[1]
            cos = ent = torch.zeros(())
            s_qk, t_qk = _attention_qk(student, gm), _attention_qk(tutor, teacher_gm)
            for (qs, ks, scale), (qt, kt, _) in zip(s_qk, t_qk):
                ss, st = _attn_logits(qs, ks, scale).flatten(2), _attn_logits(qt, kt, scale).flatten(2)
                cos = cos + F.cosine_similarity(ss, st, dim=-1).mean()
                ent = ent + torch.log1p(qs.var(-1)).mean() + torch.log1p(ks.var(-1)).mean()
            layers = len(s_qk)
            loss = opts.alpha * ce + (1 - opts.alpha) * kd + opts.lambda_attn * (1 - cos / layers) \
                - opts.lambda_ent * torch.log(ent.clamp_min(1e-6))
            optim.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights + quant_params, 1.0)
            optim.step()
            sched.step()
            losses.append(float(loss.detach()))
        return {"train_steps": opts.steps, "train_seconds": round(time.perf_counter() - start, 1),
                "loss_first": losses[0] if losses else None, "loss_last": sum(losses[-10:]) / len(losses[-10:])
                if losses else None}

    # -- 3. lowering -------------------------------------------------------------------------
    def _lower_weights(self, rw: Rewrite) -> int:
        g, count = rw.graph, 0
        for wq in [n for n in call_function_nodes(g) if WEIGHT_QUANT.matches(n)]:
            w_node, s_node, bits = wq.args
            w, s = rw.tensor(w_node).detach().float(), float(rw.tensor(s_node).detach().abs().clamp_min(1e-8))
            qn, qp = qrange(bits, True)
            codes = (torch.clamp(torch.round(w / s), qn, qp) - qn).to(torch.uint8)
            n, k = codes.shape
            packed = rw.constant(f"{wq.name}_qweight", pack(codes, bits, BLOCK))
            scales = rw.constant(f"{wq.name}_scales", torch.full((n, -(-k // BLOCK)), s))
            for lin in list(wq.users):
                replace_linear(rw, lin, packed, scales, bits, BLOCK, k, n)
                count += 1
            g.erase_node(wq)
        return count

    def call(self, program: Program) -> PassResult:
        opts = self.options
        if any(ACT_QUANT.matches(n) or TOKEN_QUANT.matches(n) for n in program.graph.nodes):
            return PassResult(program, False, {"info": "already quantized"})
        if program.task != "causal-lm" or "logits" not in program.output_names:
            raise UsageError(f"edgeqat trains causal language models (next-token loss and distillation on logits); "
                             f"this graph is '{program.task}'. Use rsq for weight-only quantization.")
        if program.cache is not None:
            raise UsageError("edgeqat does not support --generate graphs yet: its per-token widths rank the "
                             "tokens of a whole prefill, which a one-token decode step does not have.")
        if not program.attention:
            program.attention_blocks("edgeqat")  # raises, saying why none was recognised
        train, held_out = self._data(program)
        teacher = program
        sample = full_feed(program, torch.cat(train[:opts.batch]))
        rw = program.rewrite()
        stats = self._insert(rw, sample)
        ptq = perplexity(program, held_out, run=rw.runner()) if held_out and opts.steps else None
        stats.update(self._train(rw, teacher, train))
        stats["matmul_nbits"] = self._lower_weights(rw)
        out = rw.commit("edgeqat")
        stats["average_activation_bits"] = opts.a_bits - opts.low_fraction * (opts.a_bits - opts.low_bits)
        if held_out:
            stats.update({"perplexity_fp32": perplexity(teacher, held_out), "perplexity_edgeqat": perplexity(out, held_out),
                          "eval_tokens": sum(w.shape[1] for w in held_out)})
            if ptq is not None:
                stats["perplexity_before_training"] = ptq
        return PassResult(out, True, stats)

    def ensures(self, program: Program, stats: dict) -> None:
        if not any(ACT_QUANT.matches(n) or TOKEN_QUANT.matches(n) for n in program.graph.nodes) \
                or not program.count(MATMUL_NBITS.overload):
            raise PassError("edgeqat left no activation quantizers or no packed weights in the graph")
        if any(WEIGHT_QUANT.matches(n) for n in program.graph.nodes):
            raise PassError("edgeqat left weight fake-quantizers in the graph")
