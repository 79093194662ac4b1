"""One-pass attention statistics, streamed, and the head budgets TCA-Attention derives from them.

``head_errors`` runs the program's exact forward over calibration batches. At every canonical
attention it also evaluates a candidate sparse attention (``candidate(q, k, v, mask, scale,
causal, config)``, ``causal`` being the block's own causality, which an explicit mask may
carry) for each candidate configuration, one KV-head group at a time (never every head's map
at once; the dense output comes from SDPA, which never forms the N x N map), and keeps running
sums of the squared error and the squared norm of each query head's output.

``cheapest_within`` turns them into TCA's head-specific budgets: for each KV head, the cheapest
candidate at which every query head that shares it keeps its relative output error
``||O_sparse - O||/||O||`` within ``tolerance``. Results are cached on
disk keyed by (weights hash, data hash, options), so a second compile does not recompute; a
long computation saves its finished steps as it goes (``Steps``), so an interrupted one resumes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..optimizer.errors import UsageError
from ..optimizer.ops import Tap, attention_reference
from ..optimizer.program import AttentionBlock, Program
from ..optimizer.resources import mapped_releaser

__all__ = ["head_errors", "cheapest_within", "program_hash", "cache_dir", "cached", "cached_tensors", "Steps"]


def program_hash(program: Program) -> str:
    """What a calibration result depends on besides its data and options: the weights, and the
    passes that shaped the graph it ran on (pruned tokens or sparse attention change every
    activation downstream while the weights stay the same)."""
    h = hashlib.sha256(json.dumps([[p["name"], p["options"]] for p in program.history], sort_keys=True,
                                  default=str).encode())
    release = mapped_releaser()   # each mapped weight leaves memory once read: an 8B model's are 16 GB
    for name, t in sorted(program.ep.state_dict.items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy())   # the buffer itself, not a copy
        release(t)
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("TOKOPT_CACHE_DIR") or Path.home() / ".cache" / "tokopt")


def _entry(kind: str, key: dict, suffix: str) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / kind / f"{digest}{suffix}"


def _store(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file, so a reader never sees half an entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    write(tmp)
    tmp.replace(path)


def cached(kind: str, key: dict, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """``compute()`` once per key; returns (result, whether it came from the cache)."""
    path = _entry(kind, key, ".json")
    if path.exists():
        try:
            return json.loads(path.read_text()), True
        except json.JSONDecodeError:
            pass  # a damaged entry is recomputed
    result = compute()
    _store(path, lambda tmp: tmp.write_text(json.dumps({**result, "key": key}, indent=1)))
    return result, False


def cached_tensors(kind: str, key: dict, compute: Callable[..., dict], steps: bool = False) -> tuple[dict, bool]:
    """``cached`` for results that hold tensors (a dict of tensors, lists and numbers). With
    ``steps``, ``compute(steps)`` gets the ``Steps`` of this key: what an interrupted run finished,
    which the whole result replaces once it is stored."""
    path = _entry(kind, key, ".pt")
    if path.exists():
        try:
            return torch.load(path, weights_only=True), True
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed
            pass
    done = Steps(_entry(kind, key, ".steps"))
    result = compute(done) if steps else compute()
    _store(path, lambda tmp: torch.save(result, tmp))
    shutil.rmtree(done.folder, ignore_errors=True)
    return result, False


class Steps:
    """The finished steps of a long calibration (GPTQ's groups), each written to ``folder`` as it
    ends: a run that is stopped (Ctrl-C, a killed process, a full machine) leaves them, and the next
    run with the same weights, data and options loads them instead of computing them again."""

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self, i: int) -> dict | None:
        """Step ``i``'s result, or None where it was not finished (or its file is damaged)."""
        path = self.folder / f"{i:05d}.pt"
        try:
            return torch.load(path, weights_only=True) if path.exists() else None
        except Exception:  # noqa: BLE001 - a step cut off mid-write is computed again
            return None

    def save(self, i: int, result: dict) -> None:
        _store(self.folder / f"{i:05d}.pt", lambda tmp: torch.save(result, tmp))


def _collect(sums: dict, layer: int, block_causal: bool, grid, candidate, q, k, v, mask, scale, causal) -> None:
    h, hkv = q.shape[1], k.shape[1]
    g = h // hkv
    err = torch.zeros(len(grid), h, dtype=torch.float64)
    norm = torch.zeros(h, dtype=torch.float64)
    for j in range(hkv):  # one KV-head group at a time bounds memory
        qs, ks, vs = q[:, j * g:(j + 1) * g], k[:, j:j + 1], v[:, j:j + 1]
        dense = attention_reference(qs, ks, vs, mask, scale, causal).double()
        norm[j * g:(j + 1) * g] = dense.pow(2).sum((0, 2, 3))
        for i, config in enumerate(grid):
            approx = candidate(qs, ks, vs, mask, scale, block_causal, config).double()
            err[i, j * g:(j + 1) * g] = (approx - dense).pow(2).sum((0, 2, 3))
    e, n = sums.setdefault(layer, (torch.zeros_like(err), torch.zeros_like(norm)))
    e += err
    n += norm


def head_errors(program: Program, blocks: list[AttentionBlock], batches, grid: list, candidate,
                total: int | None = None, progress: bool = True) -> dict[int, np.ndarray]:
    """{layer: [len(grid), heads] relative output error of each candidate configuration} at the
    canonical attention ``blocks`` over ``batches`` (see module doc)."""
    sums: dict[int, tuple] = {}
    by_node = {b.node: b for b in blocks if b.spelling == "canonical"}

    def on_args(node, args):
        block = by_node[node.name]
        _collect(sums, block.layer, bool(block.causal), grid, candidate, *args[:6])

    tap = Tap(program.unlifted(), args=by_node, on_args=on_args)
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc="calibrating head budgets", disable=not progress,
                          leave=False):
            tap.run_feed(batch, program.input_names)
    if not sums:
        raise UsageError("calibration saw no attention: the model's attention was not recognised "
                         "(see `tokopt inspect MODEL`).")
    return {layer: (e / n.clamp_min(1e-30)).sqrt().numpy() for layer, (e, n) in sorted(sums.items())}


def cheapest_within(errors: dict[int, np.ndarray], costs: list[float], kv_heads: int,
                    tolerance: float) -> dict[int, list[int]]:
    """{layer: per-KV-head index of the cheapest candidate that keeps every query head of the
    group within ``tolerance``} (the most accurate candidate where none does)."""
    out = {}
    order = sorted(range(len(costs)), key=lambda i: costs[i])
    for layer, err in errors.items():
        worst = err.reshape(len(costs), kv_heads, -1).max(-1)                # [candidates, Hkv]
        out[layer] = [next((i for i in order if worst[i, h] <= tolerance), int(worst[:, h].argmin()))
                      for h in range(kv_heads)]
    return out
