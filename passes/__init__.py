"""Graph passes; importing this package registers them."""
from . import canonicalize  # noqa: F401

__all__ = ["canonicalize"]
