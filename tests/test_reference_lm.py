"""The shipped reference LM: trained weights, real held-out text, through tokopt end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch

import tokopt
from tokopt.cli import main

from .conftest import REFERENCE_LM


@pytest.fixture(scope="module")
def lm():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_LM, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(REFERENCE_LM, local_files_only=True)
    return model, tok


def test_architecture(lm):
    cfg = lm[0].config
    assert cfg.model_type == "llama" and cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.num_hidden_layers in range(4, 7) and cfg.max_position_embeddings >= 1024
    assert (REFERENCE_LM / "model.safetensors").stat().st_size < 20e6


def test_heldout_perplexity_beats_ngram_baselines(lm):
    """The first 4 held-out windows of 1024 tokens; the full number is in eval.json
    (`python scripts/train_reference_lm.py --eval-only` recomputes it)."""
    model, tok = lm
    stated = json.loads((REFERENCE_LM / "eval.json").read_text())
    ids = torch.tensor(tok((REFERENCE_LM / "heldout.txt").read_text())["input_ids"][: 4 * 1024 + 1])
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, 4 * 1024, 1024):
            chunk = ids[i:i + 1025]
            logits = model(chunk[None, :-1]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
            n += 1024
    ppl = math.exp(nll / n)
    assert ppl < stated["bigram_ppl"] / 2, (ppl, stated)
    assert stated["heldout_ppl"] < stated["bigram_ppl"] < stated["unigram_ppl"]


@pytest.mark.slow
def test_compile_reference_lm(tmp_path, capsys):
    res = tokopt.compile(REFERENCE_LM, out=tmp_path / "b", generate=False, calib=REFERENCE_LM / "heldout.txt",
                         bench_runs=0, bench_len=256, threads=1)   # quality on real text, no timing
    q = res.report["quality"]
    assert q["top1_agreement"] == 1.0 and q["logit_kl"] < 1e-8
    assert q["perplexity_bundle"] == pytest.approx(q["perplexity_original"], rel=1e-5)
    assert res.report["passes"][0]["stats"]["gqa_folded"] == 4
    assert main(["run", str(res.bundle), "--text", "def main():\n    return"]) == 0
    assert "next token" in capsys.readouterr().out
