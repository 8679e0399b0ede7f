"""Per-image encryption without key management (paper 003).

003_b5ba2da3aed36e6d.txt section II-B: split the image into B x B blocks (B = the model's patch
size), each block into S x S sub-blocks; shuffle the pixels of every sub-block separately for
each colour channel, then permute the colour channels of every block. Every block and sub-block
gets its own key, and every call draws new keys from the OS CSPRNG, so no key is ever stored.
"""

from __future__ import annotations

import os

import numpy as np

from seglock.client.transforms.errors import TransformError
from seglock.client.transforms.geometry import (
    CHANNELS,
    check_block_size,
    check_divisible,
    check_images,
)
from seglock.client.transforms.randomness import RandBytes, random_permutations

DEFAULT_BLOCK_SIZE = 16  # the ViT patch size of the SETR models in paper 003
DEFAULT_SUB_BLOCK = 4


class PerImageKey:
    """One image's keys: a channel permutation per block, a pixel permutation per sub-block and channel.

    Made fresh for each image and dropped after use; `repr` shows only the geometry.
    """

    __slots__ = ("height", "width", "block_size", "sub_block", "_gather")

    def __init__(self, height: int, width: int, block_size: int, sub_block: int,
                 channel_perms: np.ndarray, pixel_perms: np.ndarray) -> None:
        """channel_perms: int[H/B, W/B, 3]; pixel_perms: int[H/S, W/S, 3, S*S], rows permutations.

        Output channel c of a block is input channel channel_perms[c] (step 3b); pixel p of that
        output channel in a sub-block is pixel pixel_perms[..., c, p] of the same sub-block (step 3a).
        Drawing the pixel shuffles per output channel is the same family and distribution as
        drawing them per input channel before the channel permutation.
        """
        check_geometry(height, width, block_size, sub_block)
        s, b = sub_block, block_size
        if (channel_perms.shape != (height // b, width // b, CHANNELS)
                or pixel_perms.shape != (height // s, width // s, CHANNELS, s * s)):
            raise TransformError("per-image key arrays do not match the image geometry")
        # Flat HWC index of (sub-block sy, sx; channel c; pixel q = qy*S + qx) = base + c + offset[q].
        # int32 halves the memory traffic of building and applying it (images below 2**31 values).
        index = np.int32 if height * width * CHANNELS < 2**31 else np.int64
        rows: np.ndarray = np.arange(height // s, dtype=index)
        cols: np.ndarray = np.arange(width // s, dtype=index)
        base = (rows[:, None] * (s * width) + cols[None, :] * s) * CHANNELS
        q: np.ndarray = np.arange(s * s, dtype=index)
        offset = ((q // s) * width + q % s) * CHANNELS
        source = offset.take(pixel_perms)  # (H/S, W/S, 3, S*S)
        source += (base[:, :, None] + np.repeat(np.repeat(channel_perms.astype(index), b // s, axis=0),
                                                b // s, axis=1))[..., None]
        # Lay the sources out in HWC order of their destinations: (sy, qy, sx, qx, c).
        source = source.reshape(height // s, width // s, CHANNELS, s, s).transpose(0, 3, 1, 4, 2)
        gather = np.ascontiguousarray(source).reshape(-1)
        gather.flags.writeable = False
        self.height, self.width, self.block_size, self.sub_block = height, width, b, s
        self._gather = gather

    @classmethod
    def generate(cls, height: int, width: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 sub_block: int = DEFAULT_SUB_BLOCK, *, randbytes: RandBytes = os.urandom) -> PerImageKey:
        """Fresh, independent keys for every block and sub-block of one H x W image."""
        check_geometry(height, width, block_size, sub_block)
        s, b = sub_block, block_size
        channel_perms = random_permutations((height // b) * (width // b), CHANNELS, randbytes)
        pixel_perms = random_permutations((height // s) * (width // s) * CHANNELS, s * s, randbytes)
        return cls(height, width, b, s,
                   channel_perms.reshape(height // b, width // b, CHANNELS),
                   pixel_perms.reshape(height // s, width // s, CHANNELS, s * s))

    def gather_index(self, *, inverse: bool = False) -> np.ndarray:
        """int[H*W*3]: the encrypted HWC image is `image.reshape(-1)[index]` (or its inverse)."""
        if not inverse:
            return self._gather
        undo = np.empty_like(self._gather)
        undo[self._gather] = np.arange(self._gather.size, dtype=self._gather.dtype)
        return undo

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Encrypt one HWC uint8 image of this key's size."""
        return self._take(image, self._gather)

    def invert(self, encrypted: np.ndarray) -> np.ndarray:
        """Decrypt one HWC uint8 image that `apply` encrypted."""
        return self._take(encrypted, self.gather_index(inverse=True))

    def _take(self, image: np.ndarray, index: np.ndarray) -> np.ndarray:
        image = check_images(image, np.uint8)
        if image.shape != (self.height, self.width, CHANNELS):
            raise TransformError(
                f"this per-image key is for {self.height}x{self.width}x{CHANNELS} images, got {image.shape}"
            )
        return image.reshape(-1).take(index).reshape(image.shape)

    def __repr__(self) -> str:
        return (f"PerImageKey(height={self.height}, width={self.width}, "
                f"block_size={self.block_size}, sub_block={self.sub_block})")


def check_geometry(height: int, width: int, block_size: int, sub_block: int) -> None:
    """Blocks must tile the image and sub-blocks must tile a block, else TransformError."""
    block_size = check_block_size(block_size)
    sub_block = check_block_size(sub_block, "sub_block")
    if block_size % sub_block:
        raise TransformError(f"block size {block_size} is not divisible by the sub-block size {sub_block}")
    check_divisible(height, width, block_size)


def encrypt_per_image(images: np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE,
                      sub_block: int = DEFAULT_SUB_BLOCK) -> np.ndarray:
    """Encrypt an HWC or NHWC uint8 image (batch) with fresh keys for every image; same shape."""
    encrypted, _ = _encrypt_per_image_with_key(images, block_size, sub_block)
    return encrypted


def _encrypt_per_image_with_key(
    images: np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE, sub_block: int = DEFAULT_SUB_BLOCK,
    *, randbytes: RandBytes = os.urandom,
) -> tuple[np.ndarray, PerImageKey | list[PerImageKey]]:
    """Test hook: `encrypt_per_image` that also returns the key(s) (a list for NHWC)."""
    images = check_images(images, np.uint8)
    height, width = images.shape[-3:-1]
    check_geometry(height, width, block_size, sub_block)
    if images.ndim == 3:
        key = PerImageKey.generate(height, width, block_size, sub_block, randbytes=randbytes)
        return key.apply(images), key
    keys = [PerImageKey.generate(height, width, block_size, sub_block, randbytes=randbytes) for _ in images]
    encrypted = np.empty_like(images)
    for i, (image, key) in enumerate(zip(images, keys, strict=True)):
        encrypted[i] = key.apply(image)
    return encrypted, keys
