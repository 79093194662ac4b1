"""Interleaved timing on a noisy machine, shared by the benchmarks: candidates take turns round by
round, each round starting one candidate later (so none always follows the same neighbour), and
a speed against a peer is the median of the per-round ratios (both timed in the same round),
steadier than the ratio of two medians."""
from __future__ import annotations

import numpy as np


def rotated(order: list, r: int) -> list:
    """Round ``r``'s turn order: ``order`` started ``r`` places later."""
    return order[r % len(order):] + order[:r % len(order)]


def ratio_stats(key: str, ratio: np.ndarray) -> dict:
    """``key``: the median of per-round ratios; ``key_iqr``: their interquartile range."""
    return {key: float(np.median(ratio)), f"{key}_iqr": [float(np.percentile(ratio, 25)), float(np.percentile(ratio, 75))]}
