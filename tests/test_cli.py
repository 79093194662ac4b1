"""The CLI as a user meets it: exit codes, one-paragraph errors, nothing written on failure."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tokopt.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, " ".join(err.split())  # the message is wrapped to the terminal; unwrap it


def test_passes_and_targets(capsys):
    """Every option of every pass is listed with its default, one line of help and its values."""
    from tokopt.optimizer.pass_manager import PASSES, describe_options
    code, out, _ = _run(capsys, "passes")
    assert code == 0 and "canonicalize" in out
    for cls in PASSES.values():
        for o in describe_options(cls):
            assert o["help"] and o["values"], f"{cls.name}:{o['name']} has no help or no values"
            assert f"    {o['name']}=" in out
    assert ("    score=auto  how a token's importance is read (auto: cls, or last in a causal model); values: "
            "auto|cls|last|mean|debiased|head_weighted|diverse") in out
    assert "    layers=1  layers after which tokens are cut" in out and "compact=true" in out
    code, out, _ = _run(capsys, "targets")
    assert code == 0 and "x86-cpu" in out and "tensorrt" in out


@pytest.mark.slow
def test_inspect_model_and_bundle(capsys, model_dir, tmp_path):
    code, out, _ = _run(capsys, "inspect", str(model_dir("llama")))
    assert code == 0 and "2 attention blocks recognised" in out and "model.layers.1.self_attn" in out
    code, out, _ = _run(capsys, "compile", str(model_dir("llama")), "--out", str(tmp_path / "b"),
                        "--bench-runs", "2", "--bench-len", "32", "--quiet", "--no-generate")
    assert code == 0 and "logit kl" in out and "top1 agreement" in out and "median ms" in out
    code, out, _ = _run(capsys, "inspect", str(tmp_path / "b"))
    assert code == 0 and "onnxruntime / x86-cpu" in out and "logits float32 ['batch', 'sequence', 256]" in out
    code, out, _ = _run(capsys, "run", str(tmp_path / "b"), "--input-ids", "5,6,7", "--json")
    assert code == 0 and len(json.loads(out)["next_token"]) == 5


@pytest.mark.parametrize("argv,code,message", [
    (["--passes", "canonicalise"], 2, "Did you mean 'canonicalize'"),
    (["--passes", "canonicalize:foo=1"], 2, "has no option 'foo'"),
    (["--target", "cuda"], 6, "CUDAExecutionProvider"),
    (["--backend", "tensorrt"], 6, "TensorRT"),
    (["--backend", "onnxrt"], 2, "Did you mean 'onnxruntime'"),
    (["--max-seq-len", "100000"], 2, "max_position_embeddings"),
    (["--calib", "/nonexistent/calib.txt"], 2, "does not exist"),
    (["--bench-runs", "-1"], 2, "bench_runs=-1, bench_len=128: bench_runs must be 0 or more"),
    (["--bench-len", "0"], 2, "bench_len at least 1"),
    (["--max-drop", "cosine=0.01", "--bench-runs", "0"], 2, "--max-drop times every candidate"),
    (["--threads", "-3"], 2, "threads=-3: give a positive number"),
    (["--bench-time", "0"], 2, "--bench-time 0.0: give the seconds"),
    (["--max-memory", "lots"], 2, "--max-memory 'lots': give a size such as 16GB"),
    (["--max-memory", "1MB"], 2, "is the --max-memory budget"),
    (["--static-shapes"], 2, "--static-shapes: the onnxruntime backend runs one model for every input shape"),
])
def test_bad_options(capsys, model_dir, tmp_path, argv, code, message):
    if "cuda" in argv or "tensorrt" in argv:
        import importlib.util

        import onnxruntime as ort
        if "CUDAExecutionProvider" in ort.get_available_providers() or importlib.util.find_spec("tensorrt"):
            pytest.skip("this machine has the GPU stack")
    got, _, err = _run(capsys, "compile", str(model_dir("llama")), "--out", str(tmp_path / "b"), *argv)
    assert got == code and message in err, err
    assert not (tmp_path / "b").exists()


def _damaged(src, tmp_path, how):
    bad = tmp_path / how
    shutil.copytree(src, bad)
    if how == "truncated":
        w = bad / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    elif how == "no-config":
        (bad / "config.json").unlink()
    elif how == "pickle":
        import torch
        from safetensors.torch import load_file
        torch.save(load_file(bad / "model.safetensors"), bad / "pytorch_model.bin")
        (bad / "model.safetensors").unlink()
    elif how == "unknown-arch":
        cfg = json.loads((bad / "config.json").read_text())
        cfg.update(model_type="frobnicator", architectures=["FrobnicatorForCausalLM"])
        (bad / "config.json").write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize("how,code,message", [
    ("truncated", 3, "truncated or corrupt"),
    ("no-config", 3, "no config.json"),
    ("pickle", 3, "--trust-pickle"),
    ("unknown-arch", 4, "does not know this model type"),
])
def test_bad_models(capsys, model_dir, tmp_path, how, code, message):
    bad = _damaged(model_dir("llama"), tmp_path, how)
    got, _, err = _run(capsys, "compile", str(bad), "--out", str(tmp_path / "b"))
    assert got == code and message in err, err
    assert not (tmp_path / "b").exists()


def test_trust_pickle_allows_bin(capsys, model_dir, tmp_path):
    bad = _damaged(model_dir("llama"), tmp_path, "pickle")
    got, out, err = _run(capsys, "compile", str(bad), "--out", str(tmp_path / "b"), "--trust-pickle",
                         "--no-measure", "--quiet")
    assert got == 0, err


@pytest.mark.slow
def test_console_script_end_to_end(model_dir, tmp_path):
    """The installed `tokopt` entry point, as a shell user runs it."""
    exe = shutil.which("tokopt") or pytest.skip("console script not on PATH")
    out = tmp_path / "bert.bundle"
    r = subprocess.run([exe, "compile", str(model_dir("bert")), "--out", str(out), "--json",
                        "--bench-runs", "2", "--bench-len", "16"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["quality"]["embedding_cosine"] > 0.9999
    r = subprocess.run([exe, "compile", str(model_dir("bert")), "--out", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2 and "already exists" in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "tokopt.cli", "run", str(out), "--input-ids", "11,12,13"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "mean-pooled embedding" in r.stdout, r.stderr
