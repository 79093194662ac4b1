"""tca: TCA-Attention. Per-head budgets calibrated offline in one pass, core tokens chosen online.

    tokopt compile MODEL --passes tca[:tolerance=0.2,sinks=4,windows=32/64/128/256] --calib text.txt

Calibration (``calibration/stats.py``): one exact forward over ``calib_windows`` windows of
``calib_len`` tokens of ``--calib`` (default: the shipped English passages). At every attention
block it measures, for every candidate (a local window from ``windows`` and a budget from
``GRID``, a fraction of the context: 0 = sinks and window only, 1 = every key), each query
head's relative output error of the sparse attention against the exact one. A KV head gets the
cheapest candidate (keys per query at the calibration length: window + budget x length) at
which every query head sharing it stays within ``tolerance``. Budgets are context-adaptive
fractions; they are written to the bundle as ``budgets.json`` (layer, kv head, window, budget,
the query heads' errors) and cached on disk.

This simplifies TCA's calibration, whose acceptance rule is not public (see ALGORITHMS.md): a
head's candidates are uniform densities on a geometric grid, each with a choice of local window,
rather than per-block retain-count distributions; the acceptance rule is the relative output
error, the quantity TCA bounds. Letting a head trade selected keys for a wider window is what
makes the calibrated heads beat a sliding window of the same cost on local-attention models.

Rewrite: the canonical attention of every layer with a budget below 1 becomes
``tokopt::tca_attention`` (``passes/tca_op.py``); layers whose heads all need every key stay
dense and are reported. ``uniform=`` gives every head the same budget with no calibration (the
baselines: ``uniform=0`` is sinks + ``window`` only).

On a ``--generate`` graph (``compact=true``, the default) every layer's attention becomes
``tokopt::tca_cache_attention``, and the cache a call returns is compacted: per KV head the
sinks, its window and its ``ceil(budget x context)`` best-scored keys, scored by the same
observation queries that select them for attention (the prefill's evenly spaced queries, a
decode step's one query), as TCA keeps only the selected KV in decode. All heads of a layer
share one cache length, the largest head's (the others keep their next-best keys in it): the
graph's cache stays one tensor per layer. Dense layers keep everything. ``past_index_i`` /
``present_index_i`` carry each entry's context position. ``compact=false`` keeps the full cache
(each decode step selects among all of it).
"""
from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..calibration.data import token_source, token_windows
from ..calibration.lm_eval import full_feed, passkey_stats, perplexity
from ..calibration.stats import cached, cheapest_within, head_errors, weights_hash
from ..optimizer.errors import UsageError
from ..optimizer.ops import ATTENTION
from ..optimizer.pass_manager import Pass, PassResult, register_pass
from ..optimizer.program import Program, call_function_nodes, inherit_meta, remove_dead_code
from .tca_op import TCA, TCA_CACHE, compact_size, tca_reference

__all__ = ["TCAPass", "GRID"]

