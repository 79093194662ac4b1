"""Errors a user can act on. Each class has its own exit code, used by the CLI.

Every message says what is wrong and what to do; the CLI prints it as one paragraph with no
traceback unless ``--debug``.
"""
from __future__ import annotations

import difflib

__all__ = [
    "TokoptError", "UsageError", "CaptureError", "UnsupportedModelError", "PassError",
    "BackendError", "BundleError", "did_you_mean",
]


class TokoptError(Exception):
    exit_code = 1


class UsageError(TokoptError):
    """Bad options: unknown pass, bad option value, an --out that exists."""
    exit_code = 2


class CaptureError(TokoptError):
    """The model source cannot be read: missing config, corrupt weights, pickle refused."""
    exit_code = 3


class UnsupportedModelError(CaptureError):
    """The model was read but tokopt cannot compile it (unknown architecture, export failure)."""
    exit_code = 4


class PassError(TokoptError):
    """A pass failed or broke the program; the message names it and the passes before it."""
    exit_code = 5


class BackendError(TokoptError):
    """Lowering or running failed: provider not installed, GPU missing, export failed."""
    exit_code = 6


class BundleError(TokoptError):
    """A bundle is missing files, tampered with, or built by incompatible versions."""
    exit_code = 7


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
