"""What a compile costs and whether it fits: wall time and peak resident memory per stage, the
weights' size, and the checks that refuse a model that cannot fit before hours of work.

Peak memory is the kernel's high-water mark (``VmHWM``), reset per stage through
``/proc/self/clear_refs`` (Linux); nested stages keep the outer stage's peak. Elsewhere the peak
is the process's since it started (``getrusage``) and the report says so.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import resource
import shutil
import sys
import time
from pathlib import Path

from .errors import UsageError

__all__ = ["stage", "peak_rss", "weights_bytes", "page_out", "page_out_tensor", "mapped_releaser", "releasing_mapped", "release_heap", "file_backed", "checkpoint_bytes", "available_memory", "parse_bytes",
           "check_fits", "check_disk", "widen_to_fp32", "cpu_has_bf16", "PEAK_SOURCE", "COPIES"]

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _reset() -> bool:
    """Reset the kernel's high-water mark; False where it cannot be."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


PEAK_SOURCE = "per stage (VmHWM, reset per stage)" if _reset() else "since the process started (getrusage)"
_carried = 0   # the highest peak read before a reset: the enclosing stage's
# copies of the fp32 weights a compile holds at its peak: ONNX Runtime's session (prepacked, and a
# tied embedding kept for its Gather besides) while torch's own, file-backed, are paged out (page_out)
COPIES = 1.5


def peak_rss() -> int:
    """The peak resident set size, in bytes, since the last reset."""
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024   # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@contextlib.contextmanager
def stage(name: str, rows: list | None = None, progress: bool = False, what: str | None = None):
    """Time ``name`` and take its peak resident memory; the row ``{"stage", "seconds",
    "peak_rss_bytes"}`` is appended to ``rows`` and yielded (filled on exit)."""
    global _carried
    if progress:
        print(f"tokopt: {what or name} ...", file=sys.stderr, flush=True)
    outer = max(_carried, peak_rss())
    _carried = 0
    _reset()
    row = {"stage": name}
    started = time.perf_counter()
    try:
        yield row
    finally:
        release_heap()   # what the stage freed leaves the process: the next stage starts from what is live
        peak = max(_carried, peak_rss())
        _carried = max(outer, peak)
        row.update(seconds=round(time.perf_counter() - started, 2), peak_rss_bytes=peak)
        if rows is not None:
            rows.append(row)
    if progress:
        print(f"tokopt:   done in {row['seconds']:.1f} s, peak {peak / 2**30:.2f} GiB resident", file=sys.stderr,
              flush=True)


def weights_bytes(program, as_fp32: bool = False) -> int:
    """The bytes of the program's parameters and buffers (what a checkpoint of it holds);
    ``as_fp32``: their half-precision ones counted as fp32 (what a pass's new weights take)."""
    return sum(size * (4 // dtype.itemsize if as_fp32 and dtype.is_floating_point and dtype.itemsize < 4 else 1)
               for _, (size, dtype) in _storages(program).items())


def _storages(program) -> dict:
    seen = {}
    for t in [*program.ep.state_dict.values(), *program.ep.constants.values()]:
        if hasattr(t, "untyped_storage"):
            seen.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), t.dtype))
    return seen


def page_out(program, keep=None) -> None:
    """Ask the kernel to evict the program's weights from memory (``MADV_PAGEOUT``) before a
    runtime loads its own copy. Weights mapped from a safetensors file are clean file pages: they
    leave the resident set and fault back in when torch next reads them; nothing is lost. Memory
    that is not file-backed stays (there is no swap to page it to). Weights ``keep`` (a program)
    shares stay. Linux 5.4+; elsewhere nothing."""
    kept = set(_storages(keep)) if keep is not None else set()
    _advise_out([(ptr, size) for ptr, (size, _) in _storages(program).items() if ptr not in kept])


def page_out_tensor(t) -> None:
    """``page_out`` for one tensor's storage (a weight a pass has just replaced, or made
    ``file_backed``: its pages are written to the file first, as reclaim does not write them)."""
    _advise_out([(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())], write=True)