GRID = (0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
CALIBRATION_VERSION = 5  # part of the cache key: bump when the statistics are computed differently


@dataclass(frozen=True)
class TCAOptions:
    tolerance: float = 0.2      # max relative output error per query head at its budget
    sinks: int = 4              # first valid positions of each row, which every query keeps
    windows: tuple[int, ...] = (32, 64, 128, 256)   # local windows a head may be given
    obs: int = 16               # queries (evenly spaced) that score the keys
    uniform: float = -1.0       # -1: calibrated per head; 0..1: this budget for every head
    window: int = 64            # the local window with uniform=
    calib_len: int = 1024       # tokens per calibration window (at most the model's context)
    calib_windows: int = 4
    eval_windows: int = 2       # held-out windows after the calibration ones, for perplexity
    compact: bool = True        # --generate graphs: keep only each head's core tokens in the cache

    def __post_init__(self):
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance={self.tolerance} must be in (0, 1)")
        if self.sinks < 1 or self.window < 1 or self.obs < 1 or not self.windows or min(self.windows) < 1:
            raise ValueError("sinks, window, every value of windows, and obs must each be at least 1")
        if self.uniform != -1.0 and not 0 <= self.uniform <= 1:
            raise ValueError(f"uniform={self.uniform} must be a budget in [0, 1] (a fraction of the context), "
                             "or -1 for calibrated per-head budgets")
        if self.calib_windows < 1 or self.eval_windows < 0:
            raise ValueError("calib_windows must be at least 1 and eval_windows at least 0")


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@register_pass
class TCAPass(Pass):
    name = "tca"
    Options = TCAOptions
    requires = ("canonicalize",)
    summary = "TCA-Attention: calibrated per-head budgets, online core-token selection (sinks + window + top keys)"

    def _windows(self, program: Program, source: Path, tok, length: int) -> list[torch.Tensor]:
        opts = self.options
        windows = token_windows(source, tok, seq_len=length, count=opts.calib_windows + opts.eval_windows)
        vocab = program.cache.vocab_size if program.cache else getattr(getattr(program.module, "config", None),
                                                                        "vocab_size", None)
        top = max(int(w.max()) for w in windows)
        if vocab is not None and top >= vocab:
            raise UsageError(f"tca: the calibration data holds token id {top}, outside the model's vocabulary "
                             f"({vocab}); it was tokenised for another model. Give text, or ids from this "
                             "model's tokenizer.")
        return windows

    def configs(self) -> list[tuple[int, float]]:
        """Calibration candidates: every window with every partial budget, and dense."""
        ws = sorted(set(self.options.windows))
        return [(w, f) for w in ws for f in GRID[:-1]] + [(ws[0], 1.0)]

    def _budgets(self, program: Program, blocks, source: Path | None,
                 tok) -> tuple[dict[int, list[tuple[int, float]]], dict, dict]:
        """{layer: [(window, budget) per KV head]}, the errors behind them, and what to report."""
        opts = self.options
        layers = [b.layer for b in blocks]
        kvh = blocks[0].kv_heads  # one count for every block (checked by the caller)
        if opts.uniform >= 0:
            return ({layer: [(opts.window, opts.uniform)] * kvh for layer in layers}, {},
                    {"info": {"calibration": "none (uniform)"}})
        limit = (program.seq_range or (1, None))[1] or opts.calib_len
        length = min(opts.calib_len, limit)
        if length <= max(opts.windows) + opts.sinks:
            raise UsageError(f"tca: calibration windows of {length} tokens are not longer than sinks + the widest "
                             f"window ({opts.sinks + max(opts.windows)}): every key would be kept. Use a longer "
                             "calib_len or smaller windows.")
        windows = self._windows(program, source, tok, length)
        calib = windows[:opts.calib_windows]
        configs = self.configs()

        def candidate(q, k, v, mask, scale, causal, config):
            return tca_reference(q, k, v, mask, scale, causal, [config[1]], [config[0]], opts.sinks, opts.obs)

        key = {"version": CALIBRATION_VERSION, "weights": weights_hash(program), "data": _file_hash(source),
               "length": length, "windows": len(calib), "sinks": opts.sinks, "obs": opts.obs,
               "configs": configs, "graph": "generate" if program.cache else "forward"}
        result, hit = cached("tca", key, lambda: {"errors": {str(layer): e.tolist() for layer, e in head_errors(
            program, [full_feed(program, w) for w in calib], configs, candidate, total=len(calib)).items()}})
        errors = {int(layer): np.array(e) for layer, e in result["errors"].items()}
        costs = [min(w, length) + f * length for w, f in configs]
        chosen = cheapest_within(errors, costs, kvh, opts.tolerance)
        picks = {layer: [configs[i] for i in idx] for layer, idx in chosen.items()}
        info = {"calibration": f"{len(calib)} windows of {length} tokens of {source.name}",
                "calibration_cached": hit,
                "mean_keys_per_query": float(np.mean([costs[i] for idx in chosen.values() for i in idx])),
                "dense_keys_per_query": float(length)}
        head_errs = {layer: [errors[layer][i].reshape(kvh, -1)[h] for h, i in enumerate(idx)]
                     for layer, idx in chosen.items()}  # the chosen candidate's error, per query head
        return picks, head_errs, {"info": info, "eval": windows[opts.calib_windows:]}

    def call(self, program: Program) -> PassResult:
        opts = self.options
        blocks = program.attention_blocks("tca")
        nodes = [n for n in call_function_nodes(program.graph) if ATTENTION.matches(n)]
        if any(b.causal is None for b in blocks):
            raise UsageError("tca: the causality of some attention blocks could not be read from the graph; "
                             "see `tokopt inspect MODEL`.")
        if len({b.kv_heads for b in blocks}) != 1:
            raise UsageError("tca: the attention blocks have different KV-head counts; not supported yet.")
        original = program.copy() if opts.uniform < 0 and program.cache is None else None
        source, tok = token_source(program, "tca", "tca: calibration needs token ids: give --calib ids.npy, or a model "
                                            "folder with a tokenizer and --calib text (or pass uniform=BUDGET to "
                                            "skip calibration).") if opts.uniform < 0 else (None, None)
        budgets, errors, extra = self._budgets(program, blocks, source, tok)
        by_node = {b.node: b for b in blocks}
        sparse, dense = [], []
        layer_nodes = {}                                  # layer -> its attention node's name, for compaction
        for node in nodes:
            block = by_node.get(node.name)
            if block is None or all(f >= 1.0 for _, f in budgets[block.layer]):
                dense.append(None if block is None else block.layer)
                if block is not None:
                    layer_nodes[block.layer] = node.name
                continue
            q, k, v, mask, scale, _ = node.args
            fs = [f for _, f in budgets[block.layer]]
            ws = [w for w, _ in budgets[block.layer]]
            # the block's causality (an HF mask carries it while SDPA's flag stays False)
            with program.graph.inserting_before(node):
                new = program.graph.call_function(TCA.overload, (q, k, v, mask, scale, bool(block.causal), fs, ws,
                                                                 opts.sinks, opts.obs))
            inherit_meta(new, node)
            node.replace_all_uses_with(new)
            program.graph.erase_node(node)
            sparse.append(block.layer)
            layer_nodes[block.layer] = new.name
        program.ep.graph_module.recompile()
        compacted = {}
        if program.cache is not None and opts.compact and sparse:
            if None in dense or sorted(layer_nodes) != list(range(program.cache.layers)):
                raise UsageError("tca: compact=true needs every layer's attention recognised, so that every "
                                 "layer's cache can be compacted; pass compact=false to keep the full cache.")
            dense_cfg = [(min(opts.windows), 1.0)]
            full = {layer: budgets.get(layer, dense_cfg * program.cache.kv_heads[layer]) for layer in layer_nodes}
            compacted = _compact_cache(program, layer_nodes, full, opts)
        rows = [{"layer": layer, "kv_head": h, "window": w, "budget": f,
                 **({"query_head_errors": [round(float(x), 4) for x in errors[layer][h]]} if errors else {})}
                for layer, cfg in sorted(budgets.items()) for h, (w, f) in enumerate(cfg)]
        program.artifacts["budgets.json"] = {"tolerance": opts.tolerance, "sinks": opts.sinks, "obs": opts.obs,
                                             "heads": rows}
        all_budgets = [f for cfg in budgets.values() for _, f in cfg]
        stats = {"sparse_layers": sparse, "dense_layers": dense,
                 "mean_budget": sum(all_budgets) / len(all_budgets), **compacted, **extra.get("info", {})}
        if original is not None and extra.get("eval") and "logits" in program.output_names:
            stats.update(self._quality(original, program, extra["eval"], tok))
        return PassResult(program, bool(sparse), stats)

    def _quality(self, dense: Program, sparse: Program, windows, tok) -> dict:
        """Perplexity on held-out windows and the passkey probe, dense vs TCA, at full context."""
        out = {"eval_tokens": sum(w.shape[1] for w in windows),
               "perplexity_dense": perplexity(dense, windows), "perplexity_tca": perplexity(sparse, windows)}
        if tok is not None:
            out.update(passkey_stats({"dense": dense, "tca": sparse}, tok, windows))
        return out


def _compact_cache(program: Program, layer_nodes: dict[int, str], budgets: dict[int, list[tuple[int, float]]],
                   opts: TCAOptions) -> dict:
    """Rewrite a generation graph so that every layer returns its compacted cache (see the module
    docstring): new ``past_index_i``/``present_index_i`` tensors, every attention node a
    ``tca_cache_attention`` reading the layer's full present cache and ``attention_mask``. The
    graph is re-exported (its cache lengths are now the op's output sizes). Returns the cache
    bytes per sequence after a prefill of 1K and 4K tokens: the entries the op keeps
    (``compact_size``, the rule its outputs are cut by) times each entry's bytes."""
    spec = program.cache
    gm = program.ep.module(check_guards=False)
    gm._forward_pre_hooks.clear()          # the input-count check: inputs are added below
    graph = gm.graph
    graph._codegen = torch.fx.graph.CodeGen()   # plain positional inputs, a flat output tuple
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    out = graph.output_node()
    outputs = dict(zip(program.output_names, out.args[0]))
    nodes = {n.name: n for n in graph.nodes}
    for layer, name in sorted(layer_nodes.items()):
        node = nodes[name]
        with graph.inserting_after(placeholders[f"past_value_{layer}"]):
            index = graph.placeholder(f"past_index_{layer}")
        ws, fs = [w for w, _ in budgets[layer]], [f for _, f in budgets[layer]]
        present = [outputs[f"present_{kv}_{layer}"] for kv in ("key", "value")]
        with graph.inserting_before(node):
            call = graph.call_function(TCA_CACHE.overload, (node.args[0], *present, index,
                                                            placeholders["attention_mask"], node.args[4], fs, ws,
                                                            opts.sinks, opts.obs))
            parts = [graph.call_function(operator.getitem, (call, i)) for i in range(4)]
        node.replace_all_uses_with(parts[0])
        graph.erase_node(node)
        outputs.update({f"present_{kv}_{layer}": parts[i + 1] for i, kv in enumerate(("key", "value", "index"))})
    new_spec = replace(spec, index=True)
    out.args = (tuple(outputs[n] for n in ["logits", *new_spec.output_names]),)
    remove_dead_code(graph)
    gm.recompile()
    names = ["input_ids", "attention_mask", "position_ids", *new_spec.input_names]
    past = program.probe["past_key_0"].shape[2]
    probe = {**program.probe, **{n: t for n, t in new_spec.empty(program.probe["input_ids"].shape[0], past).items()
                                  if n.startswith("past_index_")}}
    axes = {**program.dynamic_axes, **{n: program.dynamic_axes[f"past_key_{n.rsplit('_', 1)[1]}"]
                                      for n in new_spec.input_names if n.startswith("past_index_")}}
    program.cache, program.probe = new_spec, probe
    program.input_names, program.output_names, program.dynamic_axes = names, ["logits", *new_spec.output_names], axes
    program.reexport(gm, "tca: the compacting generation graph")
    kept = {str(n): sum(new_spec.entry_bytes(layer) * compact_size(n, n, [f for _, f in cfg], [w for w, _ in cfg],
                                                                      opts.sinks)
                        for layer, cfg in budgets.items()) for n in (1024, 4096)}
    return {"kv_cache_bytes": {n: {"full": spec.nbytes(int(n)), "compacted": b} for n, b in kept.items()}}
