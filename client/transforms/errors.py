"""The one error type of the transforms."""

from __future__ import annotations


class TransformError(ValueError):
    """A bad image, key or parameter for a transform (a ValueError, so callers may catch either)."""
