"""The ONNX Runtime session settings every tokopt bundle runs under, here and on emulated ARM code.

Standalone on purpose (it imports nothing but ONNX Runtime): ``tokopt verify --emulate`` imports
it by path into an aarch64 Python that has no torch and no tokopt.
"""
from __future__ import annotations

__all__ = ["session_options", "DISABLED_OPTIMIZERS"]

# ONNX Runtime 1.32's QDQ propagation and its S8->U8 rewrite together emit QuantizeLinear nodes whose
# output type contradicts their zero point (edgeqat's per-token QDQ pairs fail to load); tokopt graphs
# never need the rewrite (it targets int8 MatMul/Conv, and tokopt writes the signedness each target takes)
DISABLED_OPTIMIZERS = ["QDQS8ToU8Transformer"]


def session_options(ort, threads: int | None = None, prepack: bool = True):
    """``prepack=False``: kernels read the weights where they lie (an external-data file ONNX
    Runtime maps) instead of repacking them into a copy; for sessions that check numbers, not
    speed, on graphs whose arithmetic does not depend on the packing."""
    ort.set_default_logger_severity(3)  # failures surface as exceptions with tokopt's message
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # ORT fuses DequantizeLinear + MatMul into MatMulNBits and would then quantize the
    # activations to int8 (its default accuracy level 4): keep the float math the bundle promises
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        so.intra_op_num_threads = threads
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so
