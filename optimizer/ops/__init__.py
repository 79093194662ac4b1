"""The tokopt op set (see ``registry.py`` for the contract). Importing this package defines every
op: the canonical attention, TCA's sparse attention and its compacting cache, STILL's hybrid
attention, the low-bit matmul and embedding, EdgeQAT's quantizers and the token scores; beside
them the value taps that passes and calibration share."""
from .registry import (OPS, OPSET, AttentionArgs, OpSpec, attention_spec, decompose, define_op, differentiable,
                       is_exact, kernel, onnx_translation_table, register_kernel, round_values, rounding_jitter, standardize)
from .attention import ATTENTION, attention_reference, expand_kv
from .gqa import CACHED_ATTENTION
from .int8 import LINEAR_W8A8
from .nbits import BITS, EMBEDDING_Q8, MATMUL_NBITS
from .quantizers import ACT_QUANT, LOW_TOKENS, TOKEN_QUANT, WEIGHT_QUANT
from .still import STILL
from .taps import Tap
from .tca import TCA, TCA_CACHE
from .tca_keep import TCA_KEEP, TCA_KEEP_PACKED
from .token_scores import TOKEN_SCORES

__all__ = ["OPS", "OPSET", "AttentionArgs", "OpSpec", "attention_spec", "decompose", "define_op", "differentiable",
           "is_exact", "kernel", "onnx_translation_table", "register_kernel", "round_values", "rounding_jitter", "standardize",
           "ATTENTION", "attention_reference", "expand_kv", "CACHED_ATTENTION", "LINEAR_W8A8", "BITS", "EMBEDDING_Q8", "MATMUL_NBITS", "ACT_QUANT",
           "LOW_TOKENS", "TOKEN_QUANT", "WEIGHT_QUANT", "STILL", "Tap", "TCA", "TCA_CACHE", "TCA_KEEP", "TCA_KEEP_PACKED",
           "TOKEN_SCORES"]
