"""The report on trained weights: the packaged MiniLM, real English passages."""
from __future__ import annotations

import json

import pytest

import tokopt
from tokopt.optimizer.data import default_texts


@pytest.fixture(scope="module")
def minilm_bundle(tmp_path_factory, minilm_dir):
    out = tmp_path_factory.mktemp("minilm") / "bundle"
    return tokopt.compile(minilm_dir, out=out, bench_runs=5, bench_len=64, threads=1)


def test_quality_on_real_text(minilm_bundle):
    q = minilm_bundle.report["quality"]
    assert "text passages" in q["probe"] and "padded" in q["probe"]
    # canonicalize is exact: the bundle's sentence embeddings are the original's
    assert q["embedding_cosine_min"] > 0.99999
    assert q["max_abs_error"]["last_hidden_state"] < 1e-4


def test_latency_and_size_measured_against_baseline(minilm_bundle):
    r = minilm_bundle.report
    lat = r["latency"]
    for side in ("tokopt", "baseline"):
        assert lat[side]["median_ms"] > 0 and lat[side]["p90_ms"] >= lat[side]["median_ms"]
        assert lat[side]["runs"] == 5
    assert lat["feed"]["input_ids"] == [1, 64]
    longer = r["latency_long"]  # the second length, where length-dependent passes show
    assert longer["feed"]["input_ids"] == [1, 256] and longer["tokopt"]["median_ms"] > lat["tokopt"]["median_ms"]
    assert 0.9 < r["size_bytes"]["tokopt"] / lat["size_bytes"]["baseline"] < 1.1
    assert r["passes"][0]["stats"]["attention_canonicalized"] == 6


def test_onnxruntime_fusions_applied_and_checked(minilm_bundle):
    lowering = minilm_bundle.manifest["lowering"]
    assert "fusions_rejected" not in lowering, lowering
    assert lowering["fusions"]["skip_layer_normalization"] >= 12


def test_report_files_and_table(minilm_bundle):
    on_disk = json.loads((minilm_bundle.bundle / "report.json").read_text())
    assert on_disk["quality"]["embedding_cosine"] == pytest.approx(minilm_bundle.report["quality"]["embedding_cosine"])
    table = str(minilm_bundle)
    for line in ("embedding cosine", "median ms", "p90 ms", "size MB", "pass canonicalize"):
        assert line in table
    assert (minilm_bundle.bundle / "tokenizer" / "tokenizer.json").exists()


def test_shipped_passages(minilm_bundle):
    """Two disjoint splits; calibration without --calib reads only the one reports do not."""
    from tokopt.optimizer.data import PASSAGES, token_source
    texts = default_texts()
    assert len(texts) >= 150
    assert all(40 <= len(t.split()) <= 200 for t in texts)
    evaluation, calib = default_texts("eval"), default_texts("calib")
    assert len(evaluation) + len(calib) == len(texts) and not set(evaluation) & set(calib)
    assert texts[::5] == evaluation
    assert token_source(minilm_bundle.program, "rsq", "")[0] == PASSAGES["calib"]


def test_runner_refuses_what_the_bundle_cannot_take(minilm_bundle, capsys):
    """Ids past the embedding table (read at capture: 30522 words) are refused by name, through
    the API and the CLI; asking an encoder to generate prints nothing first."""
    import numpy as np
    from tokopt.cli import main
    from tokopt.optimizer.errors import UsageError
    limits = {i["name"]: i.get("id_limit") for i in minilm_bundle.manifest["inputs"]}
    assert limits == {"input_ids": 30522, "attention_mask": None}
    run = tokopt.load(minilm_bundle.bundle)
    ones = np.ones((1, 3), np.int64)
    with pytest.raises(UsageError, match="'input_ids' holds 30522; .* 0..30521"):
        run(input_ids=np.array([[101, 30522, 102]]), attention_mask=ones)
    with pytest.raises(UsageError, match="'input_ids' holds -1"):
        run(input_ids=-ones, attention_mask=ones)
    assert main(["run", str(minilm_bundle.bundle), "--input-ids", "101,99999,102"]) == 2
    assert "holds 99999" in capsys.readouterr().err
    assert main(["run", str(minilm_bundle.bundle), "--text", "hello", "--max-new-tokens", "3"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "no decode graph" in out.err
