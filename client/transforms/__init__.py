"""Client-side image encryption: block-wise SHF/NP/FFX (paper 001) and per-image keys (paper 003).

numpy only (plus pyffx for FFX tables); the torch training path in `seglock.models.encryption` reuses
the index maths exposed by `BlockKey` and `PerImageKey`.
"""

from seglock.client.modes import Mode
from seglock.client.transforms.block import (
    block_shuffle,
    decrypt_blocks,
    encrypt_blocks,
    ffx_decrypt,
    ffx_encrypt,
    negative_positive,
)
from seglock.client.transforms.errors import TransformError
from seglock.client.transforms.geometry import CHANNELS
from seglock.client.transforms.keys import BlockKey, input_scale, reference_permutation
from seglock.client.transforms.per_image import PerImageKey, encrypt_per_image

__all__ = [
    "BlockKey",
    "CHANNELS",
    "Mode",
    "PerImageKey",
    "TransformError",
    "block_shuffle",
    "decrypt_blocks",
    "encrypt_blocks",
    "encrypt_per_image",
    "ffx_decrypt",
    "ffx_encrypt",
    "input_scale",
    "negative_positive",
    "reference_permutation",
]
