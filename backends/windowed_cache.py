"""Window-sized KV caches for sliding-window layers (GroupQueryAttention's ``sliding_window_cache``).

A windowed layer's buffer holds at least its window W and at most a capacity C; the kernel keeps
the most recent positions at rows [0, L) and evicts G = C - W + 1 positions at once when full, so a
decode step reads L <= C keys instead of every past one (see the op's schema for L(T)). The
lowering names such layers in the model's metadata (``mark_windowed``); ``WindowedSession``
runs that model with full-length pasts, as any session runs, and ``BoundDecoding`` sizes its
buffers by ``windowed_rows``.
"""
from __future__ import annotations

import json
import math

import numpy as np

__all__ = ["WINDOWED_KEY", "mark_windowed", "WindowedSession", "windowed_rows"]

WINDOWED_KEY = "tokopt.windowed_cache"   # model metadata: {past input: [present output, window]}


def mark_windowed(model) -> None:
    """Record the onnx_ir ``model``'s windowed GroupQueryAttention buffers in its metadata."""
    import onnx_ir as ir
    found = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        windowed = node.attributes.get("sliding_window_cache")
        if node.op_type == "GroupQueryAttention" and windowed is not None and windowed.value == 1:
            window = node.attributes["local_window_size"].value
            for past, present in ((node.inputs[3], node.outputs[1]), (node.inputs[4], node.outputs[2])):
                found[past.name] = [present.name, window]
    if found:
        model.metadata_props[WINDOWED_KEY] = json.dumps(found)
    else:
        model.metadata_props.pop(WINDOWED_KEY, None)


def windowed_rows(tokens: int, window: int, exact: bool) -> int:
    """Rows of a windowed layer's buffer for a decoding of at most ``tokens`` tokens. ``exact``
    (drafts that may be taken back, a cache compacted after the prefill) keeps every position:
    taking k tokens back is exact only while none of them evicted another. Otherwise the window
    plus a slack g: a step reads up to W + g rows and eviction moves W rows every g + 1 steps,
    about W + g/2 + W/g rows a step, least at g = sqrt(2W)."""
    if exact:
        return max(tokens, window)
    return max(window, min(tokens, window + math.isqrt(2 * window)))


class WindowedSession:
    """An ONNX Runtime session whose windowed layers' pasts are fed as full-length arrays, as any
    session's: each goes through a buffer of max(T, W) rows bound as the layer's past and present
    (nothing is evicted while T fits, so the layout is the full one) and its present comes back as
    the first T rows. Anything else is the session's own."""

    def __init__(self, session, windowed: dict[str, list]):
        self._session, self.windowed = session, {k: (v[0], int(v[1])) for k, v in windowed.items()}

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run(self, output_names, feed: dict, run_options=None):
        import onnxruntime as ort
        # the tokens so far: the mask's width, or where the graph reads lengths instead (lengths.py) theirs
        total = feed["attention_mask"].shape[1] if "attention_mask" in feed else int(feed["total_sequence_length"])
        io, buffers, kept = self._session.io_binding(), {}, []
        for name, value in feed.items():
            if name in self.windowed:
                present, window = self.windowed[name]
                b, h, past, d = value.shape
                buf = np.zeros((b, h, max(total, window), d), dtype=value.dtype)
                buf[:, :, :past] = value
                kept.append(ort.OrtValue.ortvalue_from_numpy(buf))
                io.bind_ortvalue_input(name, kept[-1])
                buffers[present] = (buf, kept[-1])
            else:
                io.bind_cpu_input(name, np.ascontiguousarray(value))
        names = output_names or [o.name for o in self._session.get_outputs()]
        for name in names:
            if name in buffers:
                io.bind_ortvalue_output(name, buffers[name][1])
            else:
                io.bind_output(name)
        self._session.run_with_iobinding(io, run_options)
        return [buffers[name][0][:, :, :total] if name in buffers else value.numpy()
                for name, value in zip(names, io.get_outputs())]
