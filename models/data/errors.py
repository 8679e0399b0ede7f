"""The data sets' error type: a subtype of the models part's one error type."""

from __future__ import annotations

from seglock.models.errors import ModelError


class DatasetError(ModelError):
    """A missing or malformed data directory or a bad data-set parameter (a ValueError)."""
