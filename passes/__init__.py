"""Graph passes; importing this package registers them."""
from . import canonicalize, token_prune  # noqa: F401

__all__ = ["canonicalize", "token_prune"]
