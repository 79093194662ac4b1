"""Causal-LM quality probes run on a Program (rewritten ops execute their torch references).

    perplexity(program, windows)           exp(mean NLL) over full [1, N] token windows
    passkey(program, tokenizer, filler)    fraction of probes whose planted number the model
                                           predicts back at the end of a long context, and the
                                           mean log-probability of the number's tokens
    decode_perplexity(step, spec, windows, prompt)
                                           exp(mean NLL) of each window's tokens after its first
                                           ``prompt``, predicted one decode step at a time
                                           (through the KV cache, teacher-forced)
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..optimizer.errors import UsageError
from ..optimizer.generation import LOGITS_INDEX
from ..optimizer.program import Program
from ..optimizer.report import float64_rows

__all__ = ["perplexity", "decode_perplexity", "passkey", "passkey_stats", "full_feed", "token_kl"]


def full_feed(program: Program, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The program's inputs for unpadded token windows ``ids`` [B, N] (a generation graph: a
    prefill with an empty cache)."""
    feed = {"input_ids": ids}
    if "attention_mask" in program.input_names:
        feed["attention_mask"] = torch.ones_like(ids)
    if "token_type_ids" in program.input_names:
        feed["token_type_ids"] = torch.zeros_like(ids)
    if program.cache is not None:
        feed["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids)
        feed[LOGITS_INDEX] = torch.arange(ids.shape[1])   # every position's logits
        feed.update(program.cache.empty(ids.shape[0]))
    return feed


def _nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Summed cross-entropy of ``logits`` [T, V] against ``target`` [T] in float64, a slice of rows
    at a time: a 152K vocabulary's float64 log-softmax over 512 tokens is 1.2 GB at once."""
    rows = float64_rows(logits.shape[-1])
    return sum(float(torch.nn.functional.cross_entropy(logits[i:i + rows].double(), target[i:i + rows], reduction="sum"))
               for i in range(0, logits.shape[0], rows))


def token_kl(ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(got)) at each position of logits [..., V], in float64, a slice
    of positions at a time."""
    ref, got = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    rows = float64_rows(ref.shape[-1])
    parts = []
    for i in range(0, ref.shape[0], rows):
        lp, lq = ref[i:i + rows].double().log_softmax(-1), got[i:i + rows].double().log_softmax(-1)
        parts.append((lp.exp() * (lp - lq)).sum(-1))
    return torch.cat(parts)


def perplexity(program: Program, windows: list[torch.Tensor], run=None) -> float:
    """``run(feed) -> outputs`` (default: the program's runner, releasing its mapped weights as it
    goes) computes the logits, e.g. a ``Rewrite``'s module while a pass is editing the program."""
    if not program.keeps_positions:
        raise UsageError("perplexity needs every position's logits, and this graph drops tokens (token_prune); "
                         "the compile report measures the last position's logits instead.")
    nll, n = 0.0, 0
    run = run or program.runner(release_mapped=True)
    for ids in windows:
        nll += _nll(run(full_feed(program, ids))["logits"][0, :-1], ids[0, 1:])
        n += ids.shape[1] - 1
    return math.exp(nll / n)


def decode_perplexity(step, spec, windows: list[torch.Tensor], prompt: int) -> float:
    """``step(feed) -> outputs`` runs a generation graph (a bundle's runner or a program's);
    the prefill reads ``prompt`` tokens, then every later token of the window is fed as the
    next decode step's input and scored by the step before."""
    from ..optimizer.generation import generate_ids
    nll, n = 0.0, 0
    for ids in windows:
        ids = ids.numpy()
        got = []
        generate_ids(step, spec, ids[:, :prompt], max_new_tokens=ids.shape[1] - prompt, forced=ids[:, prompt:],
                     on_logits=got.append)
        logits = torch.from_numpy(np.stack(got, 1))                        # [B, T, V]; T < N - prompt after an EOS
        target = torch.from_numpy(ids[:, prompt:prompt + logits.shape[1]])
        nll += _nll(logits.flatten(0, 1), target.flatten())
        n += logits.shape[0] * logits.shape[1]
    return math.exp(nll / n)


def passkey(program: Program, tokenizer, filler: str, *, probes: int = 8, length: int = 768,
            seed: int = 0) -> tuple[float, float]:
    """A 5-digit key planted at 5-25% of a ``length``-token context of ``filler``, asked for at
    the end; a probe counts when every token of the key is the model's top prediction. The
    log-probability still tells two graphs apart when a small model retrieves nothing."""
    rng = np.random.default_rng(seed)
    filler_ids = tokenizer(filler, add_special_tokens=False)["input_ids"]
    hits, logp = 0, []
    run = program.runner()
    for _ in range(probes):
        key = str(int(rng.integers(10000, 100000)))
        plant = tokenizer(f"\nPASS_KEY = {key}  # remember the pass key\n", add_special_tokens=False)["input_ids"]
        ask = tokenizer("\n# the pass key:\nPASS_KEY =", add_special_tokens=False)["input_ids"]
        answer = tokenizer(f" {key}", add_special_tokens=False)["input_ids"]
        room = length - len(plant) - len(ask) - len(answer)
        start = int(rng.integers(0, max(len(filler_ids) - room, 1)))
        body = filler_ids[start:start + room]
        at = int(len(body) * rng.uniform(0.05, 0.25))
        ids = torch.tensor([body[:at] + plant + body[at:] + ask + answer])
        scores = run(full_feed(program, ids))["logits"][0, -len(answer) - 1:-1].double().log_softmax(-1)
        target = ids[0, -len(answer):]
        hits += bool((scores.argmax(-1) == target).all())
        logp.append(float(scores.gather(-1, target[:, None]).mean()))
    return hits / probes, float(np.mean(logp))


def passkey_stats(programs: dict[str, Program], tokenizer, windows: list[torch.Tensor]) -> dict:
    """``passkey_<name>`` and ``passkey_logprob_<name>`` of each program, the held-out
    ``windows`` as filler, the context as long as one window (at most 768 tokens)."""
    filler = tokenizer.decode(torch.cat(windows, 1)[0])
    length = min(windows[0].shape[1], 768)
    out = {}
    for name, prog in programs.items():
        out[f"passkey_{name}"], out[f"passkey_logprob_{name}"] = passkey(prog, tokenizer, filler, length=length)
    return out
