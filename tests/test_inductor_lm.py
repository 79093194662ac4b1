"""The inductor backend on the shipped reference LM (trained weights): TCA's op called inside the
package, RSQ's int4 matmul decomposed, and a generation package decoding like transformers. A
file of its own so that pytest-xdist runs it beside the other inductor tests."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tokopt

from .conftest import REFERENCE_LM
from .helpers import package_text


@pytest.mark.slow
def test_reference_lm_with_tca_rsq_and_generation(tmp_path):
    """Trained weights, on real text at a length the export never saw, against the program itself
    (what every ONNX Runtime bundle is checked against before it ships), TCA and RSQ stacked in
    one package: TCA's op stays one call of the registered CPU implementation (its key budgets
    size tensors by computed values); RSQ's int4 matmul (round-to-nearest, no calibration: the op
    is the point here) is decomposed; within 1% of the logits' range (the kernels sum the
    dequantized products in another order). A generation package decodes real text greedily
    token for token as transformers does. TCA's budgets are uniform: its calibration is
    test_tca's subject, the op inside the package this one's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(REFERENCE_LM, local_files_only=True)
    text = (REFERENCE_LM / "heldout.txt").read_text()[:2000]
    ids = tok(text, return_tensors="np")["input_ids"][:, :150]
    mask = np.ones((2, ids.shape[1]), np.int64)
    mask[1, -30:] = 0   # a padded row: its padding is masked, and not compared
    feed = {"input_ids": np.concatenate([ids, ids[:, ::-1]]), "attention_mask": mask}
    ind = tokopt.compile(REFERENCE_LM, out=tmp_path / "i", backend="inductor", measure=False, generate=False,
                         passes="tca:uniform=0.25,window=32,rsq:solver=rtn,importance=none,rotate=off")
    got = tokopt.load(ind.bundle)(**feed)["logits"]
    want = ind.program.run({k: torch.from_numpy(v) for k, v in feed.items()})["logits"].numpy()
    assert np.abs(got - want)[mask.astype(bool)].max() < 0.01 * float(np.abs(want).max())
    ops = ind.manifest["lowering"]["ops"]
    assert ops["tokopt::tca_attention"] == "torch reference, called" and ops["tokopt::matmul_nbits"] == "decomposed"
    assert "tokopt::tca_attention" in package_text(ind.bundle)
    gen = tokopt.compile(REFERENCE_LM, out=tmp_path / "g", backend="inductor", generate=True, measure=False)
    assert gen.manifest["lowering"]["ops"] == {"tokopt::attention": "decomposed"}
    assert "tokopt::" not in package_text(gen.bundle)   # no call back into Python in a Llama's package
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_LM, local_files_only=True).eval()
    model.generation_config.eos_token_id = None
    prompt = ids[:, :40]
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(prompt), max_new_tokens=32, do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(tokopt.load(gen.bundle).generate(input_ids=prompt, max_new_tokens=32), ref)
