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

Rewrite: the canonical attention of every layer (or of ``layers=``) with a budget below 1 becomes
``tokopt::tca_attention`` (``optimizer/ops/tca.py``); layers whose heads all need every key stay
dense and are reported. ``uniform=`` gives every head the same budget with no calibration (the
baselines: ``uniform=0`` is sinks + ``window`` only).

On a ``--generate`` graph with ``select=step`` (and ``compact=true``) every layer's attention
becomes ``tokopt::tca_cache_attention``, and the cache a call returns is compacted: per KV head the
sinks, its window and its ``ceil(budget x context)`` best-scored keys, scored by the same
observation queries that select them for attention (the prefill's evenly spaced queries, a
decode step's one query), as TCA keeps only the selected KV in decode. All heads of a layer
share one cache length, the largest head's (the others keep their next-best keys in it): the
graph's cache stays one tensor per layer. Dense layers keep everything. ``past_index_i`` /
``present_index_i`` carry each entry's context position. ``compact=false`` keeps the full cache
(each decode step selects among all of it).

``select=prefill`` (the default) chooses the cache once: the attention stays dense, and each
layer gains a ``keep_i`` output (``tokopt::tca_keep``) that after a prefill names the entries
each KV head keeps (sinks, window, best scores; one size for every layer, the largest layer's
rule, so that one attention mask covers the cache). The runner moves them to the front of its cache and
decode steps attend to them and to every new token, which lets the layer stay on ONNX Runtime's
``GroupQueryAttention`` (rotating at ``position_ids``, the cache in bound buffers): a decode step
costs the dense kernel's over the kept entries, with no selection or compaction in it.
"""
from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..calibration.lm_eval import full_feed, passkey_stats, perplexity
from ..calibration.stats import cached, cheapest_within, head_errors, program_hash
from ..optimizer.data import token_source, token_windows
from ..optimizer.errors import PassError, UsageError
from ..optimizer.ops import TCA, TCA_CACHE, TCA_KEEP
from ..optimizer.ops.tca import compact_size, tca_reference
from ..optimizer.pass_manager import ATTENTION_TO_REPLACE, Pass, PassResult, opt, register_pass
from ..optimizer.program import Program, Rewrite, inherit_meta

__all__ = ["TCAPass", "GRID"]

GRID = (0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
CALIBRATION_VERSION = 5  # part of the cache key: bump when the statistics are computed differently


@dataclass(frozen=True)
class TCAOptions:
    tolerance: float = opt(0.2, "max relative output error per query head at its budget", "(0, 1)")
    sinks: int = opt(4, "first valid positions of each row, which every query keeps", ">= 1")
    windows: tuple[int, ...] = opt((32, 64, 128, 256), "local windows a head may be given", "'/'-separated, each >= 1")
    obs: int = opt(16, "queries (evenly spaced) that score the keys", ">= 1")
    uniform: float = opt(-1.0, "one budget for every head, no calibration (the baselines)",
                         "-1 (calibrated per head) or a fraction in [0, 1]")
    window: int = opt(64, "the local window with uniform=", ">= 1")
    layers: tuple[int, ...] = opt((), "layers whose attention becomes sparse", "'/'-separated indices; empty: all")
    calib_len: int = opt(1024, "tokens per calibration window (at most the model's context)", "> sinks + widest window")
    calib_windows: int = opt(4, "calibration windows", ">= 1")
    eval_windows: int = opt(2, "held-out windows after the calibration ones, for perplexity", ">= 0")
    compact: bool = opt(True, "--generate graphs: keep only each head's core tokens in the KV cache", "true|false")
    select: str = opt("prefill", "--generate graphs, compact=true: choose the kept entries once after the prefill "
                                 "(decode steps then attend to all of them and to every new token, on ONNX Runtime's "
                                 "GroupQueryAttention where the target has it), or at every step (a smaller cache, "
                                 "slower steps)", "prefill|step")

    def __post_init__(self):
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance={self.tolerance} must be in (0, 1)")
        if self.sinks < 1 or self.window < 1 or self.obs < 1 or not self.windows or min(self.windows) < 1:
            raise ValueError("sinks, window, every value of windows, and obs must each be at least 1")
        if self.uniform != -1.0 and not 0 <= self.uniform <= 1:
            raise ValueError(f"uniform={self.uniform} must be a budget in [0, 1] (a fraction of the context), "
                             "or -1 for calibrated per-head budgets")
        if self.select not in ("step", "prefill"):
            raise ValueError(f"select={self.select!r} must be 'step' or 'prefill'")
        if self.calib_windows < 1 or self.eval_windows < 0:
            raise ValueError("calib_windows must be at least 1 and eval_windows at least 0")
        if any(layer < 0 for layer in self.layers):
            raise ValueError(f"layers {self.layers} must be non-negative layer indices")
        if self.uniform == -1.0 and self.calib_len <= max(self.windows) + self.sinks:
            raise ValueError(f"calib_len={self.calib_len}: calibration windows are not longer than sinks + the "
                             f"widest window ({self.sinks + max(self.windows)}): every key would be kept. Use a "
                             "longer calib_len or smaller windows.")


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@register_pass
class TCAPass(Pass):
    name = "tca"
    Options = TCAOptions
    requires = (ATTENTION_TO_REPLACE,)
    replaces_attention = True
    summary = "TCA-Attention: calibrated per-head budgets, online core-token selection (sinks + window + top keys)"

    def layers(self) -> tuple[int, ...] | None:
        return self.options.layers or None

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

        key = {"version": CALIBRATION_VERSION, "weights": program_hash(program), "data": _file_hash(source),
               "length": length, "windows": len(calib), "sinks": opts.sinks, "obs": opts.obs,
               "configs": configs, "graph": "generate" if program.cache else "forward", "layers": layers}
        result, hit = cached("tca", key, lambda: {"errors": {str(layer): e.tolist() for layer, e in head_errors(
            program, blocks, [full_feed(program, w) for w in calib], configs, candidate, total=len(calib)).items()}})
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
        depth = max((b.layer for b in blocks if b.layer is not None), default=-1) + 1
        if opts.layers and max(opts.layers) >= depth:
            raise UsageError(f"tca: layer {max(opts.layers)} is past the model's depth (layers: 0-{depth - 1}).")
        chosen = [b for b in blocks if not opts.layers or b.layer in opts.layers]
        if any(b.causal is None for b in chosen):
            raise UsageError("tca: the causality of some attention blocks could not be read from the graph; "
                             "see `tokopt inspect MODEL`.")
        if len({b.kv_heads for b in chosen}) != 1:
            raise UsageError("tca: the attention blocks have different KV-head counts; not supported yet.")
        source, tok = token_source(program, "tca", "tca: calibration needs token ids: give --calib ids.npy, or a model "
                                            "folder with a tokenizer and --calib text (or pass uniform=BUDGET to "
                                            "skip calibration).") if opts.uniform < 0 else (None, None)
        budgets, errors, extra = self._budgets(program, chosen, source, tok)
        sparse = sorted(layer for layer, cfg in budgets.items() if any(f < 1.0 for _, f in cfg))
        dense = sorted(b.layer for b in blocks if b.layer not in sparse)
        compacting = program.cache is not None and opts.compact and bool(sparse)
        # compacting adds the cache's outputs; otherwise each attention node becomes one op of
        # the same value, which needs no re-export
        rw = program.rewrite() if compacting else program.edit()
        nodes = {n.name: n for n in rw.graph.nodes}
        compacted, changes = {}, {}
        if compacting:
            if any(b.layer is None for b in blocks) or sorted(b.layer for b in blocks) != list(range(program.cache.layers)):
                raise UsageError("tca: compact=true needs every layer's attention recognised, so that every "
                                 "layer's cache can be compacted; pass compact=false to keep the full cache.")
            dense_cfg = [(min(opts.windows), 1.0)] * program.cache.kv_heads[0]
            full = {b.layer: budgets.get(b.layer, dense_cfg) for b in blocks}
            compact = _keep_after_prefill if opts.select == "prefill" else _compact_cache
            compacted = compact(rw, {b.layer: nodes[b.node] for b in blocks}, full, opts)
            changes["cache"] = replace(program.cache, **{"keeps" if opts.select == "prefill" else "index": True})
        else:
            for block in chosen:
                if block.layer not in sparse:
                    continue
                node = nodes[block.node]
                q, k, v, mask, scale, _ = node.args
                # the block's causality (an HF mask carries it while SDPA's flag stays False)
                with rw.graph.inserting_before(node):
                    new = rw.graph.call_function(TCA.overload, (q, k, v, mask, scale, bool(block.causal),
                                                                [f for _, f in budgets[block.layer]],
                                                                [w for w, _ in budgets[block.layer]], opts.sinks,
                                                                opts.obs))
                inherit_meta(new, node)
                node.replace_all_uses_with(new)
                rw.graph.erase_node(node)
        rows = [{"layer": layer, "kv_head": h, "window": w, "budget": f,
                 **({"query_head_errors": [round(float(x), 4) for x in errors[layer][h]]} if errors else {})}
                for layer, cfg in sorted(budgets.items()) for h, (w, f) in enumerate(cfg)]
        all_budgets = [f for cfg in budgets.values() for _, f in cfg]
        stats = {"sparse_layers": sparse, "dense_layers": dense,
                 "mean_budget": sum(all_budgets) / len(all_budgets), **compacted, **extra.get("info", {})}
        if not sparse:
            return PassResult(program, False, stats)
        out = rw.commit("tca", **changes)
        out.artifacts["budgets.json"] = {"tolerance": opts.tolerance, "sinks": opts.sinks, "obs": opts.obs,
                                         "heads": rows}
        if opts.uniform < 0 and program.cache is None and extra.get("eval") and "logits" in program.output_names \
                and program.keeps_positions:
            stats.update(self._quality(program, out, extra["eval"], tok))
        return PassResult(out, True, stats)

    def ensures(self, program: Program, stats: dict) -> None:
        if stats.get("kept_after_prefill"):
            kept = {n.name for n in program.graph.nodes if TCA_KEEP.matches(n)}
            spec = program.cache
            if len(kept) != spec.layers or program.output_names[-spec.layers:] != spec.keep_names:
                raise PassError("tca select=prefill: every layer needs a tca_keep node and a keep_i output")
            return
        ops = {"tca_attention", "tca_cache_attention"}
        missing = [layer for layer in stats["sparse_layers"]
                   if not any(b.layer == layer and b.spelling in ops for b in program.attention)]
        if missing:
            raise PassError(f"tca replaced the attention of layers {missing}, but the index finds no TCA op there")

    def _quality(self, dense: Program, sparse: Program, windows, tok) -> dict:
        """Perplexity on held-out windows and the passkey probe, dense vs TCA, at full context."""
        out = {"eval_tokens": sum(w.shape[1] for w in windows),
               "perplexity_dense": perplexity(dense, windows), "perplexity_tca": perplexity(sparse, windows)}
        if tok is not None:
            out.update(passkey_stats({"dense": dense, "tca": sparse}, tok, windows))
        return out


def _compact_cache(rw: Rewrite, layer_nodes: dict[int, object], budgets: dict[int, list[tuple[int, float]]],
                   opts: TCAOptions) -> dict:
    """Make every layer of the generation graph in ``rw`` return its compacted cache (see the
    module docstring): new ``past_index_i``/``present_index_i`` tensors, every attention node a
    ``tca_cache_attention`` reading the layer's full present cache and ``attention_mask``.
    Returns the cache bytes per sequence after a prefill of 1K and 4K tokens: the entries the
    op keeps (``compact_size``, the rule its outputs are cut by) times each entry's bytes."""
    spec = rw.program.cache
    new_spec = replace(spec, index=True)
    graph, outputs = rw.graph, rw.outputs
    batch, past = rw.probe["input_ids"].shape[0], rw.probe["past_key_0"].shape[2]
    examples = new_spec.empty(batch, past)
    for layer, node in sorted(layer_nodes.items()):
        name = f"past_index_{layer}"
        index = rw.add_input(name, examples[name], rw.dynamic_axes[f"past_key_{layer}"], after=f"past_value_{layer}")
        ws, fs = [w for w, _ in budgets[layer]], [f for _, f in budgets[layer]]
        present = [outputs[f"present_{kv}_{layer}"] for kv in ("key", "value")]
        with graph.inserting_before(node):
            call = graph.call_function(TCA_CACHE.overload, (node.args[0], *present, index, rw.inputs["attention_mask"],
                                                            node.args[4], fs, ws, opts.sinks, opts.obs))
            parts = [graph.call_function(operator.getitem, (call, i)) for i in range(4)]
        inherit_meta(call, node)
        node.replace_all_uses_with(parts[0])
        graph.erase_node(node)
        outputs.update({f"present_{kv}_{layer}": parts[i + 1] for i, kv in enumerate(("key", "value", "index"))})
    rw.set_outputs({n: outputs[n] for n in ["logits", *new_spec.output_names]})
    kept = {str(n): sum(new_spec.entry_bytes(layer) * compact_size(n, n, [f for _, f in cfg], [w for w, _ in cfg],
                                                                      opts.sinks)
                        for layer, cfg in budgets.items()) for n in (1024, 4096)}
    return {"kv_cache_bytes": {n: {"full": spec.nbytes(int(n)), "compacted": b} for n, b in kept.items()}}


def _keep_after_prefill(rw: Rewrite, layer_nodes: dict[int, object], budgets: dict[int, list[tuple[int, float]]],
                        opts: TCAOptions) -> dict:
    """Give the generation graph in ``rw`` a ``keep_i`` output per layer: after a prefill, the
    cache entries each KV head keeps (``tokopt::tca_keep``, one size for every layer); the runner
    compacts the cache once with them, and the attention stays dense. Returns the entries kept
    and the cache bytes per sequence after a prefill of 1K and 4K tokens."""
    spec = rw.program.cache
    sizes = [cfg for _, layer in sorted(budgets.items()) for cfg in layer]
    size_windows, size_budgets = [w for w, _ in sizes], [f for _, f in sizes]
    outputs = rw.outputs
    for layer, node in sorted(layer_nodes.items()):
        q, k = node.args[:2]
        with rw.graph.inserting_after(node):
            keep = rw.graph.call_function(TCA_KEEP.overload, (q, k, rw.inputs["attention_mask"], node.args[4],
                                                              [w for w, _ in budgets[layer]], opts.sinks, opts.obs,
                                                              size_budgets, size_windows))
        outputs[f"keep_{layer}"] = keep
    rw.set_outputs(outputs)
    kept = {str(n): compact_size(n, n, size_budgets, size_windows, opts.sinks) for n in (1024, 4096)}
    return {"kept_after_prefill": kept,
            "kv_cache_bytes": {n: {"full": spec.nbytes(int(n)), "compacted": spec.nbytes(k)} for n, k in kept.items()}}
