"""Test oracle: the hand-written Hungarian solver seglock used before `scipy.optimize.linear_sum_assignment`.

The shortest-augmenting-path Hungarian method with potentials (Kuhn-Munkres as written by Jonker
and Volgenant), vectorised over columns with numpy. Kept only to check scipy's answers against an
independent implementation; nothing in seglock imports it.
"""

import numpy as np


def hungarian(cost: np.ndarray) -> np.ndarray:
    """The O(n^3) solver seglock had before scipy: an int64[n] column per row."""
    cost = np.asarray(cost, dtype=np.float64)
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