def _advise_out(spans, write: bool = False, advice: int | None = None) -> None:
    """``advice`` (``MADV_PAGEOUT`` by default) over the whole pages inside each (address, bytes)."""
    if _LIBC is None:
        return
    page = mmap.PAGESIZE
    for ptr, size in spans:
        lo, hi = -(-ptr // page) * page, (ptr + size) // page * page   # whole pages inside the tensor only
        if hi > lo:
            if write:   # a shared file mapping's dirty pages; anywhere else a no-op
                _LIBC.msync(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MS_SYNC)
            # a hint: an old kernel refuses PAGEOUT
            _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_PAGEOUT if advice is None else advice)


_MADV_DONTNEED, _MADV_PAGEOUT, _MS_SYNC = 4, 21, 4


def mapped_releaser():
    """A function that takes a tensor out of the resident set where its pages are a file's, none
    of them written here (a checkpoint's weight, memory-mapped): they stay in the page cache, so the
    next read faults them back without the disk (``MADV_DONTNEED``; ``page_out`` evicts them).
    Anything else it leaves: DONTNEED would zero anonymous memory and a private mapping's writes."""
    spans = _clean_file_mappings()

    def release(t) -> None:
        ptr, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        if any(lo <= ptr and ptr + size <= hi for lo, hi in spans):
            _advise_out([(ptr, size)], advice=_MADV_DONTNEED)
    return release


@contextlib.contextmanager
def releasing_mapped(model):
    """While open, each module of ``model`` lets its own mapped weights leave the resident set
    after its forward (``mapped_releaser``): an eager run of a large model holds about one layer's
    weights, not every one it has read."""
    release = mapped_releaser()

    def hook(module, args, out):
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            release(t)
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if next(m.parameters(recurse=False), None) is not None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _clean_file_mappings() -> list[tuple[int, int]]:
    """This process's file mappings none of whose pages this process wrote (no anonymous, that is
    copied-on-write, memory; a page the file's writer left dirty is still the page cache's)."""
    spans, span, dirty = [], None, 0
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return []
    for line in [*lines, "0-0 ---p 0 0 0"]:
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:   # a mapping's first line: range perms offset dev inode [path]
            if span is not None and dirty == 0:
                spans.append(span)
            lo, _, hi = head[0].partition("-")
            span = (int(lo, 16), int(hi, 16)) if len(head) >= 6 and head[4] != "0" and head[5].startswith("/") else None
            dirty = 0
        elif head and head[0] == "Anonymous:":
            dirty += int(head[1])
    return spans


def file_backed(shape, folder: Path, dtype=None):
    """An uninitialised tensor whose pages live in a file in ``folder`` (removed at once: the
    mapping keeps it until the tensor is freed). Under memory pressure, or after ``page_out_tensor``,
    the kernel writes its pages to the file and drops them, where a tensor in anonymous memory would
    stay resident (there is no swap): a pass's new weights held like the checkpoint's, on disk."""
    import os
    import tempfile

    import torch
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype or torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="weights-", dir=folder)
    os.close(fd)
    try:
        return torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype or torch.float32).view(shape)
    finally:
        os.unlink(path)


def release_heap() -> None:
    """Return the C heap's free pages to the kernel (glibc's ``malloc_trim``). A pass that makes
    each new weight while it frees float64 temporaries leaves holes between the weights that malloc
    keeps resident: +50% of the weights on a 155M Llama's rotation. Elsewhere nothing."""
    trim = getattr(_LIBC, "malloc_trim", None)   # glibc's; musl has none
    if trim is not None:
        trim(0)


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def checkpoint_bytes(files) -> tuple[int, int, int]:
    """(bytes on disk, bytes as fp32, the largest tensor's bytes as fp32) of the tensors in
    safetensors ``files``, from their headers."""
    from safetensors import safe_open
    stored = as_fp32 = largest = 0
    for f in files:
        with safe_open(str(f), "pt") as h:
            for key in h.keys():
                piece = h.get_slice(key)
                n = math.prod(piece.get_shape())
                size = _DTYPE_BYTES.get(piece.get_dtype(), 4)
                stored += n * size
                wide = n * (4 if piece.get_dtype() in ("BF16", "F16", "F32") else size)
                as_fp32, largest = as_fp32 + wide, max(largest, wide)
    return stored, as_fp32, largest   # the first two equal: stored in fp32 (or integers), mapped as it is


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def check_fits(fp32_bytes: int, largest: int, max_memory: int | None, source: str, copies: float = COPIES) -> None:
    """Refuse before loading a model whose compile cannot fit ``max_memory`` bytes (default: the
    memory available now). ``copies``: the fp32 weights the compile holds in memory that cannot be
    paged out (0 when torch's and ONNX Runtime's both read them from mapped files: no
    measurement and no pass that makes new weights)."""
    budget = max_memory if max_memory is not None else available_memory()
    # + what torch.export and ONNX Runtime take as they load (the interpreter is in memory already:
    # the budget is what is left beside it) and the largest tensor's temporaries
    needed = copies * fp32_bytes + 2**28 + 2 * largest
    if budget is not None and needed > budget:
        where = "is the --max-memory budget" if max_memory is not None else "are available"
        held = (f"a compile holds {copies:.2g} times that at its peak (ONNX Runtime's prepacked copy, while torch's "
                "are paged out)" if copies else f"its largest tensor is {largest / 2**30:.2f} GiB")
        raise UsageError(f"{source}: its weights are {fp32_bytes / 2**30:.1f} GiB as fp32 and {held}, about "
                         f"{needed / 2**30:.1f} GiB with the runtimes' own; {budget / 2**30:.1f} GiB {where}. Use a "
                         "machine with more memory, or a smaller model" + ("; --no-measure holds no runtime copy."
                                                                          if copies else "."))


