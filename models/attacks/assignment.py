"""Linear assignment: the permutation that minimises a square cost matrix.

scipy.optimize.linear_sum_assignment where scipy is installed (it is not a seglock dependency);
otherwise the O(n^3) shortest-augmenting-path Hungarian method with potentials (Kuhn-Munkres as
written by Jonker and Volgenant), vectorised over columns with numpy. Both give an optimal
assignment; ties may be broken differently.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SOLVER", "hungarian", "linear_assignment"]

try:  # optional: faster for the 2048-channel taps of ResNet-50
    from scipy.optimize import linear_sum_assignment as _scipy_assignment
except ImportError:  # pragma: no cover - depends on the environment
    _scipy_assignment = None

SOLVER = "scipy" if _scipy_assignment is not None else "hungarian"


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """int64[n]: column assigned to each row of an n x n cost matrix, minimising the total cost."""
    cost = _check(cost)
    if _scipy_assignment is not None:
        rows, cols = _scipy_assignment(cost)
        result = np.empty(cost.shape[0], dtype=np.int64)
        result[rows] = cols
        return result
    return hungarian(cost)


def hungarian(cost: np.ndarray) -> np.ndarray:
    """The pure-numpy solver (used when scipy is missing; tested against brute force)."""
    cost = _check(cost)
    n = cost.shape[0]
    # 1-based arrays with a virtual column 0, as in the classic formulation.
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    row_of = np.zeros(n + 1, dtype=np.int64)  # row_of[j]: the row matched to column j (0 = none)
    way = np.zeros(n + 1, dtype=np.int64)
    padded = np.zeros((n + 1, n + 1))
    padded[1:, 1:] = cost
    for i in range(1, n + 1):
        row_of[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of[j0]
            reduced = padded[i0] - u[i0] - v
            free = ~used
            better = free & (reduced < minv)
            minv[better] = reduced[better]
            way[better] = j0
            candidates = np.where(free, minv, np.inf)
            j1 = int(np.argmin(candidates))
            delta = candidates[j1]
            u[row_of[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    result = np.empty(n, dtype=np.int64)
    for j in range(1, n + 1):
        result[row_of[j] - 1] = j - 1
    return result


def _check(cost: np.ndarray) -> np.ndarray:
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.shape[0] == 0:
        raise ValueError(f"the cost matrix must be square and non-empty, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("the cost matrix must be finite")
    return cost
