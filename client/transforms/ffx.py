"""FFX lookup tables: format-preserving Feistel encryption of 0..255 into 3 decimal digits.

Paper 001 (001_1d6747102c10f252.txt, section 2.4): FFX with a length of 3 digits maps a pixel
value 0..255 to 0..999; the reference code builds it once as a 256-entry table with
`pyffx.Integer(password, length=3)`.
"""

from __future__ import annotations

import numpy as np
import pyffx

FFX_DIGITS = 3
FFX_MAX = 10**FFX_DIGITS - 1  # largest value an encrypted pixel can take
NOT_IN_TABLE = -1  # marks 0..999 values that no pixel value encrypts to


def ffx_table(password: str) -> np.ndarray:
    """uint16[256]: the FFX encryption of each pixel value under `password`."""
    cipher = pyffx.Integer(password.encode("utf-8"), length=FFX_DIGITS)
    table = np.fromiter((cipher.encrypt(v) for v in range(256)), dtype=np.uint16, count=256)
    table.flags.writeable = False
    return table


def ffx_inverse_table(table: np.ndarray) -> np.ndarray:
    """int16[1000]: the pixel value behind each encrypted value, NOT_IN_TABLE where none is."""
    inverse = np.full(FFX_MAX + 1, NOT_IN_TABLE, dtype=np.int16)
    inverse[table] = np.arange(256, dtype=np.int16)
    inverse.flags.writeable = False
    return inverse


# Whole-image FFX as one table lookup: index = value + offset * selected, where unselected
# pixels read the identity half and selected pixels the cipher half.
LOOKUP_OFFSET = 256
INVERSE_LOOKUP_OFFSET = FFX_MAX + 1


def ffx_lookup(table: np.ndarray) -> np.ndarray:
    """uint16[512]: [identity of 0..255 | FFX table], indexed by value + 256 * selected."""
    lookup = np.concatenate([np.arange(256, dtype=np.uint16), table.astype(np.uint16)])
    lookup.flags.writeable = False
    return lookup


def ffx_inverse_lookup(inverse: np.ndarray) -> np.ndarray:
    """int16[2000]: [0..255 kept, -1 above | inverse table], indexed by value + 1000 * selected."""
    kept = np.full(FFX_MAX + 1, NOT_IN_TABLE, dtype=np.int16)
    kept[:256] = np.arange(256, dtype=np.int16)
    lookup = np.concatenate([kept, inverse.astype(np.int16)])
    lookup.flags.writeable = False
    return lookup
