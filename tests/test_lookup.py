"""Prompt lookup decoding: drafts from earlier in the text, verified in one call.

Proof: the tokens equal plain greedy decoding's, on the bound-buffer kernel path (drafts written
into the buffers and overwritten when rejected) and on the feed loop (rejected entries cut off),
with every emitted token's logits within 1e-4 of plain decoding's; structurally, fewer graph
calls than tokens and some calls several tokens wide. The trained reference LM's case is in
tests/test_generation.py (the CLI test).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import tokopt
from tokopt.cli import main
from tokopt.optimizer.errors import UsageError
from tokopt.optimizer.generation import Drafts, FeedDecoding, generate_ids

from .conftest import _tiny


def test_drafts_follow_the_latest_longest_match():
    text = [5, 6, 7, 1, 2, 5, 6, 9, 4, 5, 6]
    drafts = Drafts(text)
    # "5 6" occurs twice before the end; the latest is followed by 9 4 5 6
    assert drafts(3) == [9, 4, 5] and drafts(10) == [9, 4, 5, 6]
    text += [9, 4]   # the caller appends; "6 9 4" occurred once, followed by "5 6 9 4"
    assert drafts(8) == [5, 6, 9, 4]
    assert Drafts([1, 2, 3, 2])(2) == [3, 2]   # a 1-gram where no longer one occurs
    assert Drafts([1, 2, 3, 4])(5) == [] and Drafts([7])(5) == []


class _Counted:
    """A runner whose decoding counts the graph calls and the tokens each one feeds."""

    def __init__(self, run):
        self.run, self.widths = run, []

    def decoding(self, batch, capacity, drafts=False):
        inner, widths = self.run.decoding(batch, capacity, drafts), self.widths

        class Decoding:
            index, right_padded = True, getattr(inner, "right_padded", False)

            def __call__(self, ids, *a):
                widths.append(ids.shape[1])
                return inner(ids, *a)

            def every(self, ids, *a):
                widths.append(ids.shape[1])
                return inner.every(ids, *a)
        return Decoding()


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    model = _tiny("llama").eval()
    model.generation_config.eos_token_id = None
    return tokopt.compile(model, out=tmp_path_factory.mktemp("lookup") / "b", generate=True, measure=False)


def test_lookup_gives_greedy_tokens_in_fewer_calls(res):
    ids = np.tile(np.random.default_rng(5).integers(10, 256, 16), 4)[None]   # text that repeats itself
    run = tokopt.load(res.bundle)
    spec = run.cache_spec()
    want_logits, got_logits = [], []
    want = generate_ids(run, spec, ids, max_new_tokens=48, on_logits=want_logits.append)
    counted = _Counted(run)
    got = generate_ids(counted, spec, ids, max_new_tokens=48, prompt_lookup=6, on_logits=got_logits.append)
    np.testing.assert_array_equal(got, want)
    assert len(got_logits) == 48 and max(float(np.abs(a - b).max()) for a, b in zip(want_logits, got_logits)) < 1e-4
    calls = counted.widths[1:]   # after the prefill
    assert len(calls) < 47 and max(calls) > 1 and sum(calls) > len(calls)   # drafts fed and taken

    # the feed loop over the captured program: rejected entries are cut off the cache fed back
    prog = res.program
    step_run = prog.runner()

    def step(feed):
        return {k: v.numpy() for k, v in step_run({k: torch.as_tensor(np.asarray(v)) for k, v in feed.items()}).items()}
    plain = FeedDecoding(step, prog.cache)
    feed = _Counted(type("R", (), {"decoding": lambda self, b, c, drafts: plain})())
    np.testing.assert_array_equal(generate_ids(feed, prog.cache, ids, max_new_tokens=48, prompt_lookup=6), want)
    assert any(w > 1 for w in feed.widths[1:])
    # the CLI streams the same tokens
    assert main(["run", str(res.bundle), "--input-ids", ",".join(map(str, ids[0])), "--max-new-tokens", "48",
                 "--prompt-lookup", "6"]) == 0


def test_lookup_requests_that_cannot_be_served(res):
    run = tokopt.load(res.bundle)
    ids = np.arange(10, 20)[None]
    with pytest.raises(UsageError, match="prompt_lookup=4 cannot be used here: it drafts for one row at a time"):
        run.generate(input_ids=np.repeat(ids, 2, 0), max_new_tokens=4, prompt_lookup=4)
    with pytest.raises(UsageError, match="it is greedy: leave out do_sample"):
        run.generate(input_ids=ids, max_new_tokens=4, prompt_lookup=4, do_sample=True)
    with pytest.raises(UsageError, match="the number of tokens drafted per step, at least 1"):
        run.generate(input_ids=ids, max_new_tokens=4, prompt_lookup=-1)
    compacting = dataclasses.replace(run.cache_spec(), index=True)   # tca:select=step
    with pytest.raises(UsageError, match="compacts its cache every step .* cannot be taken back"):
        generate_ids(run, compacting, ids, max_new_tokens=4, prompt_lookup=4)
