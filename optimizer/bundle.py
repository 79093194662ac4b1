"""Bundles: a folder with the engine files, ``manifest.json`` and ``report.json``.

Written to a temporary sibling folder and renamed into place only when complete, so a failed or
interrupted compile leaves nothing behind; an existing folder is replaced only with ``force``
(and then only after the new bundle is complete). ``verify_bundle`` checks the manifest, every
file's sha256 and the versions before anything is run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from .errors import BundleError, UsageError
from .runtime import read_manifest

__all__ = ["FORMAT_VERSION", "check_out", "atomic_bundle", "write_manifest", "verify_bundle",
           "versions", "file_sha256"]

FORMAT_VERSION = 1
_VERSIONED = ("torch", "onnx", "onnxruntime", "onnxscript", "transformers", "triton", "tensorrt")


def versions() -> dict[str, str | None]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["onnxruntime"] is None:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out["onnxruntime"] = metadata.version("onnxruntime-gpu")
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UsageError(f"{out} already exists. Pass --force to replace it, or choose another --out.")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; tokopt will not replace a file.")


@contextlib.contextmanager
def atomic_bundle(out: Path, force: bool):
    """Yield a temporary folder; on success it becomes ``out``, on any failure it is removed."""
    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, data: dict) -> dict:
    """Add version, hash and bookkeeping fields to ``data`` and write manifest.json."""
    from .. import __version__
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir())
             if p.is_file() and p.name != "manifest.json"}
    files.update({f"{d.name}/{p.name}": file_sha256(p) for d in sorted(folder.iterdir()) if d.is_dir()
                  for p in sorted(d.iterdir()) if p.is_file()})
    manifest = {"format_version": FORMAT_VERSION, "tokopt_version": __version__, "versions": versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **data, "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return manifest


def _major_minor(v: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in (v or "").split(".")[:2])
    except ValueError:
        return ()


def verify_bundle(path: Path) -> dict:
    if not path.is_dir():
        raise BundleError(f"{path} is not a folder. Pass the --out folder of `tokopt compile`.")
    manifest = read_manifest(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path} has bundle format {manifest.get('format_version')!r}; this tokopt "
                          f"reads format {FORMAT_VERSION}. Rebuild it with this tokopt's `tokopt compile`.")
    missing_keys = {"files", "inputs", "outputs", "backend", "target"} - set(manifest)
    if missing_keys:
        raise BundleError(f"{path / 'manifest.json'} lacks {sorted(missing_keys)}. Rebuild the bundle.")
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"{path} is missing {name}. Rebuild the bundle with tokopt compile.")
        if file_sha256(f) != digest:
            raise BundleError(f"{f} does not match the sha256 in the manifest: the file was changed "
                              "or damaged after the bundle was built. Rebuild the bundle.")
    built = manifest.get("versions", {}).get("onnxruntime")
    have = versions()["onnxruntime"]
    if manifest["backend"] == "onnxruntime" and _major_minor(have) < _major_minor(built):
        raise BundleError(f"{path} was built with onnxruntime {built}, newer than the installed "
                          f"{have}; its opsets may not load. Upgrade onnxruntime or rebuild the bundle here.")
    return manifest
