"""Graph passes; importing this package registers them."""
from . import canonicalize, tca, token_prune  # noqa: F401

__all__ = ["canonicalize", "tca", "token_prune"]
