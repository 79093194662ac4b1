"""Calibration and probe data: text files, JSONL of texts, or token-id arrays -> batches.

    load_texts("book.txt")         paragraphs (blank-line separated) of a text file
    load_texts("set.jsonl")        the "text" field of each line (or the line, if it is a string)
    calibration_batches(src, tokenizer, seq_len=512, batch_size=4)
                                   token-id batches [B, seq_len] with attention masks; a text
                                   file is tokenised as one stream (a JSONL's texts joined by
                                   the end-of-text token) and cut into windows, a .npy/.pt
                                   source of ids is used as it is

Shipped beside this file: English passages of 40-200 words from the descriptions installed
Python packages ship, split once into ``passages-calib.jsonl`` (what calibration and training
use by default) and ``passages-eval.jsonl`` (every fifth passage: what reports measure on, never
seen by calibration); ``scripts/extract_passages.py`` rebuilds both.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from ..optimizer.errors import UsageError

__all__ = ["load_texts", "load_ids", "calibration_batches", "token_windows", "default_texts", "token_source",
           "PASSAGES"]

PASSAGES = {split: Path(__file__).with_name(f"passages-{split}.jsonl") for split in ("calib", "eval")}


def token_source(program, who: str, refusal: str):
    """(source, tokenizer) pass ``who`` calibrates on: ``--calib`` (default: the shipped passages'
    calibration split)
    and the model's tokenizer (None without one, where only a token-id file will do). Raises a
    UsageError with ``refusal`` when no token ids can be had."""
    from ..optimizer.runtime import load_tokenizer
    if "input_ids" not in program.input_names:
        raise UsageError(f"{who} calibrates on token sequences; this model takes "
                         f"{', '.join(program.input_names)}, and tokopt has no image calibration set yet.")
    if program.tokenizer_dir is None and not (program.calib and Path(program.calib).suffix in (".npy", ".pt")):
        raise UsageError(refusal)
    tok = load_tokenizer(program.tokenizer_dir) if program.tokenizer_dir else None
    return (Path(program.calib) if program.calib else PASSAGES["calib"]), tok


def load_texts(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"calibration data {path} does not exist or is not a file.")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{i} is not valid JSON ({e}).") from e
            text = item.get("text") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise UsageError(f"{path}:{i} has no string 'text' field.")
            texts.append(text)
    else:
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise UsageError(f"{path} holds no text.")
    return texts


def load_ids(path) -> torch.Tensor:
    path = Path(path)
    arr = torch.load(path, weights_only=True) if path.suffix == ".pt" else torch.from_numpy(np.load(path))
    if arr.dtype.is_floating_point or arr.dim() not in (1, 2):
        raise UsageError(f"{path} must hold integer token ids, 1-D (a stream) or 2-D [rows, tokens].")
    return arr.long()


def calibration_batches(source, tokenizer=None, *, seq_len: int = 512, batch_size: int = 4,
                        max_batches: int | None = None, progress: bool = True) -> Iterator[dict]:
    """Yield ``{"input_ids", "attention_mask"}`` batches of full ``seq_len`` windows."""
    path = Path(source)
    if path.suffix in (".npy", ".pt"):
        ids = load_ids(path)
    else:
        if tokenizer is None:
            raise UsageError(f"{path} is text; a tokenizer is needed to turn it into token ids.")
        if path.suffix in (".jsonl", ".json"):  # separate texts, joined by the end-of-text token
            sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
            stream = []
            for t in tqdm(load_texts(path), desc="tokenising", disable=not progress, leave=False):
                stream += tokenizer(t, add_special_tokens=False)["input_ids"] + sep
        else:  # a text file is one stream, blank lines included
            load_texts(path)  # the same checks: the file exists and holds text
            text = path.read_text(encoding="utf-8", errors="replace")
            stream = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(stream, dtype=torch.long)
    rows = ids.view(-1)[: ids.numel() // seq_len * seq_len].view(-1, seq_len) if ids.dim() == 1 else ids
    if rows.shape[0] == 0:
        raise UsageError(f"{path} has fewer than {seq_len} tokens; give more text or a shorter length.")
    n = (rows.shape[0] + batch_size - 1) // batch_size
    n = min(n, max_batches) if max_batches else n
    for i in tqdm(range(n), desc="calibration batches", disable=not progress, leave=False):
        chunk = rows[i * batch_size:(i + 1) * batch_size]
        yield {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}


def token_windows(source, tokenizer=None, *, seq_len: int, count: int | None = None) -> list[torch.Tensor]:
    """The first ``count`` (default: all) ``[1, seq_len]`` token windows of ``source``."""
    return [b["input_ids"] for b in calibration_batches(source, tokenizer, seq_len=seq_len, batch_size=1,
                                                        max_batches=count, progress=False)]


def default_texts(split: str = "all") -> list[str]:
    """The shipped passages: ``"eval"`` (what reports measure on), ``"calib"`` (what calibration
    and training steps may use), ``"all"`` both in their original order (every fifth is eval)."""
    if split != "all":
        return load_texts(PASSAGES[split])
    calib, held = default_texts("calib"), default_texts("eval")
    return [t for i in range(len(held)) for t in (held[i], *calib[4 * i:4 * i + 4])] + calib[4 * len(held):]
