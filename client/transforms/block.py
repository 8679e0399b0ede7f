"""Block-wise transformations with one secret key for all blocks: SHF, NP, FFX.

Paper 001 (001_1d6747102c10f252.txt, sections 2.3-2.4): split the image into M x M x 3 blocks,
flatten each, transform every vector with the same key, put the blocks back. Each transform is
applied here as one whole-image operation through index layouts cached on the key.
"""

from __future__ import annotations

import numpy as np

from seglock.client.modes import Mode
from seglock.client.transforms.errors import TransformError
from seglock.client.transforms.ffx import FFX_MAX, INVERSE_LOOKUP_OFFSET, LOOKUP_OFFSET
from seglock.client.transforms.geometry import CHANNELS, check_divisible, check_images
from seglock.client.transforms.keys import BlockKey


def encrypt_blocks(images: np.ndarray, key: BlockKey) -> np.ndarray:
    """Encrypt an HWC or NHWC uint8 image (batch) with `key`; same shape, uint16 for ffx."""
    _check_key(key)
    images = check_images(images, np.uint8)
    _check_size(images, key)
    if key.method == Mode.SHF:
        return block_shuffle(images, key)
    if key.method == Mode.NP:
        return negative_positive(images, key)
    return ffx_encrypt(images, key)


def decrypt_blocks(images: np.ndarray, key: BlockKey) -> np.ndarray:
    """Undo `encrypt_blocks`: uint8 (uint16 for ffx) HWC or NHWC in, uint8 of the same shape out."""
    _check_key(key)
    images = check_images(images, np.uint16 if key.method == Mode.FFX else np.uint8, "encrypted image")
    _check_size(images, key)
    if key.method == Mode.SHF:
        return block_shuffle(images, key, inverse=True)
    if key.method == Mode.NP:
        return negative_positive(images, key)  # NP is its own inverse
    return ffx_decrypt(images, key)


def block_shuffle(images: np.ndarray, key: BlockKey, *, inverse: bool = False) -> np.ndarray:
    """SHF: position i of every block vector takes the value at position key[i] (checked input)."""
    height, width = images.shape[-3:-1]
    index = key.gather_index(height, width, inverse=inverse)
    flat = images.reshape(-1, height * width * CHANNELS)
    return np.take(flat, index, axis=1).reshape(images.shape)


def negative_positive(images: np.ndarray, key: BlockKey) -> np.ndarray:
    """NP: selected values become 255 - x, which for uint8 is x XOR 255 (checked input)."""
    height, width = images.shape[-3:-1]
    flip = key.cached_layout(
        "np-xor", height, width, lambda: key.selection_mask(height, width).astype(np.uint8) * np.uint8(255)
    )
    flipped: np.ndarray = np.bitwise_xor(images, flip)
    return flipped


def ffx_encrypt(images: np.ndarray, key: BlockKey) -> np.ndarray:
    """FFX: selected values go through the key's 256-entry table; the rest keep theirs (uint16)."""
    height, width = images.shape[-3:-1]
    offset = key.cached_layout(
        "ffx-offset", height, width,
        lambda: key.selection_mask(height, width).astype(np.uint16) * np.uint16(LOOKUP_OFFSET),
    )
    encrypted: np.ndarray = key.ffx_lookup().take(np.add(images, offset, dtype=np.uint16))
    return encrypted


def ffx_decrypt(images: np.ndarray, key: BlockKey) -> np.ndarray:
    """Inverse FFX; TransformError if a value is not one this key's encryption can produce."""
    height, width = images.shape[-3:-1]
    if images.size and int(images.max()) > FFX_MAX:
        raise TransformError(f"ffx-encrypted values must be at most {FFX_MAX}")
    offset = key.cached_layout(
        "ffx-inverse-offset", height, width,
        lambda: key.selection_mask(height, width).astype(np.uint16) * np.uint16(INVERSE_LOOKUP_OFFSET),
    )
    plain: np.ndarray = key.ffx_inverse_lookup().take(np.add(images, offset, dtype=np.uint16))
    if plain.size and int(plain.min()) < 0:
        raise TransformError("ffx-encrypted image holds values this key never produces (wrong key or corrupted data)")
    return plain.astype(np.uint8)


def _check_key(key: object) -> None:
    if not isinstance(key, BlockKey):
        raise TransformError(f"key must be a BlockKey, got {type(key).__name__}")


def _check_size(images: np.ndarray, key: BlockKey) -> None:
    height, width = images.shape[-3:-1]
    check_divisible(height, width, key.block_size)
