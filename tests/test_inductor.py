"""The Inductor backend: the post-pass graph as an AOTInductor package (``model.pt2``), C++ kernels on
the CPU here, run at shapes the export never saw and compared with the ONNX Runtime bundle of the
same program; what it cannot serve is refused before any work. The C++ builds are slow: the
package tests are marked slow and kept few."""
from __future__ import annotations

import json
import platform

import numpy as np
import pytest
import torch

import tokopt
from tokopt.backends.inductor import InductorRunner
from tokopt.backends.triton import graph_ops, register_cuda_kernels
from tokopt.cli import main
from tokopt.optimizer.errors import BackendError, BundleError
from tokopt.optimizer.ops import OPS

from .conftest import feed_for
from .helpers import package_text

NO_GPU = "no CUDA GPU here: the Triton kernels of a --target cuda package are built and checked on a GPU only"


def test_what_inductor_cannot_serve_is_refused_before_work(tmp_path, model_dir, capsys):
    """A GPU target without a GPU, a target of another architecture, a target no Inductor device
    serves: each a BackendError before the model is read, nothing written."""
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="torch sees none on this machine"):
            tokopt.compile(model_dir("bert"), out=tmp_path / "a", backend="inductor", target="cuda")
    with pytest.raises(BackendError, match="not one the inductor backend serves; choose one of x86-cpu, arm64-cpu"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "b", backend="inductor", target="tensorrt")
    other = "arm64-cpu" if platform.machine() in ("x86_64", "AMD64") else "x86-cpu"
    with pytest.raises(BackendError, match="Inductor builds C\\+\\+ for the machine it runs on"):
        tokopt.compile(model_dir("bert"), out=tmp_path / "c", backend="inductor", target=other)
    assert not any((tmp_path / n).exists() for n in "abc")
    assert main(["backends"]) == 0
    listed = capsys.readouterr().out
    assert "inductor     Inductor backend: Program -> an AOTInductor package" in listed


def test_still_is_refused_by_name_on_a_cpu(tmp_path, model_dir):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(10, 256, (8, 64)))
    with pytest.raises(BackendError, match="cannot take tokopt::still_attention on a CPU: decomposed, its chunking"):
        tokopt.compile(model_dir("llama"), out=tmp_path / "s", backend="inductor", calib=ids, measure=False,
                       passes="still:feature=none,top_k=16,chunk=16,steps=0,lora_steps=0,seq_len=64,"
                              "train_windows=4,eval_windows=2")
    assert not (tmp_path / "s").exists()


def test_gpu_kernels_keep_the_ops_schemas():
    """What a cuda package holds for each kernel (checked here on the CPU; the kernels run on a GPU
    only): matmul_nbits as a triton_op with the op's own arguments, traced into the package; TCA's
    and STILL's kernels as their op's CUDA implementation, called."""
    ops = graph_ops()
    assert set(ops) == {"tokopt::matmul_nbits"}
    ours = str(OPS["tokopt::matmul_nbits"].overload._schema)
    assert str(torch.ops.tokopt_triton.matmul_nbits.default._schema).replace("tokopt_triton::", "tokopt::") == ours
    assert set(register_cuda_kernels()) == {"tokopt::tca_attention", "tokopt::still_attention"}
    for name in ("tokopt::tca_attention", "tokopt::still_attention"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("tokopt::tca_cache_attention", "CUDA")


def test_runner_refuses_a_package_of_another_torch(tmp_path):
    manifest = {"inputs": [], "outputs": [], "versions": {"torch": "2.1.0"},
                "lowering": {"model": "model.pt2", "device": "cpu"}}
    with pytest.raises(BundleError, match="built by torch 2.1.0.*Install torch==2.1.0, or recompile"):
        InductorRunner(tmp_path, manifest)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "vit"])
