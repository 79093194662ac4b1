"""Graph passes; importing this package registers them."""
from . import canonicalize, edgeqat, rsq, still, tca, token_prune  # noqa: F401

__all__ = ["canonicalize", "edgeqat", "rsq", "still", "tca", "token_prune"]
