"""tokopt: a compiler for trained transformer models.

    import tokopt
    result = tokopt.compile("path/to/hf-folder", passes="canonicalize", out="bundle")
    print(result)                     # the measured report
    run = tokopt.load("bundle")
    outputs = run(input_ids=ids, attention_mask=mask)
    tokopt.verify("bundle", emulate=True)   # an ARM bundle on ARM code, under qemu
    tokopt.export("bundle", "folder", to="genai")   # a generation bundle for onnxruntime-genai
"""
__version__ = "0.1.0"

from . import backends, passes  # noqa: F401  (importing them registers passes and backends)
from .backends.targets import TARGETS
from .optimizer.capture import capture
from .optimizer.compile import CompileResult, compile
from .optimizer.errors import (BackendError, BundleError, CaptureError, PassError, TokoptError,
                               UnsupportedModelError, UsageError)
from .optimizer.pass_manager import PASSES
from .optimizer.runtime import BACKENDS, load
from .backends.verify import verify

__all__ = ["compile", "load", "verify", "export", "capture", "list_passes", "list_targets", "list_backends", "CompileResult", "TokoptError",
           "UsageError", "CaptureError", "UnsupportedModelError", "PassError", "BackendError",
           "BundleError", "__version__"]


EXPORTS = ("genai",)


def export(bundle, out, to: str = "genai", force: bool = False):
    """``bundle`` rewritten into ``out`` for another runtime's loader: ``genai``, a generation
    bundle as a folder onnxruntime-genai's ``og.Model`` loads (same graph and weights, its
    ``genai_config.json``). Returns ``out``."""
    if to not in EXPORTS:
        raise UsageError(f"tokopt exports to {', '.join(EXPORTS)}, not '{to}'.")
    from .backends.genai import export as to_genai
    return to_genai(bundle, out, force)


def list_passes() -> dict[str, str]:
    """Registered pass names -> one-line summaries."""
    return {name: cls.summary for name, cls in sorted(PASSES.items())}


def list_targets() -> dict[str, str]:
    return {name: t.description for name, t in TARGETS.items()}


def list_backends() -> dict[str, dict]:
    """Backend names -> {"summary": one line, "targets": the targets it can compile for on this
    machine, "not_here": target -> why not}."""
    import sys
    out = {}
    for name, cls in BACKENDS.items():
        here, why = [], {}
        for target in TARGETS:
            try:
                cls().target(target)
                here.append(target)
            except TokoptError as e:
                why[target] = str(e)
        out[name] = {"summary": (sys.modules[cls.__module__].__doc__ or name).strip().splitlines()[0].replace("``", ""),
                     "targets": here, "not_here": why}
    return out