def widen_to_fp32(folder: Path, files: list[Path], into: Path) -> Path:
    """``folder`` as a checkpoint in ``into`` whose half-precision tensors are fp32, written in
    1 GiB shards (one shard in memory at a time), so that transformers maps fp32 weights from disk
    instead of converting them into memory that cannot be paged out."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    for name in ("config.json", "generation_config.json"):
        if (folder / name).exists():
            shutil.copy2(folder / name, into / name)
    weight_map, shard, size, total = {}, {}, 0, 0

    def flush():
        name = f"model-fp32-{len(set(weight_map.values())):05d}.safetensors"
        save_file(shard, str(into / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()
    for f in files:
        with safe_open(str(f), "pt") as h:
            for key in h.keys():
                t = h.get_tensor(key)
                shard[key] = t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
                size += shard[key].nbytes
                total += shard[key].nbytes
                if size >= 2**30:
                    flush()
                    size = 0
    if shard:
        flush()
    (into / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return into


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), as its flags in
    ``/proc/cpuinfo`` say; elsewhere bf16 matmuls are emulated, slower than fp32."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    return False


def available_memory() -> int | None:
    """Memory this process may still take: MemAvailable, capped by the limits of the memory
    cgroup it runs in and of each cgroup above it (page cache that can be dropped not counted)."""
    avail = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    for folder in _memory_cgroups():
        with contextlib.suppress(OSError, ValueError):
            limit = (folder / "memory.max") if (folder / "memory.max").exists() else folder / "memory.limit_in_bytes"
            cap = int(limit.read_text().strip()) - _cgroup_held(folder)
            avail = cap if avail is None else min(avail, cap)
    return avail


def _memory_cgroups() -> list[Path]:
    """The folders of this process's memory cgroup and its ancestors (cgroup v1 or v2)."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            root = Path("/sys/fs/cgroup/memory") if "memory" in controllers.split(",") else \
                Path("/sys/fs/cgroup") if controllers == "" else None
            if root is None or not root.is_dir():
                continue
            folder = root / path.lstrip("/")
            while folder != root and folder.is_relative_to(root):
                found.append(folder)
                folder = folder.parent
            found.append(root)
    return found


def _cgroup_held(folder: Path) -> int:
    """Memory the cgroup holds, less the inactive page cache the kernel drops under pressure."""
    for name in ("memory.current", "memory.usage_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            used = int((folder / name).read_text().strip())
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
            return used - int(stat.get("total_inactive_file", stat.get("inactive_file", 0)))
    return 0


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30,
          "T": 2**40, "TB": 2**40, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str, option: str = "--max-memory") -> int:
    """``16GB``, ``512M``, ``2.5G`` -> bytes (binary units)."""
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not value > 0:
        raise UsageError(f"{option} {text!r}: give a size such as 16GB, 512MB or 2.5G.")
    return int(value * _UNITS[unit])


def check_disk(folder: Path, needed: int, what: str, fix: str = "choose another --out") -> None:
    """Refuse before the work when ``folder``'s file system has less free space than ``needed``."""
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UsageError(f"{what} needs about {needed / 2**30:.1f} GiB of disk and {folder} has "
                         f"{free / 2**30:.1f} GiB free. Free some space or {fix}.")

