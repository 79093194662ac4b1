"""--max-drop: the recipe search (Optuna) over the passes' knobs within a quality budget."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

import tokopt
from tokopt.cli import main
from tokopt.optimizer.errors import UsageError
from tokopt.optimizer.search import Space, _choose, _summary, new_study, parse_budget, parse_duration


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, minilm_dir):
    """A config-built 4-layer BERT with MiniLM's tokenizer (random weights: the search's plumbing)."""
    import torch
    import transformers as tf
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "bert"
    tf.BertModel(tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                               vocab_size=30522, max_position_embeddings=512)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_dir / name).exists():
            shutil.copy2(minilm_dir / name, path / name)
    return path


def test_budgets_parse_and_bad_ones_are_refused():
    assert parse_budget("cosine=0.002").limit == 0.002
    assert parse_budget("ppl=2%").limit == pytest.approx(0.02)
    assert parse_budget("top1=99%").limit == pytest.approx(0.01)
    assert parse_budget("spearman=0.995", "encoder").limit == pytest.approx(0.005)
    assert parse_duration("20m") == 1200 and parse_duration("90s") == 90 and parse_duration(30) == 30
    with pytest.raises(UsageError, match="metric of cosine, spearman, ppl, kl, top1.*Did you mean 'cosine'"):
        parse_budget("cosin=0.1")
    with pytest.raises(UsageError, match="this model is a encoder, which has no relative perplexity increase; use "
                                         "cosine, spearman"):
        parse_budget("ppl=2%", "encoder")
    with pytest.raises(UsageError, match="'two' is not a number"):
        parse_budget("kl=two")
    with pytest.raises(UsageError, match="the drop must be in"):
        parse_budget("cosine=1.5")
    with pytest.raises(UsageError, match="give a duration"):
        parse_duration("soon")


def test_proposals_are_seeded(tiny_encoder):
    """The sampler's proposals depend on the seed and the measurements only: two studies with one
    seed told the same (synthetic, deterministic) costs propose the same recipes, past the anchors
    into TPE's own proposals; another seed proposes others."""
    space = Space(tokopt.capture(tiny_encoder), ["onnxruntime", "openvino"])

    def run(seed: int) -> list[tuple[str, str]]:
        study, seen = new_study(space, seed), []
        for _ in range(24):
            trial = study.ask()
            recipe = space.recipe(trial)
            seen.append(recipe)
            drop = 0.01 * recipe[0].count("rsq") + 0.02 * recipe[0].count("token_prune")
            trial.set_user_attr("excess", drop - 0.015)
            study.tell(trial, [10.0 - 3 * recipe[0].count(",") - (recipe[1] == "openvino"), drop])
        return seen
    first = run(7)
    assert first == run(7) and first != run(8)
    assert first[0] == ("canonicalize", "onnxruntime") and first[1] == ("rsq:bits=8,act_bits=8", "onnxruntime")
    assert len(set(first)) > len(space.anchors())   # the sampler went past the anchors


def test_max_drop_with_passes_is_refused(tmp_path, tiny_encoder):
    with pytest.raises(UsageError, match="--max-drop searches the passes itself"):
        tokopt.compile(tiny_encoder, out=tmp_path / "b", max_drop="cosine=0.01", passes="rsq")
    with pytest.raises(UsageError, match="this model is a encoder"):
        tokopt.compile(tiny_encoder, out=tmp_path / "b", max_drop="kl=0.01", search_trials=1)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_search_respects_the_budget_and_replays(tmp_path, tiny_encoder, capsys):
    """Three trials (the anchors: no pass, W8A8, int8 weights on int8 compute) with a budget some
    candidates meet: the bundle's recipe is the smallest within the budget, within it on the
    held-out split too, and replays from recipe.yaml. The same candidates under a zero budget
    choose the no-pass recipe, saying how close a recipe with a pass came."""
    kw = dict(optimize="size", search_trials=3, seed=3, backend="onnxruntime", bench_runs=3, measure=False)
    a = tokopt.compile(tiny_encoder, out=tmp_path / "a", max_drop="cosine=0.05", **kw)
    ra = json.loads((a.bundle / "search.json").read_text())
    assert [c["passes"] for c in ra["candidates"]] == ["canonicalize", "rsq:bits=8,act_bits=8", "rsq:bits=8,compute=int8"]
    chosen = ra["chosen"]
    assert chosen["drops"]["cosine"] <= 0.05
    assert chosen["passes"] == "canonicalize" or chosen["held_out"]["drops"]["cosine"] <= 0.05
    sizes = [c["size_bytes"] for c in ra["candidates"] if "drops" in c and c["drops"]["cosine"] <= 0.05]
    assert chosen["size_bytes"] == min(sizes) or chosen["passes"] == "canonicalize"
    assert a.report["search"]["chosen"] == f"onnxruntime: {chosen['passes']}"
    recipe = yaml.safe_load((a.bundle / "recipe.yaml").read_text())
    assert isinstance(recipe["passes"], list)
    replay = tokopt.compile(tiny_encoder, out=tmp_path / "r", recipe=a.bundle / "recipe.yaml", measure=False)
    assert [p["name"] for p in replay.manifest["passes"]] == [p["name"] for p in a.manifest["passes"]]
    assert main(["inspect", str(a.bundle)]) == 0
    out = capsys.readouterr().out
    assert "search: cosine=0.05, size, 3 trials" in out and "front (search split)" in out

    # a zero budget: only the no-pass candidate keeps its bundle (search's _evaluate), and is chosen
    zero = parse_budget("cosine=0")
    candidates = {(c["passes"], c["backend"]): {**{k: v for k, v in c.items() if k not in ("passes", "backend")},
                                                **({"_dir": "kept"} if c["passes"] == "canonicalize" else {})}
                  for c in ra["candidates"]}
    key, _ = _choose(candidates, zero, "size", None, None, 128, 3, None)
    assert key == ("canonicalize", "onnxruntime")
    record = {**ra, "budget": {"metric": "cosine", "limit": 0.0, "text": "cosine=0"},
              "chosen": {"passes": key[0], "backend": key[1], **candidates[key]}}
    assert "no recipe with a pass met cosine=0; the closest was onnxruntime: rsq" in _summary(record)["no_pass_met_it"]
