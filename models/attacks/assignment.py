"""Linear assignment: the permutation that minimises a square cost matrix, by
`scipy.optimize.linear_sum_assignment` (the `attacks` extra installs scipy).
"""

from __future__ import annotations

import numpy as np

from seglock.models.errors import ModelError

__all__ = ["SOLVER", "linear_assignment"]

SOLVER = "scipy"  # named in weight-matching reports


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """int64[n]: column assigned to each row of an n x n cost matrix, minimising the total cost."""
    cost = _check(cost)
    try:
        from scipy.optimize import linear_sum_assignment
    except ModuleNotFoundError:
        raise ModelError("the weight-matching attack needs scipy: pip install 'seglock[attacks]'") from None
    rows, cols = linear_sum_assignment(cost)
    result = np.empty(cost.shape[0], dtype=np.int64)
    result[rows] = cols
    return result


def _check(cost: np.ndarray) -> np.ndarray:
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.shape[0] == 0:
        raise ValueError(f"the cost matrix must be square and non-empty, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("the cost matrix must be finite")
    return cost
