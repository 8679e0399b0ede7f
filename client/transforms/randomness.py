"""Uniform random permutations from the operating system's CSPRNG (never a seeded generator)."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from functools import cache

import numpy as np

RandBytes = Callable[[int], bytes]

_MAX_LENGTH = 2**20  # longest permutation (M = 591); beyond it 64-bit words lack random bits
_TABLE_LENGTH = 6  # up to 6! = 720 permutations: pick one from a table instead of sorting
_SHUFFLE_LENGTH = 20  # up to 20! < 2**64: one 64-bit draw per permutation drives a Fisher-Yates shuffle


def random_permutations(count: int, n: int, randbytes: RandBytes = os.urandom) -> np.ndarray:
    """int64[count, n]: `count` independent, exactly uniform permutations of range(n)."""
    if count < 0 or not 1 <= n <= _MAX_LENGTH:
        raise ValueError(f"need count >= 0 and 1 <= n <= {_MAX_LENGTH}, got count={count}, n={n}")
    if n <= _TABLE_LENGTH:
        chosen: np.ndarray = _all_permutations(n)[_uniform_below(count, math.factorial(n), randbytes)]
        return chosen
    if n <= _SHUFFLE_LENGTH:
        return _shuffled_permutations(count, n, randbytes)
    return _sorted_permutations(count, n, randbytes)


def _shuffled_permutations(count: int, n: int, randbytes: RandBytes) -> np.ndarray:
    """Fisher-Yates on every row at once, its swap positions the mixed-radix digits of one number
    uniform in [0, n!) per row: independent and exactly uniform, from 8 random bytes a row."""
    total = math.factorial(n)
    limit = np.uint64((2**64 // total) * total)  # rejection below a multiple of n!: no modulo bias
    x = _random_array(count, np.dtype(np.uint64), randbytes).copy()
    redraw = np.flatnonzero(x >= limit)
    while redraw.size:
        x[redraw] = _random_array(redraw.size, np.dtype(np.uint64), randbytes)
        redraw = redraw[x[redraw] >= limit]
    perms = np.tile(np.arange(n, dtype=np.uint8), (count, 1))  # small values: less memory to move
    flat = perms.reshape(-1)
    row_start = np.arange(count, dtype=np.int64) * n
    for i in range(n - 1, 0, -1):
        x, j = np.divmod(x, np.uint64(i + 1))
        where = row_start + j.astype(np.int64)
        last = perms[:, i].copy()
        perms[:, i] = flat[where]
        flat[where] = last
    return perms.astype(np.int64)


def _sorted_permutations(count: int, n: int, randbytes: RandBytes) -> np.ndarray:
    """Sort words `random << shift | position` per row; the low bits then read as the permutation.

    The position makes the words unique; rows whose random parts collide are drawn again, so
    every permutation stays exactly equally likely.
    """
    shift = max(1, (n - 1).bit_length())
    # Random bits so that a row collides with probability at most 1/16 (n^2/2 pairs).
    need = math.ceil(math.log2(8 * n * n))
    word = np.dtype(np.uint32) if 32 - shift >= need else np.dtype(np.uint64)
    source = next(np.dtype(t) for t in (np.uint16, np.uint32, np.uint64) if 8 * np.dtype(t).itemsize >= need)
    positions = np.arange(n, dtype=word)

    def draw(rows: int) -> np.ndarray:
        words: np.ndarray = _random_array(rows * n, source, randbytes).astype(word).reshape(rows, n)
        words <<= word.type(shift)  # bits pushed out of the word are dropped: the rest stay uniform
        words |= positions
        words.sort(axis=1)
        return words

    words = draw(count)
    while True:
        high = words >> word.type(shift)
        collided = np.flatnonzero((high[:, 1:] == high[:, :-1]).any(axis=1))
        if collided.size == 0:
            return (words & word.type((1 << shift) - 1)).astype(np.int64)
        words[collided] = draw(collided.size)


def _uniform_below(count: int, bound: int, randbytes: RandBytes) -> np.ndarray:
    """int64[count] uniform in [0, bound) for bound <= 2**16, by rejection (no modulo bias)."""
    limit = (2**16 // bound) * bound
    values = _random_array(count, np.dtype(np.uint16), randbytes).astype(np.int64)
    rejected = np.flatnonzero(values >= limit)
    while rejected.size:
        values[rejected] = _random_array(rejected.size, np.dtype(np.uint16), randbytes)
        rejected = rejected[values[rejected] >= limit]
    return values % bound


@cache
def _all_permutations(n: int) -> np.ndarray:
    table = np.array(list(itertools.permutations(range(n))), dtype=np.int64).reshape(-1, n)
    table.flags.writeable = False
    return table


def _random_array(count: int, dtype: np.dtype, randbytes: RandBytes) -> np.ndarray:
    raw = randbytes(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise ValueError("the random source returned the wrong number of bytes")
    return np.frombuffer(raw, dtype=dtype)
