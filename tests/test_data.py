"""Calibration data loading: text, JSONL, token ids; and its errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tokopt.optimizer.data import calibration_batches, load_texts
from tokopt.optimizer.errors import UsageError


class _ByteTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


def test_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond one\n")
    assert load_texts(tmp_path / "a.txt") == ["first paragraph\nstill first", "second one"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n"two"\n\n')
    assert load_texts(tmp_path / "b.jsonl") == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(UsageError, match="c.jsonl:1 has no string 'text'"):
        load_texts(tmp_path / "c.jsonl")
    with pytest.raises(UsageError, match="does not exist"):
        load_texts(tmp_path / "missing.txt")


def test_batches_from_text_and_ids(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 100 + "\n\n" + "y" * 100)
    batches = list(calibration_batches(tmp_path / "a.txt", _ByteTokenizer(), seq_len=32, batch_size=4,
                                       progress=False))
    assert [b["input_ids"].shape for b in batches] == [torch.Size([4, 32]), torch.Size([2, 32])]
    np.save(tmp_path / "ids.npy", np.arange(300))
    b = list(calibration_batches(tmp_path / "ids.npy", seq_len=100, batch_size=8, progress=False))
    assert b[0]["input_ids"].shape == (3, 100) and int(b[0]["input_ids"][1, 0]) == 100
    with pytest.raises(UsageError, match="fewer than 1000 tokens"):
        list(calibration_batches(tmp_path / "ids.npy", seq_len=1000, progress=False))
    with pytest.raises(UsageError, match="tokenizer is needed"):
        list(calibration_batches(tmp_path / "a.txt", None, progress=False))
