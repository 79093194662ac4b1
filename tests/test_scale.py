"""Compiles sized for big models: weights streamed to external data, the cost of each stage in the
report, bounded timing, half-precision checkpoints, and models refused before they are read."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import tokopt
from tokopt.backends import onnxruntime as ort_backend
from tokopt.optimizer import compile as compile_module
from tokopt.optimizer.errors import UsageError
from tokopt.optimizer.report import format_report, time_calls
from tokopt.optimizer.resources import check_disk, checkpoint_bytes, parse_bytes, stage

from .conftest import _tiny, feed_for

pytestmark = pytest.mark.fresh_capture   # what capture makes and costs, every time


def _outputs(bundle, feed):
    return tokopt.load(bundle)(**{k: v.numpy() for k, v in feed.items()})


def test_external_weights_give_the_same_bundle(model_dir, tmp_path, monkeypatch):
    """The streamed layout (weights in model.onnx.data, written tensor by tensor at aligned
    offsets) runs bit-identically to the one-file layout."""
    folder = model_dir("llama")
    one = tokopt.compile(folder, out=tmp_path / "one", measure=False)
    monkeypatch.setattr(ort_backend, "EXTERNAL_BYTES", 0)
    streamed = tokopt.compile(folder, out=tmp_path / "streamed", measure=False)
    assert not (one.bundle / "model.onnx.data").exists()
    weights = sum(p.numel() * 4 for p in _tiny("llama").parameters())
    assert (streamed.bundle / "model.onnx.data").stat().st_size > 0.9 * weights
    moved = (one.bundle / "model.onnx").stat().st_size - (streamed.bundle / "model.onnx").stat().st_size
    assert moved > 0.9 * weights   # the graph file no longer holds them
    feed = feed_for("llama", 2, 11)
    a, b = _outputs(one.bundle, feed), _outputs(streamed.bundle, feed)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_stage_peaks_nest():
    """A stage's peak is what it allocated, not the process's; the enclosing stage keeps it."""
    rows = []
    with stage("outer", rows):
        with stage("inner", rows):
            block = np.ones(50 * 2**20 // 8)   # 50 MiB, touched
            del block
        with stage("after", rows):
            pass
    inner, after, outer = rows
    assert inner["peak_rss_bytes"] - after["peak_rss_bytes"] > 40 * 2**20
    assert outer["peak_rss_bytes"] >= inner["peak_rss_bytes"]
    assert [r["stage"] for r in rows] == ["inner", "after", "outer"]


def test_report_has_each_stage_and_times_within_budget(model_dir, tmp_path, monkeypatch):
    """Above the size limit the plain-export baseline is not built and the report says why, and the
    probe has 2 rows;
    every stage (capture, each pass, lowering, measurement) has its time and peak memory."""
    monkeypatch.setattr(compile_module, "LARGE_BYTES", 0)
    res = tokopt.compile(model_dir("llama"), out=tmp_path / "b", generate=False, bench_runs=50, bench_time=1e-4, threads=1)
    r = res.report
    assert [row["stage"] for row in r["stages"]["rows"]] == ["capture", "pass canonicalize", "lowering", "measurement"]
    assert all(row["seconds"] > 0 and row["peak_rss_bytes"] > 100 * 2**20 for row in r["stages"]["rows"])
    model = _tiny("llama")
    assert r["stages"]["weights_bytes"] == sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    assert "baseline" not in r["latency"] and "GiB" in r["baseline_skipped"]
    assert r["quality"]["probe"].startswith("synthetic inputs (batch 2,")
    assert r["latency"]["tokopt"]["runs"] == 3   # the fewest once the budget is spent
    text = format_report(r)
    assert "baseline not measured" in text and "lowering" in text and "cost per stage" in text


def test_time_calls_stops_at_its_budget():
    got = time_calls(lambda: time.sleep(0.02), runs=100, warmup=1, settle=0, budget=0.1)
    assert 3 <= got["runs"] <= 8 and got["median_ms"] >= 20


def test_half_precision_checkpoint_runs_as_fp32(tmp_path):
    """A bf16 checkpoint is compiled in fp32 (ONNX Runtime's CPU kernels) and the report says so;
    the bundle reproduces the bf16 weights widened to fp32."""
    model = _tiny("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    stored, as_fp32, _ = checkpoint_bytes(sorted((tmp_path / "bf16").glob("*.safetensors")))
    assert as_fp32 == 2 * stored
    res = tokopt.compile(tmp_path / "bf16", out=tmp_path / "b", measure=False)
    assert res.manifest["source"]["converted"] == "bfloat16 -> float32"
    # the fp32 weights are mapped from the widened copy on disk (so they can be paged out), not converted in memory
    weight = res.program.ep.state_dict["model.model.layers.0.mlp.up_proj.weight"]
    assert weight.dtype == torch.float32 and "tokopt-fp32-" in _mapping_of(weight.data_ptr())
    feed = feed_for("llama", 1, 9)
    with torch.no_grad():
        want = model.float()(**feed).logits.numpy()
    assert np.abs(_outputs(res.bundle, feed)["logits"] - want).max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_with_rsq_stays_half(tmp_path, monkeypatch, dtype):
    """Compiled with passes that replace its weights (rsq), a bf16 or fp16 checkpoint is not widened: the
    captured program holds the checkpoint's own bf16 tensors, mapped from its file, and the graph
    reads each through a cast to fp32 just before its reader, which the views see through (every
    linear is found). rsq
    rotates into fp32 as from widened weights, so the bundle is byte-identical to the widened path's."""
    from tokopt.passes.linears import linear_layers
    from tokopt.passes.rsq import RSQPass
    model = _tiny("llama").to(dtype)
    model.save_pretrained(tmp_path / "half")
    captured = tokopt.capture(tmp_path / "half", keep_half=True)
    weight = captured.ep.state_dict["model.model.layers.0.mlp.up_proj.weight"]
    assert weight.dtype == dtype and "model.safetensors" in _mapping_of(weight.data_ptr())
    body, heads = linear_layers(captured)
    assert len(body) == 14 and len(heads) == 1
    assert all(captured.tensor(n.args[1]).dtype == dtype for n in body)
    casts = [n for n in captured.graph.find_nodes(op="call_function", target=torch.ops.aten.to.dtype)
             if n.args[0].op == "placeholder"]
    # one cast per reader, just before it: a run widens one weight at a time
    assert len(casts) >= 15 and all(list(c.users) == [c.next] for c in casts)
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, (4, 64)))
    bundles = {}
    for half in (True, False):
        monkeypatch.setattr(RSQPass, "half_weights", half)
        monkeypatch.setenv("TOKOPT_CACHE_DIR", str(tmp_path / f"cache-{half}"))
        res = tokopt.compile(tmp_path / "half", out=tmp_path / f"b-{half}", calib=ids, measure=False,
                             passes="rsq:samples=4,seq_len=64,group_size=16,eval_windows=0")
        assert ("half_weights" in res.manifest["source"]) == half
        assert ("converted" in res.manifest["source"]) != half
        bundles[half] = (res.bundle / "model.onnx").read_bytes()
    assert bundles[True] == bundles[False]


