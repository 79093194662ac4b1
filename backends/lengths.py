"""Each row's length as a graph input, where a generation graph takes it.

GroupQueryAttention reads a right-padded batch's lengths as ``seqlens_k`` (each row's tokens minus
one, int32 [B]) and ``total_sequence_length`` (the mask's width, an int32 scalar), and a windowed
node each row's new tokens too (``query_seqlens``, int32 [B]). A graph that computes them from
``attention_mask`` runs six small nodes at every decode step (onnxruntime-genai's CPU builds do),
three more per windowed layer; tokopt's runner knows these numbers, so its graphs take them as
inputs instead, and the mask only where something else reads it (``onnx_shapes.lengths_inputs``).
``graph_feed`` turns a feed in the transformers convention (``attention_mask``) into what such a
graph reads.

Standalone on purpose (numpy only): the emulated aarch64 Python imports it by path.
"""
from __future__ import annotations

import numpy as np

__all__ = ["LENGTHS", "NEW_TOKENS", "lengths", "graph_feed"]

LENGTHS = ("seqlens_k", "total_sequence_length")
NEW_TOKENS = "query_seqlens"   # a windowed layer's: each row's new tokens, min(its length, S)


def lengths(mask: np.ndarray, new: int) -> dict[str, np.ndarray]:
    """The lengths of a right-padded ``attention_mask`` [B, T] at a call of ``new`` tokens."""
    rows = np.asarray(mask).sum(1)
    return {LENGTHS[0]: (rows - 1).astype(np.int32), LENGTHS[1]: np.array(mask.shape[1], dtype=np.int32),
            NEW_TOKENS: np.minimum(rows, new).astype(np.int32)}


def graph_feed(feed: dict, names) -> dict:
    """``feed`` cut to the inputs ``names`` a graph reads, with the lengths taken from its
    ``attention_mask`` where the graph reads those instead."""
    if LENGTHS[0] in names and "attention_mask" in feed and LENGTHS[0] not in feed:
        feed = {**feed, **lengths(feed["attention_mask"], feed["input_ids"].shape[1])}
    return {k: v for k, v in feed.items() if k in names}
