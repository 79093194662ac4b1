"""rsq: RSQ — rotate, scale by token importance, then GPTQ — lowered to packed low-bit matmuls.

    tokopt compile MODEL --passes rsq[:bits=4,group_size=32,samples=32] --calib text.txt

1. Rotate (``passes/rotation.py``): norm weights folded, residual stream / heads / MLP output
   input rotated by Hadamards; the graph computes the same function (checked on the probe).
   ``rotate=auto`` skips graphs that are not rotation-invariant (LayerNorm / post-norm models)
   and says why; ``rotate=on`` makes that an error.
2. Scale: per-token importance from attention concentration (AttnCon): the attention each token
   receives at its layer, summed over heads and queries, min-max scaled to [min_value,
   max_value] and normalised to mean 1 over the sequence.
3. Quantize (``calibration/gptq.py``): layer by layer, each group of linears that read the same
   input ([q, k, v], [o], [gate, up], [down]) gets the Hessian ``H = X^T diag(w) X`` of its inputs
   as the already-quantized graph computes them, then GPTQ (or round-to-nearest, ``solver=rtn``).
   Only one group's inputs are held at a time.

Output: every quantized linear becomes ``tokopt::matmul_nbits`` (ONNX Runtime ``MatMulNBits``;
standard blocked ``DequantizeLinear`` + ``MatMul`` for TensorRT). With ``embed_bits=8`` the
embedding tables become ``tokopt::embedding_q8`` and the heads after the last layer (LM head,
pooler), which GPTQ leaves alone as RSQ does, are rounded to 8 bits (``head_bits=4``: 4, as
onnxruntime-genai's int4 models round their LM head; faster, coarser). The bundle gets
``quant_log.csv``: per linear, the importance-weighted relative output error on the calibration
data and the time taken. ``rotate=off,importance=none`` is plain GPTQ; add ``solver=rtn`` for
round-to-nearest: the baselines, through the same lowering.

``compute=int8`` sets MatMulNBits' ``accuracy_level=4``: ONNX Runtime rounds each block of
activations to int8 and runs its integer kernels (the reference does the same rounding), trading
a little accuracy for CPU speed (at one token per step, float activations make MatMulNBits slower
than a float MatMul on this CPU); ``compute=float`` keeps float activations. ``compute=auto``
(the default) measures both on held-out calibration windows and takes int8 when its outputs stay
within ``int8_budget`` of float compute: the KL divergence of the next-token distributions for a
language model, 1 - cosine of the first output otherwise; the report gives the measurement.

``act_bits=8`` (with ``bits=8``) is W8A8: weights int8 per output channel (GPTQ over whole rows),
and each body linear's input quantized to uint8 with one scale and zero point per tensor,
calibrated on the same windows through the quantized graph (``act_range=mse``: the clipping of
the observed range with the least squared error; ``minmax``: the range itself). The linears
become ``tokopt::linear_w8a8`` (a QDQ pattern ONNX Runtime runs as ``MatMulIntegerToFloat`` and
OpenVINO as ``FakeQuantize`` + an int8 GEMM).

``outlier_tokens=K`` makes W8A8's activations token-adaptive (EdgeQAT's point that tokens differ
in the precision they need, with magnitude as the measure): each input's grid is calibrated
without the K tokens of largest magnitude per window (CLS, separators, punctuation carry
activations several times the others'), so they no longer widen every other token's grid; at run
time each token is divided by how far it reaches past that grid (``row_factors``: 1 for a token
inside it), quantized, and the GEMM's output row multiplied back: a per-token scale of factor x
grid, on the same integer GEMM, for however many tokens need it. Applied to an input only where
the calibrated range of all tokens is at least ``OUTLIER_SPREAD`` (3) times that of the rest.
Pair it with ``smooth=0.5``: SmoothQuant at 0.8 already flattens most of what it would catch, and
the two together measured best.

Block sizes must be powers of two >= 16 (``MatMulNBits``); an input dimension that is not a
multiple is padded (the last block's missing columns are zeros). ``group_size=0`` picks 128 for
models at least 2048 wide and 32 below (RSQ's per-channel scales suit 4096-wide models; a
256-wide model loses too much).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..calibration.gptq import QuantizedWeight, quantize_gptq, quantize_rtn
from ..calibration.lm_eval import full_feed, perplexity, token_kl
from ..calibration.stats import Steps, cache_dir, cached_tensors, program_hash
from ..optimizer.data import token_source, token_windows
from ..optimizer.errors import PassError, UsageError
from ..optimizer.ops import BITS, EMBEDDING_Q8, LINEAR_W8A8, MATMUL_NBITS, TOKEN_SCORES, Tap, attention_spec
from ..optimizer.ops.int8 import outlier_rows, quantize_activation_range, row_factors, scale_rows
from ..optimizer.ops.nbits import pack, quantize_table, unpack
from ..optimizer.pass_manager import CANONICAL_ATTENTION, FLOAT_WEIGHTS, Pass, PassResult, max_abs_error, opt, \
    register_pass
from ..optimizer.program import Program, Rewrite, call_function_nodes, inherit_meta, run_paged
from ..optimizer.resources import check_disk, cpu_has_bf16, file_backed, page_out, page_out_tensor, release_heap, \
    weights_bytes
from .linears import layer_of_linears, linear_layers, replace_linear
from .rotation import NotRotatable, rotate

__all__ = ["RSQPass", "RSQOptions"]

aten = torch.ops.aten
# range(all tokens) / range(the rest) from which per-token scales pay for their two extra passes
# over the activations: the outliers cost the rest log2(3) = 1.6 bits. On MiniLM (smooth=0.5) that
# is the FFN-down inputs of layers 0-3, spreads 3.2-7.8; taking 9 inputs (spread >= 1.5) gained
# 0.0001 cosine and cost 0.4 ms at 128 tokens on OpenVINO.
OUTLIER_SPREAD = 3.0
CACHE_VERSION = 4  # part of the cache key: bump when the solver, its statistics or their layout change
# calib_dtype=auto: bf16 calibration from this size of weights on (smaller models calibrate in
# minutes, and keep the fp32 codes their measured quality was reported on)
BF16_CALIB_BYTES = 2**30
HESSIAN_ROWS = 2048   # rows of a bf16 Hessian's product at a time


@dataclass(frozen=True)
class RSQOptions:
    bits: int = opt(4, "weight bits", "|".join(map(str, BITS)))
    group_size: int = opt(0, "weights per scale along the input dimension", "a power of two >= 16; 0: 128 for "
                          "models >= 2048 wide, else 32")
    solver: str = opt("gptq", "GPTQ (error feedback on calibration inputs) or round-to-nearest", "gptq|rtn")
    importance: str = opt("attncon", "weight calibration tokens by the attention they receive (RSQ)", "attncon|none")
    rotate: str = opt("auto", "Hadamard rotations first (auto: where the graph allows)", "auto|on|off")
    online: bool = opt(True, "online rotation before each MLP output projection", "true|false")
    damp: float = opt(0.01, "GPTQ damping, a fraction of the Hessian's mean diagonal", "> 0")
    act_order: bool = opt(False, "GPTQ columns in decreasing Hessian diagonal", "true|false")
    clip: bool = opt(True, "MSE search for each block's scale", "true|false")
    min_value: float = opt(0.005, "smallest token importance", "(0, max_value]")
    max_value: float = opt(1.0, "largest token importance", ">= min_value")
    samples: int = opt(32, "calibration windows", ">= 1")
    seq_len: int = opt(512, "tokens per window (at most the context; shorter if the text is short)", ">= 16")
    expand: int = opt(1, "each window also rolled expand-1 times (RSQ's dataset expansion)", ">= 1")
    embed_bits: int = opt(8, "int8 embedding tables and output heads, or keep them float", "8|0")
    head_bits: int = opt(8, "with embed_bits=8: the output heads' bits (an LM head is the widest linear of a small "
                         "model; 4 is onnxruntime-genai's int4 default: a smaller, faster head, rounded coarser)",
                         "8|4")
    compute: str = opt("auto", "MatMulNBits on float activations, on int8-rounded ones (faster on CPUs), or "
                       "int8 where held-out outputs stay within int8_budget", "auto|float|int8")
    act_bits: int = opt(0, "activation bits of the body's linears: 0 keeps them float; 8 quantizes each linear's "
                        "input to uint8 with one scale calibrated per tensor (W8A8, the QDQ form ONNX Runtime and "
                        "OpenVINO run on integer kernels; needs bits=8, weights per channel)", "0|8")
    smooth: float = opt(0.8, "act_bits=8: SmoothQuant's alpha, moving activation outlier channels into the "
                        "weights (x/s, W s, s = max|x|^alpha / max|W|^(1-alpha), one multiply per input); 0: off",
                        "[0, 1)")
    bias_correction: bool = opt(True, "act_bits=8: correct each linear's bias by the mean shift quantization "
                                "leaves in its output on the calibration windows", "true|false")
    outlier_tokens: int = opt(0, "act_bits=8: each input's grid is calibrated without its K largest tokens, and a "
                              "token past it gets its own scale at run time (token-adaptive W8A8; pair with smooth=0.5)",
                              ">= 0; 0: off")
    act_range: str = opt("minmax", "how each activation's range is calibrated: min/max of the calibration "
                         "activations, or the clipping of it with the least squared error", "minmax|mse")
    int8_budget: float = opt(0.01, "compute=auto: how far int8 compute may move held-out outputs (KL in nats for "
                             "language models, 1 - cosine otherwise)", ">= 0")
    eval_windows: int = opt(4, "held-out windows for the reported perplexity (causal LMs)", ">= 0")
    calib_dtype: str = opt("auto", "dtype of the linears in GPTQ's calibration runs (the Hessians still add up in "
                           "fp32); auto: bf16 for models of at least 1 GiB of weights on a CPU with bf16 units "
                           "(AVX-512 BF16, AMX), fp32 otherwise", "auto|fp32|bf16")
    seed: int = opt(0, "random seed of the rotations", "int")

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits} is not supported: use one of {', '.join(map(str, BITS))} "
                             "(the widths ONNX Runtime's MatMulNBits runs)")
        if self.group_size and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise ValueError(f"group_size={self.group_size} must be a power of two >= 16 (MatMulNBits' block "
                             "sizes), or 0 for the default")
        if self.solver not in ("gptq", "rtn") or self.importance not in ("attncon", "none") \
                or self.rotate not in ("auto", "on", "off"):
            raise ValueError("solver must be gptq|rtn, importance attncon|none, rotate auto|on|off")
        if not 0 < self.min_value <= self.max_value:
            raise ValueError("importance range: need 0 < min_value <= max_value")
        if self.samples < 1 or self.seq_len < 16 or self.expand < 1 or self.damp <= 0:
            raise ValueError("samples and expand must be at least 1, seq_len at least 16, damp positive")
        if self.compute not in ("auto", "float", "int8"):
            raise ValueError(f"compute={self.compute!r}: use float (exact weight-only), int8 (ORT's int8 kernels) "
                             "or auto (int8 where held-out outputs allow)")
        if self.int8_budget < 0:
            raise ValueError(f"int8_budget={self.int8_budget} must be >= 0")
        if self.act_bits not in (0, 8) or (self.act_bits and self.bits != 8):
            raise ValueError(f"act_bits={self.act_bits}: use 0 (float activations) or 8 with bits=8 (W8A8)")
        if not 0 <= self.smooth < 1:
            raise ValueError(f"smooth={self.smooth} must be in [0, 1) (0: off)")
        if self.outlier_tokens < 0 or (self.outlier_tokens and not self.act_bits):
            raise ValueError(f"outlier_tokens={self.outlier_tokens}: use 0 (off) or K >= 1 with act_bits=8")
        if self.act_range not in ("minmax", "mse"):
            raise ValueError(f"act_range={self.act_range!r}: use minmax or mse")
        if self.calib_dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"calib_dtype={self.calib_dtype!r}: use auto, fp32 or bf16")
        if self.embed_bits not in (0, 8):
            raise ValueError(f"embed_bits={self.embed_bits}: use 8 (int8 tables and heads) or 0 (keep float)")
        if self.head_bits not in (4, 8) or (self.head_bits != 8 and not self.embed_bits):
            raise ValueError(f"head_bits={self.head_bits}: use 8 or 4, with embed_bits=8 (embed_bits=0 keeps the "
                             "heads float)")


def bf16_calibration(calib_dtype: str, weights: int) -> bool:
    """Whether GPTQ's calibration runs in bf16: asked for, or ``auto`` with ``weights`` bytes of at
    least ``BF16_CALIB_BYTES`` on a CPU with bf16 units."""
    return calib_dtype == "bf16" or (calib_dtype == "auto" and weights >= BF16_CALIB_BYTES and cpu_has_bf16())


def _importance(q, k, mask, scale, causal, lo: float, hi: float) -> torch.Tensor:
    """[B, Nk] AttnCon token weights, mean 1 over each row. The attention each token receives is
    token_prune's ``mean`` score (its mean over heads and queries is RSQ's sum up to a constant,
    which the min-max scaling removes)."""
    r = TOKEN_SCORES.reference(q, k, mask, scale, causal, "mean").double()
    rmin, rmax = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
    r = (lo + (hi - lo) * (r - rmin) / (rmax - rmin).clamp_min(1e-12)).clamp(lo, hi)
    return r / r.sum(-1, keepdim=True) * r.shape[-1]


# the windows' resume states go to disk between groups past this many bytes or this share of the
# weights, whichever is larger (a wide MLP's at 0.5B: 0.38 GiB; at 8B: 1.2 GiB of 30). Writing them is
# disk-bound (on a 1.1B-wide model, a seventh of the pass): states small next to the weights stay
SPILL_BYTES, SPILL_SHARE = 2**28, 1 / 4


def _spilled(state: tuple[str, dict] | None, folder: Path, limit: int) -> tuple[str, dict] | None:
    """A GPTQ resume state (``Tap.marked``) whose tensors, where they hold more than ``limit``
    bytes, are moved to file-backed pages and paged out: read back once, by the next group's run,
    instead of resident through this group's Hessian and solve."""
    if state is None:
        return None
    at, live = state
    tensors = [v for v in live.values() if isinstance(v, torch.Tensor)]
    if sum(t.numel() * t.element_size() for t in tensors) <= limit:
        return state
    moved = {}
    for name, v in live.items():
        if isinstance(v, torch.Tensor) and not v.requires_grad:
            v = file_backed(tuple(v.shape), folder, v.dtype).copy_(v)
            page_out_tensor(v)
        moved[name] = v
    return at, moved