def _mapping_of(address: int) -> str:
    for line in open("/proc/self/maps"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= address < hi:
            return line
    return ""


def test_too_big_refused_before_reading(model_dir, tmp_path):
    with pytest.raises(UsageError, match=r"weights are 0\.0 GiB as fp32 .* 1\.5 times that .* is the --max-memory budget"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "b", max_memory="64MB")
    assert not (tmp_path / "b").exists()
    # an int4 bundle's runtime holds (4 + 1)/32 of the fp32 weights, not the whole of them
    with pytest.raises(UsageError, match=r"0\.23 times that"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "c", max_memory="64MB", passes="rsq:bits=4")


@pytest.mark.parametrize("bad", ["lots", "-1GB", "12XB", "0"])
def test_bad_memory_budget(model_dir, tmp_path, bad):
    with pytest.raises(UsageError, match="give a size such as 16GB"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "b", max_memory=bad)


def test_sizes_parse():
    assert parse_bytes("16GB") == 16 * 2**30 and parse_bytes("512m") == 512 * 2**20 and parse_bytes("2.5G") == 2.5 * 2**30


def test_too_little_disk(tmp_path):
    with pytest.raises(UsageError, match="GiB of disk and .* GiB free"):
        check_disk(tmp_path / "not" / "yet", 2**60, "the bundle")


def test_bench_time_must_be_positive(model_dir, tmp_path):
    with pytest.raises(UsageError, match="--bench-time 0"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "b", bench_time=0)


def _resident_of(path) -> int:
    """Bytes of ``path``'s mappings in this process's resident set."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def test_page_out_releases_mapped_weights(tmp_path):
    """A folder's weights are mapped from its safetensors file; paged out, or released by a run
    (capture's eager one too) after each weight's last reader, they leave the resident set and
    come back unchanged when the program runs again."""
    import transformers
    from tokopt.optimizer.capture import capture
    from tokopt.optimizer.resources import mapped_releaser, page_out
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=8000, max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    stored = file.stat().st_size
    program = capture(tmp_path / "m")
    assert _resident_of(file) < 0.05 * stored
    feed = feed_for("llama", 1, 13)
    before = program.run(feed)["logits"]
    assert _resident_of(file) > 0.7 * stored   # all but the embedding's unread rows
    page_out(program)
    assert _resident_of(file) < 0.1 * stored   # (the kernel keeps a few pages the file's writer left dirty)
    assert torch.equal(program.runner(release_mapped=True)(feed)["logits"], before)
    assert _resident_of(file) < 0.05 * stored
    assert torch.equal(program.run(feed)["logits"], before)
    assert _resident_of(file) > 0.7 * stored
    # memory that is not a file's stays: released, an anonymous tensor keeps its values
    t = torch.randn(1 << 20)
    kept = t.clone()
    mapped_releaser()(t)
    assert torch.equal(t, kept)


def _memory_cgroup(name: str):
    """A new cgroup-v1 memory group below this process's own (whose limits cap what its processes
    hold, page cache included), or None where this machine does not let one be made."""
    from tokopt.optimizer.resources import _memory_cgroups
    for folder in _memory_cgroups():
        if (folder / "memory.limit_in_bytes").exists():
            try:
                (folder / name).mkdir()
                return folder / name
            except OSError:
                return None
    return None


def _capped(group, cap: int, args: list[str]):
    """``tokopt args`` run in ``group`` capped at ``cap`` bytes; (process, peak bytes, times the cap was hit)."""
    import subprocess
    import sys
    (group / "memory.limit_in_bytes").write_text(str(cap))
    for f in ("memory.max_usage_in_bytes", "memory.failcnt"):
        (group / f).write_text("0")
    proc = subprocess.run(["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh", sys.executable,
                           "-m", "tokopt.cli", *args], capture_output=True, text=True, timeout=300)
    return proc, int((group / "memory.max_usage_in_bytes").read_text()), int((group / "memory.failcnt").read_text())


@pytest.mark.slow
def test_compiles_under_a_memory_cap_smaller_than_its_weights(tmp_path):
    """A 0.86 GB Llama compiles in a memory cgroup capped at 640 MiB (no measurement: measuring is
    ONNX Runtime's prepacked copy of the weights): torch and ONNX Runtime read the weights from
    mapped files, which the kernel pages out under the cap; none is copied where it cannot be. The
    same model under 400 MiB is refused before its weights are read."""
    import os

    import transformers
    group = _memory_cgroup(f"tokopt-test-{os.getpid()}")
    if group is None:
        pytest.skip("no memory cgroup (v1) can be made here to cap a compile")
    try:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=3,  # few layers: a quick export
                                          num_attention_heads=16, num_key_value_heads=4, vocab_size=8000,
                                          max_position_embeddings=512)
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
        checkpoint = tmp_path / "m" / "model.safetensors"
        cap = 640 * 2**20
        assert checkpoint.stat().st_size > 1.2 * cap
        fd = os.open(checkpoint, os.O_RDONLY)   # out of the page cache: read again, its pages count against the cap
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

        refused, _, _ = _capped(group, 400 * 2**20, ["compile", str(tmp_path / "m"), "--out", str(tmp_path / "r"),
                                                     "--no-measure"])
        said = " ".join(refused.stderr.split())
        assert refused.returncode == 2 and "0.8 GiB as fp32" in said and "are available" in said, said[-2000:]
        assert not (tmp_path / "r").exists()

        proc, peak, hits = _capped(group, cap, ["compile", str(tmp_path / "m"), "--out", str(tmp_path / "b"),
                                                "--no-measure"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert peak <= cap and hits > 0   # the cap bound: the kernel took pages back to stay under it
    finally:
        group.rmdir()
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    feed = feed_for("llama", 2, 37)
    with torch.no_grad():
        ref = model(**feed).logits.numpy()
    np.testing.assert_allclose(_outputs(tmp_path / "b", feed)["logits"], ref, atol=1e-4, rtol=0)
