"""ARM code on this x86 machine: a bundle run by the aarch64 builds of Python, numpy and ONNX
Runtime under qemu's user-mode emulation (``qemu-aarch64-static``, Debian's ``qemu-user-static``).

``setup()`` assembles the emulated side once, into a cache folder (``TOKOPT_EMULATOR_DIR``, else
``~/.cache/tokopt-emulator``): Debian's aarch64 Python 3.11 and the C libraries it links, fetched
with ``apt-get download`` against a private package state (the system's is untouched), and the
aarch64 wheels of the numpy and onnxruntime versions installed here (``pip download --platform``).
ONNX Runtime detects the CPU from ``/proc/cpuinfo``, which under qemu-user is the x86 host's,
and crashes on it; qemu resolves absolute paths under its ``-L`` root first, so an ARM Neoverse
N1's ``/proc/cpuinfo`` sits there, matching ``-cpu neoverse-n1`` (dot product, fp16 arithmetic).

``run()`` executes ``emulated_run.py`` there: the bundle's model on the given feeds, with the
session settings every tokopt runner uses, and returns the outputs and the kernels that ran.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..optimizer.errors import BackendError

__all__ = ["emulator_dir", "ready", "setup", "run", "missing"]

QEMU = "qemu-aarch64-static"
CPU = "neoverse-n1"
_DEBS = ("python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libstdc++6 libgcc-s1 zlib1g libexpat1 "
         "libffi8 libssl3 libbz2-1.0 liblzma5 libuuid1 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libcrypt1 "
         "libgomp1").split()
_PYTHON = "usr/bin/python3.11"
_FEATURES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp "
             "ssbs")


def _versions() -> dict[str, str]:
    import onnxruntime
    return {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def emulator_dir() -> Path:
    """The emulated side for the installed numpy and onnxruntime versions."""
    base = Path(os.environ.get("TOKOPT_EMULATOR_DIR") or Path.home() / ".cache" / "tokopt-emulator")
    v = _versions()
    return base / f"aarch64-ort{v['onnxruntime']}-np{v['numpy']}"


def missing() -> str | None:
    """Why a bundle cannot be run on emulated ARM code here, or None."""
    if shutil.which(QEMU) is None:
        return (f"{QEMU} is not installed: install Debian's qemu-user-static (apt-get install qemu-user-static), "
                "then run `tokopt verify --setup`.")
    if not (emulator_dir() / "ready.json").exists():
        return (f"the emulated aarch64 Python and ONNX Runtime are not set up in {emulator_dir()}: run "
                "`tokopt verify --setup` once (it downloads about 50 MB from Debian and PyPI).")
    return None


def ready() -> bool:
    return missing() is None


def _call(cmd: list[str], what: str, **kw) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BackendError(f"{what} failed: {' | '.join(tail)}")


def setup(progress=print) -> Path:
    """Assemble the emulated side (idempotent); returns its folder."""
    if shutil.which(QEMU) is None:
        raise BackendError(f"{QEMU} is not installed: install Debian's qemu-user-static "
                           "(apt-get install qemu-user-static) and run this again.")
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise BackendError("setting up the emulator needs apt-get and dpkg (a Debian or Ubuntu machine): the "
                           "aarch64 Python comes from Debian's packages.")
    root = emulator_dir()
    if (root / "ready.json").exists():
        return root
    work = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent if root.parent.exists() else None))
    try:
        state = work / "apt"
        for d in ("lists/partial", "cache/archives/partial", "debs"):
            (state / d).mkdir(parents=True)
        (state / "status").touch()
        apt = ["apt-get", "-q", "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
               "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::State::status={state / 'status'}",
               "-o", f"Dir::Cache={state / 'cache'}", "-o", "Debug::NoLocking=1"]
        progress("emulator: fetching Debian's aarch64 Python 3.11")
        _call([*apt, "update"], "apt-get update (arm64 package lists)")
        _call([*apt, "download", *_DEBS], "apt-get download (aarch64 Python)", cwd=state / "debs")
        sysroot = work / "root"
        for deb in sorted((state / "debs").glob("*.deb")):
            _call(["dpkg", "-x", str(deb), str(sysroot)], f"dpkg -x {deb.name}")
        v = _versions()
        progress(f"emulator: fetching the aarch64 wheels of onnxruntime {v['onnxruntime']} and numpy {v['numpy']}")
        wheels = work / "wheels"
        _call([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.11", "--implementation", "cp", *[a for p in ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64",
                                                               "manylinux2014_aarch64") for a in ("--platform", p)],
               "-d", str(wheels), f"onnxruntime=={v['onnxruntime']}", f"numpy=={v['numpy']}"],
              "pip download (aarch64 wheels)")
        for wheel in wheels.glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(work / "site")
        (sysroot / "proc").mkdir(exist_ok=True)
        (sysroot / "proc" / "cpuinfo").write_text("".join(
            f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {_FEATURES}\nCPU implementer\t: 0x41\n"
            "CPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n" for i in range(2)))
        shutil.rmtree(state)
        shutil.rmtree(wheels)
        (work / "ready.json").write_text(json.dumps({"cpu": CPU, "python": "Debian bookworm python3.11", **v}) + "\n")
        probe = _emulate(work, ["-c", "import numpy, onnxruntime; print(onnxruntime.__version__)"])
        if probe.returncode != 0:
            raise BackendError(f"the emulated Python cannot import onnxruntime: {probe.stderr.strip()[-300:]}")
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        work.rename(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"emulator: ready in {root}")
    return root


def _emulate(root: Path, args: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(root / "site"), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([QEMU, "-cpu", CPU, "-L", str(root / "root"), str(root / "root" / _PYTHON), "-S", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def run(model: Path, feeds: list[dict[str, np.ndarray]]) -> tuple[list[list[np.ndarray]], dict]:
    """``model`` (.onnx or .ort) run on emulated ARM code on each feed: (outputs per feed, info: the
    model file, machine, versions, seconds, and the kernels ONNX Runtime's aarch64 build ran, per
    node type)."""
    why = missing()
    if why:
        raise BackendError(f"cannot run on emulated ARM code: {why}")
    here = Path(__file__).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the script and the session settings, copied beside the data (qemu's root hides nothing else)
        for name in ("emulated_run.py", "ort_options.py", "windowed_cache.py", "lengths.py"):
            shutil.copy2(here / name, tmp / name)
        np.savez(tmp / "feeds.npz", **{f"{i}/{k}": v for i, feed in enumerate(feeds) for k, v in feed.items()})
        proc = _emulate(emulator_dir(), [str(tmp / "emulated_run.py"), str(Path(model).resolve()), str(tmp / "feeds.npz"),
                                         str(tmp / "out.npz"), str(tmp / "info.json")])
        if proc.returncode != 0:
            raise BackendError(f"the bundle failed on emulated ARM code: {(proc.stderr or proc.stdout).strip()[-500:]}")
        out = np.load(tmp / "out.npz")
        info = {"model": Path(model).name, **json.loads((tmp / "info.json").read_text())}
        outputs = [[out[f"{i}/{j}"] for j in range(sum(1 for k in out.files if k.startswith(f"{i}/")))]
                   for i in range(len(feeds))]
    return outputs, info