def _page_out_all(weights: list) -> None:
    for t in weights:
        page_out_tensor(t)
    weights.clear()


@register_pass
class RSQPass(Pass):
    name = "rsq"
    Options = RSQOptions
    requires = (CANONICAL_ATTENTION, FLOAT_WEIGHTS)
    quantizes_weights = True
    half_weights = True
    summary = "RSQ: rotate, scale by token importance (AttnCon), GPTQ; packed int4/int8 weights (MatMulNBits)"

    # -- calibration ----------------------------------------------------------------------
    def _data(self, program: Program) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        opts = self.options
        no_data = ("act_bits quantizes activations, whose ranges come from data" if opts.act_bits else
                   "or pass solver=rtn,importance=none,rotate=off, which needs no data")
        source, tok = token_source(program, "rsq", "rsq: calibration needs token ids: give --calib ids.npy, or a model "
                                            f"folder with a tokenizer and --calib text ({no_data}).")
        limit = (program.seq_range or (1, None))[1] or opts.seq_len
        length = min(opts.seq_len, limit)
        want = opts.samples + opts.eval_windows
        windows = token_windows(source, tok, seq_len=length, count=want)
        shorter = len(windows) * length // want // 16 * 16
        if len(windows) < want and shorter >= 64:  # too little text for full windows: as many, shorter
            windows = token_windows(source, tok, seq_len=shorter, count=want)
        if len(windows) < opts.samples:
            raise UsageError(f"rsq: {source} holds {len(windows)} windows of {length} tokens; samples="
                             f"{opts.samples} were asked for. Give more text, or lower samples= or seq_len=.")
        calib = windows[:opts.samples]
        calib = [torch.roll(w, i * w.shape[1] // opts.expand, 1) for w in calib for i in range(opts.expand)]
        return calib, windows[opts.samples:]

    def _hessians(self, gm, input_names, group, k: int, block, feeds, weights_cache: dict, layer, marks: list,
                  spill: Path, spill_limit: int, bf16: bool):
        """2 X^T diag(w) X / tokens of the group's input X over the calibration feeds, each token
        weighted by its importance at the layer's attention (computed once per layer and sample),
        and the state each feed's run reached at the group's first linear (``marks``: where the
        next group's run resumes, this group's linears then computed with their quantized weights;
        layer by layer, not the whole graph again for each group). ``bf16``: the runs' linears
        in bf16 under autocast (elementwise ops promote back to fp32, so the residual stream stays
        fp32), and each window's X^T X from bf16 inputs, added to the fp32 sum."""
        attention = block.node if block is not None else None
        need = self.options.importance == "attncon" and layer is not None and attention is not None
        per_sample = weights_cache.setdefault(layer, [None] * len(feeds)) if layer is not None else None
        fresh = need and per_sample[0] is None
        x_node = group[0].args[0].name
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        stop = max([group[-1].name] + ([attention] if fresh else []), key=order.__getitem__)  # needs both
        mark = min((lin.name for lin in group), key=order.__getitem__)
        tap = Tap(gm, values=[x_node], args=[attention] if fresh else [], stop=stop, mark=mark)
        h = torch.zeros(k, k)   # float32, as GPTQ's own: float64 took twice the time
        count = 0
        for i, feed in enumerate(feeds):
            # an attention op's arguments before the resume point were not kept: run from the inputs
            resume = marks[i] if marks[i] is not None and not (fresh and order[attention] < order[marks[i][0]]) else None
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                tap.run_feed(feed, input_names, resume=resume)
            marks[i] = _spilled(tap.marked, spill, spill_limit // len(feeds))
            x = tap.values[x_node].float().reshape(-1, k)
            if need:
                if fresh:
                    spec = attention_spec(next(n for n in gm.graph.nodes if n.name == attention))
                    # importance from the scores before any soft cap (a monotone squash of them)
                    q, kk, _, mask, scale, causal = spec.attention(tap.args[attention])[:6]
                    causal = causal or bool(block.causal)  # an HF mask carries the causality while the flag stays False
                    per_sample[i] = _importance(q, kk, mask, scale, causal, self.options.min_value,
                                                self.options.max_value)
                x = x * per_sample[i].reshape(-1).sqrt().float()[:, None]
            if bf16:   # by row blocks: a bf16 product has a bf16 result, so no k x k temporary either
                xb = x.bfloat16()
                for r in range(0, k, HESSIAN_ROWS):
                    h[r:r + HESSIAN_ROWS].add_(xb[:, r:r + HESSIAN_ROWS].T @ xb)
                del xb
            else:
                h.addmm_(x.T, x)   # in place: no k x k temporary (0.8 GB for a 14336-wide input)
            count += x.shape[0]
            del x
            release_heap()   # each window's freed activations, which malloc would keep resident to the next
        return h.mul_(2).div_(max(count, 1))

    def _solve(self, rw: Rewrite, body, calib, layer_of: dict, names: dict, bs: int, spill, spill_limit: int,
               bf16: bool, steps: Steps) -> dict:
        """Quantize the body group by group, each on inputs from the already-quantized graph:
        {"codes": {node: codes as MatMulNBits packs them}, "cols": {node: columns}, "scales": {node: scales},
        "rows": the log, "resumed": groups}.
        Each group's result is saved to ``steps`` as it ends; the groups of whole layers an
        interrupted run finished are loaded instead (a layer's importance is measured at its
        first group, before its own linears are quantized, so a run resumes at a layer's start)."""
        opts = self.options
        program = rw.program
        feeds = [full_feed(program, w) for w in calib]
        attention_of = {b.layer: b for b in rw.attention}
        groups: dict = {}
        for n in body:
            groups.setdefault(n.args[0], []).append(n)
        groups = list(groups.values())
        layers = [layer_of.get(g[0].name) for g in groups]
        done = []
        while len(done) < len(groups) and (step := steps.load(len(done))) is not None:
            done.append(step)
        while 0 < len(done) < len(groups) and layers[len(done)] is not None \
                and layers[len(done)] == layers[len(done) - 1]:
            done.pop()
        gm = rw.module()
        out = {"codes": {}, "cols": {}, "scales": {}, "rows": [], "resumed": len(done), "groups": len(groups)}
        weights_cache, marks, read_again = {}, [None] * len(feeds), []
        with tqdm(total=len(groups), initial=len(done), desc="rsq: quantizing", leave=False,
                  disable=not feeds) as bar:
            for i, group in enumerate(groups):
                layer = layer_of.get(group[0].name)
                start = time.perf_counter()
                if i < len(done):   # finished by an interrupted run
                    result = done[i]
                    for lin in group:
                        self._keep(rw, lin, self._restored(result, lin.name, bs), feeds, spill, read_again)
                    _page_out_all(read_again)   # not read before the first group this run computes
                else:
                    h = None
                    if opts.solver == "gptq" and feeds:
                        k = rw.tensor(group[0].args[1]).shape[1]
                        h = self._hessians(gm, rw.input_names, group, k, attention_of.get(layer), feeds, weights_cache,
                                           layer, marks, spill, spill_limit, bf16)
                    _page_out_all(read_again)   # the previous group's new weights, which this group's run read back in
                    result = {"codes": {}, "cols": {}, "scales": {}, "rows": []}
                    for lin in group:
                        w = rw.tensor(lin.args[1]).detach().float()
                        name = names.get(lin.name, lin.name)
                        qw = self._quantize(w, h, opts.bits, w.shape[1] if opts.act_bits else bs, name)
                        deq = self._keep(rw, lin, qw, feeds, spill, read_again)
                        # MatMulNBits' bytes (4-bit codes two a byte): an 8B model's codes are 7 GB a byte,
                        # written twice (the saved steps, then the whole result)
                        result["codes"][lin.name] = pack(qw.codes, qw.bits, qw.block_size)
                        result["scales"][lin.name] = qw.scales
                        result["cols"][lin.name] = qw.codes.shape[1]
                        result["rows"].append(self._log_row(name, layer, w, deq, h, qw, time.perf_counter() - start))
                    steps.save(i, result)
                    bar.update()
                out["rows"] += result["rows"]
                out["codes"].update(result["codes"])
                out["cols"].update(result["cols"])
                out["scales"].update(result["scales"])
                release_heap()   # each weight replaced by a new one and Hessians freed: no holes kept
        return out

    def _restored(self, result: dict, name: str, bs: int, release: bool = False) -> QuantizedWeight:
        """Linear ``name``'s quantized weight from a solve's (or a saved step's) codes and scales;
        ``release``: its codes leave ``result``."""
        k = result["cols"][name]
        codes = unpack(result["codes"].pop(name) if release else result["codes"][name], self.options.bits)[:, :k]
        return QuantizedWeight(codes, result["scales"][name], self.options.bits, k if self.options.act_bits else bs)

    @staticmethod
    def _keep(rw: Rewrite, lin, qw: QuantizedWeight, feeds, spill, read_again: list) -> torch.Tensor:
        """Replace ``lin``'s weight by its dequantized value, which later groups calibrate on."""
        deq = qw.dequantize()
        if feeds:   # in the weight's dtype: a half-precision model's stay half
            mapped = file_backed(deq.shape, spill, rw.tensor(lin.args[1]).dtype)
            rw.set_tensor(rw.weight_name(lin.args[1]), mapped.copy_(deq))
            read_again.append(mapped)
        return deq

    def _quantize(self, w: torch.Tensor, h: torch.Tensor | None, bits: int, bs: int, name: str) -> QuantizedWeight:
        opts = self.options
        if h is None or opts.solver == "rtn":
            return quantize_rtn(w, bits, bs, clip=opts.clip)
        return quantize_gptq(w, h, bits, bs, damp=opts.damp, act_order=opts.act_order, clip=opts.clip, name=name)

    # -- the pass -------------------------------------------------------------------------
    def weight_share(self) -> float:
        return (self.options.bits + 1) / 32   # the codes, and a scale a block

    def for_standard_onnx(self, target: str) -> tuple[Pass, str | None]:
        if self.options.compute == "int8":
            raise UsageError(f"rsq:compute=int8 runs MatMulNBits on int8 activations (accuracy_level 4), an ONNX "
                             f"Runtime contrib kernel, and target '{target}' parses standard ONNX only. Use "
                             "compute=float (the low-bit weights dequantized in the graph), or bits=8,act_bits=8 "
                             "(QDQ int8, which TensorRT runs on its integer kernels).")
        if self.options.compute == "auto" and not self.options.act_bits:
            return (type(self)(dataclasses.replace(self.options, compute="float")),
                    f"rsq: compute=auto is float for target '{target}' (int8 compute is an ONNX Runtime contrib kernel)")
        return self, None

    def call(self, program: Program) -> PassResult:
        opts = self.options
        if program.count(MATMUL_NBITS.overload) or any(EMBEDDING_Q8.matches(n) for n in program.graph.nodes):
            return PassResult(program, False, {"info": "already quantized"})
        stats: dict = {"bits": opts.bits, "solver": opts.solver, "importance": opts.importance}
        rw = program.rewrite()
        first = linear_layers(rw)[0]
        names = {n.name: rw.weight_name(n.args[1]) for n in first}  # the model's names, before rotation renames them
        layer_of = layer_of_linears(rw, first)
        # the cache key hashes the weights before rotation: the rotated ones carry BLAS rounding
        # that varies with memory alignment from run to run
        model_hash = program_hash(program)
        needs_data = opts.solver == "gptq" or opts.importance == "attncon" or opts.act_bits
        calib, held_out = self._data(program) if needs_data else ([], [])   # no data: refused before any work
        evaluate = held_out and program.keeps_positions and program.task == "causal-lm" and program.cache is None
        if evaluate:   # first, while the original weights are in memory: the rotation pages them out
            stats["perplexity_fp32"] = perplexity(program, held_out)
        # new weights (rotated, then dequantized) are mapped from files, so they leave memory as the
        # checkpoint's do: what stays resident is the layer being calibrated, not the model twice
        spill = cache_dir() / "spill"
        # new weights in fp32 (a half-precision model's too), and codes twice (the steps as they end, then
        # the whole result: half a byte per 4-bit weight, a byte per other one)
        weights = weights_bytes(program, as_fp32=True)
        bf16 = bf16_calibration(opts.calib_dtype, weights)
        if opts.solver == "gptq" and calib:
            stats["calib_dtype"] = "bf16" if bf16 else "fp32"
        check_disk(spill, weights + weights * (1 if opts.bits == 4 else 2) // 4 + 2**28,
                   "rsq's new weights (mapped from disk to leave memory) and its saved steps",
                   "set TOKOPT_CACHE_DIR to a folder on a larger disk")
        stats["rotation"] = self._rotate(program, rw, spill)
        page_out(program)
        body, heads = linear_layers(rw)
        if not body:
            raise UsageError(f"rsq found no linear layers with constant weights before the output "
                             f"head{'s' if len(heads) != 1 else ''} ({len(heads)}, which GPTQ leaves alone): "
                             "nothing to quantize. rsq is for transformer bodies.")
        width = max(rw.tensor(n.args[1]).shape[1] for n in body)
        bs = opts.group_size or (128 if width >= 2048 else 32)
        stats["group_size"] = bs
        if opts.act_bits and opts.smooth:
            stats["smoothed"] = self._smooth(rw, body, calib)
        floats = {lin: rw.tensor(lin.args[1]).detach().to(torch.float32, copy=True) for lin in body} if opts.act_bits else {}
        key = {"version": CACHE_VERSION, "weights": model_hash, "options": {
            k: v for k, v in dataclasses.asdict(opts).items()
            if k not in ("eval_windows", "compute", "int8_budget", "embed_bits", "head_bits", "calib_dtype")},
            "group_size": bs, "bf16": bf16,
            "data": [hashlib.sha256(torch.cat(calib, 1).numpy().tobytes()).hexdigest()] if calib else None}
        spill_limit = max(SPILL_BYTES, int(weights * SPILL_SHARE))
        result, hit = cached_tensors("rsq", key, lambda steps: self._solve(rw, body, calib, layer_of, names, bs,
                                                                           spill, spill_limit, bf16, steps),
                                     steps=True)
        stats["cached"] = hit
        if result.get("resumed") and not hit:
            stats["resumed"] = f"{result['resumed']} of {result['groups']} groups from an interrupted run"
        rows = result["rows"]
        by_name = {n.name: n for n in body}
        # made one at a time as the rewrite packs them (an 8B model's codes are 7 GB a byte each)
        quantized = {by_name[name]: functools.partial(self._restored, result, name, bs, release=True)
                     for name in result["codes"]}
        heads_q = {lin: quantize_rtn(rw.tensor(lin.args[1]).detach().float(), opts.head_bits, bs)
                   for lin in (heads if opts.embed_bits else [])}
        if opts.act_bits:
            quantized = {lin: restore() for lin, restore in quantized.items()}
            ranges = self._activation_ranges(rw, quantized, calib)
            stats["activations"] = {"bits": 8, "tensors": len(ranges), "range": opts.act_range}
            if opts.outlier_tokens:
                stats["activations"]["outlier_tokens"] = {"tokens": opts.outlier_tokens,
                                                          "inputs": sum(adaptive for _, adaptive in ranges.values())}
            made = self._rewrite_w8a8(rw, quantized, ranges)
            if opts.bias_correction:
                stats["bias_corrected"] = self._correct_biases(
                    rw, {out: (floats[lin], x, holder) for out, (lin, x, holder) in made.items()}, calib)
            quantized = {}
        self._rewrite(rw, {**quantized, **heads_q}, 4 if opts.compute == "int8" else 0)
        stats.update(self._rewrite_embeddings(rw, bs))
        _page_out(rw)   # the float weights just replaced, resident since calibration read them, until rw is freed
        out = rw.commit("rsq")
        if opts.compute == "auto":
            out, stats["compute"] = self._pick_compute(out, held_out)
        stats.update({"linears": len(body), "heads": len(heads) if opts.embed_bits else 0,
                      **({"head_bits": opts.head_bits} if opts.embed_bits and heads else {}),
                      "mean_relative_error": sum(r["relative_error"] for r in rows) / len(rows),
                      "calibration": f"{len(calib)} windows of {calib[0].shape[1]} tokens" if calib else "none"})
        out.artifacts["quant_log.csv"] = _csv(rows)
        if evaluate:
            stats["perplexity_quantized"] = perplexity(out, held_out)
            stats["eval_tokens"] = sum(w.shape[1] for w in held_out)
        return PassResult(out, True, stats)

    def _rotate(self, program: Program, rw: Rewrite, spill) -> dict | str:
        opts = self.options
        if opts.rotate == "off":
            return "off"
        # before: the rotation pages the original weights out as it replaces them; both runs page each
        # weight out once read, so neither holds the model (the rotated one is fp32 files)
        ref = run_paged(program.unlifted(), program.input_names, program.output_names, program.probe)
        try:
            info = rotate(rw, seed=opts.seed, online=opts.online, heads=program.cache is None, spill=spill)
        except NotRotatable as e:  # raised before the graph is touched
            if opts.rotate == "on":
                raise UsageError(f"rsq: rotate=on, but this graph cannot be rotated: {e}. Use rotate=auto "
                                 "or rotate=off.") from e
            return f"skipped: {e}"
        got = run_paged(rw.module(), rw.input_names, rw.output_names, program.probe)  # the cache layout too
        err = max_abs_error(ref, got)
        scale = max(float(v.abs().max()) for v in ref.values() if v.is_floating_point())
        if err > 1e-3 * max(scale, 1.0):
            raise PassError(f"rsq: the rotated graph does not reproduce the original (max abs error {err:.3g}); "
                            "this is a tokopt bug. Use rotate=off meanwhile.")
        return {**info, "max_abs_error": err}

    @staticmethod
    def _log_row(name, layer, w, deq, h, qw: QuantizedWeight, seconds: float) -> dict:
        d = w - deq
        if h is not None:  # importance-weighted output error on the calibration inputs
            rel = float((d @ h * d).sum() / (w @ h * w).sum().clamp_min(1e-30))
        else:
            rel = float(d.pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
        return {"weight": name, "layer": layer, "rows": w.shape[0], "cols": w.shape[1], "bits": qw.bits,
                "block_size": qw.block_size, "relative_error": max(rel, 0.0) ** 0.5, "seconds": round(seconds, 3)}

    def _pick_compute(self, out: Program, held_out: list[torch.Tensor]) -> tuple[Program, dict]:
        """compute=auto: the float-compute program, or its int8-compute twin where held-out
        outputs allow (see the module docstring)."""
        if not held_out:
            return out, {"chosen": "float", "why": "no held-out calibration windows to measure int8 compute on"}
        rw = out.edit()   # one argument of existing nodes changes: no re-export
        for node in call_function_nodes(rw.graph):
            if MATMUL_NBITS.matches(node):
                node.args = (*node.args[:8], 4)      # MatMulNBits' accuracy_level (export drops a default 0)
        fast = rw.commit("rsq: int8 compute")
        exact_run, fast_run = out.runner(), fast.runner()
        moved = []
        for ids in held_out:
            feed = full_feed(out, ids)
            a, b = exact_run(feed)[out.output_names[0]], fast_run(feed)[out.output_names[0]]
            if "logits" in out.output_names[:1]:
                moved.append(float(token_kl(a, b).mean()))
            else:
                pa, pb = (t.double().reshape(t.shape[0], -1, t.shape[-1]).mean(1) for t in (a, b))
                moved.append(float(1 - torch.nn.functional.cosine_similarity(pa, pb, dim=-1).mean()))
            del a, b   # before the next window's pair is made (a 512-token window's logits: 0.3 GB each at 152K)
        measure = "next-token KL" if "logits" in out.output_names[:1] else "1 - cosine"
        value = sum(moved) / len(moved)
        chosen = value <= self.options.int8_budget
        return (fast if chosen else out), {"chosen": "int8" if chosen else "float", measure: value,
                                           "budget": self.options.int8_budget, "windows": len(held_out)}

    def _activation_ranges(self, rw: Rewrite, quantized: dict, calib) -> dict[str, tuple]:
        """{input node name: ((scale, zero point), token-adaptive?)} of every quantized linear's
        input, observed on the calibration windows through the graph with its weights already
        quantized. With ``outlier_tokens``, where that pays, the grid leaves out the K tokens of
        largest magnitude per window and the input is marked token-adaptive."""
        for lin, qw in quantized.items():
            rw.set_tensor(rw.weight_name(lin.args[1]), qw.dequantize())
        inputs = {lin.args[0].name for lin in quantized}
        tap = Tap(rw.module(), values=inputs)
        k = self.options.outlier_tokens
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in inputs}
        rest: dict[str, list[torch.Tensor]] = {n: [] for n in inputs}
        with torch.no_grad():
            for ids in calib:
                tap.run_feed(full_feed(rw.program, ids), rw.input_names)
                for n in inputs:
                    v = tap.values[n]
                    seen[n].append(v.reshape(-1))
                    if k and v.dim() == 3 and v.shape[1] > k:  # [B, N, width]: a token axis to pick from
                        picked = torch.zeros(v.shape[:2], dtype=torch.bool).scatter_(1, outlier_rows(v, k), True)
                        rest[n].append(v[~picked].reshape(-1))
        how = self.options.act_range
        ranges = {}
        for n in inputs:
            grid, adaptive = torch.cat(seen[n]), False
            if len(rest[n]) == len(calib) and calib:
                others = torch.cat(rest[n])
                spread = float(grid.max() - grid.min()) / max(float(others.max() - others.min()), 1e-12)
                if spread >= OUTLIER_SPREAD:
                    grid, adaptive = others, True
            ranges[n] = (_range(grid, how), adaptive)
        return ranges

    def _smooth(self, rw: Rewrite, body, calib) -> int:
        """SmoothQuant: for each group of linears reading the same input x, per input channel j
        s_j = max|x_j|^a / max|W_:,j|^(1-a) over the group's weights; x -> x / s (one multiply),
        W -> W s. The same function, with the activations' outlier channels moved into weights,
        which are quantized per output channel. Returns how many inputs were smoothed."""
        groups: dict = {}
        for lin in body:
            groups.setdefault(lin.args[0], []).append(lin)
        tap = Tap(rw.module(), values=[x.name for x in groups])
        amax: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for ids in calib:
                tap.run_feed(full_feed(rw.program, ids), rw.input_names)
                for name, v in tap.values.items():
                    m = v.abs().reshape(-1, v.shape[-1]).amax(0)
                    amax[name] = m if name not in amax else torch.maximum(amax[name], m)
        a = self.options.smooth
        for x, lins in groups.items():
            wmax = torch.stack([rw.tensor(lin.args[1]).abs().amax(0) for lin in lins]).amax(0)
            scale = (amax[x.name].clamp_min(1e-5) ** a / wmax.clamp_min(1e-5) ** (1 - a)).clamp_min(1e-5)
            inverse = rw.constant(f"{x.name}_smooth", (1 / scale).float())
            with rw.graph.inserting_before(lins[0]):
                smoothed = rw.graph.call_function(aten.mul.Tensor, (x, inverse))
            for lin in lins:
                lin.replace_input_with(x, smoothed)
                rw.set_tensor(rw.weight_name(lin.args[1]), rw.tensor(lin.args[1]) * scale[None].float())
        return len(groups)

    def _correct_biases(self, rw: Rewrite, made: dict, calib) -> int:
        """Each W8A8 linear's bias += the mean, over the calibration tokens, of what its float
        weights compute minus what it computes, both on the input the quantized graph gives it
        (empirical bias correction): quantization's systematic shift, removed layer by layer.
        ``made``: {output node: (float weights, input node, (node, argument) holding the bias)}."""
        tap = Tap(rw.module(), values=[n.name for n in made] + [x.name for _, x, _ in made.values()])
        shift = {n: 0.0 for n in made}
        count = 0
        with torch.no_grad():
            for ids in calib:
                tap.run_feed(full_feed(rw.program, ids), rw.input_names)
                for n, (weight, x, (holder, i)) in made.items():
                    y = tap.values[n.name]
                    bias = rw.tensor(holder.args[i])
                    exact = tap.values[x.name] @ weight.T + (bias if bias is not None else 0)
                    shift[n] = shift[n] + (exact - y).reshape(-1, y.shape[-1]).sum(0)
                first = tap.values[next(iter(made)).name]
                count += first.reshape(-1, first.shape[-1]).shape[0]
        for n, (_, _, (holder, i)) in made.items():
            delta = (shift[n] / count).float()
            bias = rw.tensor(holder.args[i])
            holder.update_arg(i, rw.constant(f"{n.name}_bias", delta if bias is None else bias + delta))
        return len(made)

    def _rewrite_w8a8(self, rw: Rewrite, quantized: dict, ranges: dict) -> dict:
        """Each linear -> linear_w8a8 on its int8 weights and its input's calibrated scale (token-
        adaptive inputs: each token divided by its ``row_factors`` first, the output multiplied
        back, the bias added after); returns {output node: (the replaced linear, x, bias holder)}."""
        consts: dict[str, tuple] = {}
        factors: dict[str, tuple] = {}
        made = {}
        for lin, qw in quantized.items():
            x = lin.args[0]
            if x.name not in consts:
                (scale, zero), adaptive = ranges[x.name]
                consts[x.name] = (rw.constant(f"{x.name}_act_scale", torch.tensor(scale, dtype=torch.float32)),
                                  rw.constant(f"{x.name}_act_zero", torch.tensor(zero, dtype=torch.uint8)))
                if adaptive:
                    with rw.graph.inserting_after(x):
                        r = rw.graph.call_function(row_factors, (x, -zero * scale, (255 - zero) * scale))
                    with rw.graph.inserting_after(r):
                        factors[x.name] = (r, rw.graph.call_function(aten.div.Tensor, (x, r)))
            weight = (qw.codes.to(torch.int16) - 128).to(torch.int8).T.contiguous()      # [K, N]
            w = rw.constant(f"{lin.name}_w8", weight)
            ws = rw.constant(f"{lin.name}_w8_scale", qw.scales[:, 0].contiguous())
            bias = lin.args[2] if len(lin.args) > 2 else None
            with rw.graph.inserting_before(lin):
                if x.name in factors:
                    r, scaled = factors[x.name]
                    new = rw.graph.call_function(LINEAR_W8A8.overload, (scaled, w, ws, *consts[x.name], None))
                    out = rw.graph.call_function(scale_rows, (new, r, bias))
                    holder = (out, 2)
                else:
                    new = out = rw.graph.call_function(LINEAR_W8A8.overload, (x, w, ws, *consts[x.name], bias))
                    holder = (new, 5)
            for node in {new, out}:
                inherit_meta(node, lin)
            lin.replace_all_uses_with(out)
            rw.graph.erase_node(lin)
            made[out] = (lin, x, holder)
        return made

    def _rewrite(self, rw: Rewrite, quantized: dict, level: int) -> None:
        """Each linear -> matmul_nbits (``level``: MatMulNBits' accuracy_level); a weight may be
        given as the call that makes it."""
        for lin, qw in quantized.items():
            qw = qw() if callable(qw) else qw
            n, k = qw.codes.shape
            packed = rw.constant(f"{lin.name}_qweight", pack(qw.codes, qw.bits, qw.block_size))
            scales = rw.constant(f"{lin.name}_scales", qw.scales.contiguous())
            replace_linear(rw, lin, packed, scales, qw.bits, qw.block_size, k, n, level)

    def _rewrite_embeddings(self, rw: Rewrite, bs: int) -> dict:
        if not self.options.embed_bits:
            return {}
        g, count = rw.graph, 0
        for node in [n for n in call_function_nodes(g) if n.target == aten.embedding.default]:
            table = rw.tensor(node.args[0])
            if table is None or table.shape[1] % bs:
                continue
            codes, scales = quantize_table(table, bs)
            qt = rw.constant(f"{node.name}_table", codes)
            qs = rw.constant(f"{node.name}_scales", scales)
            with g.inserting_before(node):
                new = g.call_function(EMBEDDING_Q8.overload, (qt, qs, node.args[1], bs))
            inherit_meta(new, node)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            count += 1
        return {"embeddings": count}

    def ensures(self, program: Program, stats: dict) -> None:
        if not program.count(MATMUL_NBITS.overload) and not program.count(LINEAR_W8A8.overload):
            raise PassError("rsq left no quantized linear (matmul_nbits, linear_w8a8) in the graph")
        left = [n.name for n in linear_layers(program)[0]]
        if left:
            raise PassError(f"rsq left linear layers unquantized: {', '.join(left[:5])}")


def _page_out(rw: Rewrite) -> None:
    """The weights of the graph being rewritten out of memory where they are mapped from files."""
    for t in rw.module().state_dict().values():
        page_out_tensor(t)


def _range(values: torch.Tensor, how: str) -> tuple[float, int]:
    """(scale, zero point) of the uint8 grid for ``values``: their min/max, or (``mse``) the
    shrinking of it, in 1% steps down to 30%, with the least squared quantization error."""
    values = values.float()
    low, high = float(values.min()), float(values.max())
    best, best_err = quantize_activation_range(low, high), float("inf")
    if how == "minmax":
        return best
    sample = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
    for i in range(71):
        scale, zero = quantize_activation_range(low * (1 - i / 100), high * (1 - i / 100))
        q = torch.clamp(torch.round(sample / scale) + zero, 0, 255)
        err = float(((q - zero) * scale - sample).pow(2).mean())
        if err < best_err:
            best, best_err = (scale, zero), err
    return best


def _csv(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = [",".join(keys)] + [",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
                                for r in rows]
    return "\n".join(lines) + "\n"
