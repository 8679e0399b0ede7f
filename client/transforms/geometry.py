"""Where each block's vector lives in an HWC image: shape checks and index layouts (no secrets)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from seglock.client.transforms.errors import TransformError

CHANNELS = 3  # colour images only: the papers' blocks are M x M x 3


def check_images(images: object, dtype: type[np.generic], what: str = "image") -> np.ndarray:
    """Return `images` as an HWC or NHWC array of `dtype` with 3 channels, else TransformError."""
    if not isinstance(images, np.ndarray):
        raise TransformError(f"{what} must be a numpy array, got {type(images).__name__}")
    if images.ndim not in (3, 4):
        raise TransformError(f"{what} must be HWC or NHWC, got {images.ndim} dimensions")
    if images.shape[-1] != CHANNELS:
        raise TransformError(f"{what} must have {CHANNELS} channels last, got shape {images.shape}")
    if 0 in images.shape[-3:-1]:
        raise TransformError(f"{what} must not be empty, got shape {images.shape}")
    if images.dtype != dtype:
        raise TransformError(f"{what} must be {np.dtype(dtype).name}, got {images.dtype.name}")
    return images


def check_block_size(block_size: object, name: str = "block_size") -> int:
    """A positive int, else TransformError."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise TransformError(f"{name} must be a positive integer, got {block_size!r}")
    return int(block_size)


def check_divisible(height: int, width: int, block_size: int, name: str = "block size") -> None:
    """H and W must be multiples of the block size: the papers split the image into whole blocks."""
    if height % block_size or width % block_size:
        raise TransformError(
            f"image size {height}x{width} is not divisible by the {name} {block_size}"
        )


@lru_cache(maxsize=32)
def block_vector_index(height: int, width: int, block_size: int) -> np.ndarray:
    """int64[H/M, W/M, M*M*3]: the flat HWC index of element i of each block's vector.

    A block's vector is in (row, column, channel) order with the channel fastest,
    i = (r*M + c)*3 + ch, as in paper 001 section 2.3 and the reference code.
    """
    check_divisible(height, width, block_size)
    m = block_size
    index: np.ndarray = np.arange(height * width * CHANNELS, dtype=np.int64)
    index = index.reshape(height // m, m, width // m, m, CHANNELS).transpose(0, 2, 1, 3, 4)
    index = np.ascontiguousarray(index).reshape(height // m, width // m, m * m * CHANNELS)
    index.flags.writeable = False
    return index