def test_package_matches_onnxruntime_at_unseen_shapes(family, tmp_path, model_dir, capsys):
    """Config-built BERT (through the CLI, measured) and ViT: the package runs at a batch and
    length never seen, within 1e-4 of the ONNX Runtime bundle and of eager; every tokopt op was
    decomposed into Inductor's own kernels (no call back into Python in the package). A Llama's
    packages (full forward and generation, trained weights): test_inductor_lm."""
    out = tmp_path / "ind"
    if family == "bert":
        assert main(["compile", str(model_dir(family)), "--backend", "inductor", "--out", str(out), "--bench-runs", "3",
                     "--bench-len", "16", "--quiet"]) == 0
        text = capsys.readouterr().out
        assert "median ms vs onnxruntime" in text
        report = json.loads((out / "report.json").read_text())
        assert report["latency"]["others"]["onnxruntime"]["median_ms"] > 0
        assert report["latency"]["baseline"]["median_ms"] > 0
    else:
        tokopt.compile(model_dir(family), out=out, backend="inductor", measure=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lowering"]["model"] == "model.pt2" and "model.pt2" in manifest["files"]
    assert manifest["lowering"]["ops"] == {"tokopt::attention": "decomposed"}
    assert "tokopt::" not in package_text(out)
    ort = tokopt.compile(model_dir(family), out=tmp_path / "ort", measure=False)
    feed = {k: v.numpy() for k, v in feed_for(family, 3, 29).items()}
    got, want = tokopt.load(out)(**feed), tokopt.load(ort.bundle)(**feed)
    with torch.no_grad():
        eager = ort.program.module(**{k: torch.from_numpy(v) for k, v in feed.items()})
    main_out = "logits" if "logits" in got else "last_hidden_state"
    keep = feed["attention_mask"].astype(bool) if "attention_mask" in feed else np.ones(got[main_out].shape[:2], bool)
    assert np.abs(got[main_out] - want[main_out])[keep].max() < 1e-4
    assert np.abs(got[main_out] - eager[main_out].numpy())[keep].max() < 1e-4
    if family == "bert":   # a package is tied to its torch: another version is refused by name
        manifest["versions"]["torch"] = "2.1.0"
        (out / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match="built by torch 2.1.0"):
            tokopt.load(out)


@pytest.mark.slow
def test_w8a8_runs_on_onednn_int8_linears(tmp_path, model_dir):
    """rsq's W8A8 linears become oneDNN int8 linears inside the package (every one of them: counted
    in the package's C++) and stay within the closeness of the ONNX Runtime bundle of the same program,
    whose integer kernels round the same way."""
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(10, 256, (8, 64)))
    passes = "rsq:bits=8,act_bits=8,solver=rtn,importance=none,rotate=off,samples=8"
    ind = tokopt.compile(model_dir("bert"), out=tmp_path / "i", backend="inductor", passes=passes, calib=ids,
                         measure=False)
    linears = ind.manifest["lowering"]["int8_linears"]
    assert linears["rewritten"] == ind.program.count("tokopt.linear_w8a8.default") > 0
    assert linears["qlinear_calls"] == linears["rewritten"]
    ort = tokopt.compile(model_dir("bert"), out=tmp_path / "o", passes=passes, calib=ids, measure=False)
    feed = {k: v.numpy() for k, v in feed_for("bert", 3, 29).items()}
    got, want = tokopt.load(ind.bundle)(**feed), tokopt.load(ort.bundle)(**feed)
    ref = ind.program.run({k: torch.from_numpy(v) for k, v in feed.items()})
    keep = feed["attention_mask"].astype(bool)
    err_ind = np.abs(got["last_hidden_state"] - ref["last_hidden_state"].numpy())[keep]
    err_ort = np.abs(want["last_hidden_state"] - ref["last_hidden_state"].numpy())[keep]
    assert err_ind.mean() < 2 * err_ort.mean() + 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_cuda_package_calls_the_triton_kernels(tmp_path, model_dir):
    """On a GPU: TCA and RSQ's int4 matmul run as Triton kernels inside the package and match the
    CPU package of the same program."""
    passes = "tca:uniform=0.5,window=16,rsq:solver=rtn,importance=none,rotate=off,group_size=16,compute=float"
    gpu = tokopt.compile(model_dir("llama"), out=tmp_path / "g", backend="inductor", target="cuda", passes=passes,
                         measure=False)
    cpu = tokopt.compile(model_dir("llama"), out=tmp_path / "c", backend="inductor", passes=passes, measure=False)
    assert gpu.manifest["lowering"]["ops"]["tokopt::tca_attention"] == "triton kernel, called"
    assert gpu.manifest["lowering"]["ops"]["tokopt::matmul_nbits"] == "triton kernel, in the package"
    feed = {k: v.numpy() for k, v in feed_for("llama", 2, 45).items()}
    got, want = tokopt.load(gpu.bundle)(**feed)["logits"], tokopt.load(cpu.bundle)(**feed)["logits"]
    assert np.abs(got - want).max() < 1e-3
