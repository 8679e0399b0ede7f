"""Block-wise (paper 001) and per-image (paper 003) input encryption of training batches, in torch.

The key -> index maths is written once, in `seglock.client.transforms` (`BlockKey.gather_index`,
`.selection_mask`, `.ffx_table`, `PerImageKey.gather_index`); this module only applies those
indices with torch, on whatever device the batch lives on, and gives exactly the SDK's values.

Two layers:
- `encrypt_blocks_torch`, `decrypt_blocks_torch`, `encrypt_per_image_torch`: NHWC (or HWC)
  uint8 tensors in, the SDK's values out (ffx: int16 holding 0..999).
- `BlockEncryption`, `PerImageEncryption` (nn.Module): NCHW float in [0, 1] in, the model input
  out: the encrypted image in NCHW float32 divided by `input_scale(method)`.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from seglock.client.modes import Mode
from seglock.client.transforms import CHANNELS, BlockKey, PerImageKey, TransformError, input_scale
from seglock.client.transforms.ffx import FFX_MAX, INVERSE_LOOKUP_OFFSET, LOOKUP_OFFSET
from seglock.client.transforms.per_image import DEFAULT_BLOCK_SIZE, DEFAULT_SUB_BLOCK, check_geometry
from seglock.client.transforms.randomness import RandBytes

__all__ = [
    "BlockEncryption",
    "PerImageEncryption",
    "decrypt_blocks_torch",
    "encrypt_blocks_torch",
    "encrypt_per_image_torch",
    "quantize",
    "to_model_input",
]

_DEVICE_CACHE_LIMIT = 16  # (name, shape, device) tensors kept per key
# Device copies of a key's indices, dropped with the key; never module buffers, so key material
# cannot end up in a state_dict or a weights file.
_device_cache: weakref.WeakKeyDictionary[BlockKey, dict[tuple, Tensor]] = weakref.WeakKeyDictionary()
_device_cache_lock = threading.Lock()


def encrypt_blocks_torch(images: Tensor, key: BlockKey) -> Tensor:
    """SHF/NP/FFX of an HWC or NHWC uint8 tensor; same shape, uint8 (int16 for ffx), same device."""
    _check_key(key)
    batch = _check_tensor(images, (torch.uint8,), key.block_size)
    height, width = batch.shape[1:3]
    if key.method == Mode.SHF:
        index = _on_device(key, "gather", height, width, batch.device,
                           lambda: key.gather_index(height, width))
        out = batch.reshape(batch.shape[0], -1).index_select(1, index)
    elif key.method == Mode.NP:
        flip = _on_device(key, "np-xor", height, width, batch.device,
                          lambda: key.selection_mask(height, width).astype(np.uint8) * np.uint8(255))
        out = torch.bitwise_xor(batch, flip)  # 255 - x on the selected pixels
    else:
        # int16 on device: torch indexes uint16 poorly, and 0..999 fits.
        table = _on_device(key, "ffx-lookup", 0, 0, batch.device, lambda: key.ffx_lookup().astype(np.int16))
        offset = _on_device(key, "ffx-offset", height, width, batch.device,
                            lambda: key.selection_mask(height, width).astype(np.int64) * LOOKUP_OFFSET)
        out = table[batch.long() + offset]
    return out.reshape(images.shape)


def decrypt_blocks_torch(images: Tensor, key: BlockKey) -> Tensor:
    """Undo `encrypt_blocks_torch`: uint8 (ffx: any integer dtype) in, uint8 of the same shape out."""
    _check_key(key)
    if key.method != Mode.FFX:
        batch = _check_tensor(images, (torch.uint8,), key.block_size)
        height, width = batch.shape[1:3]
        if key.method == Mode.NP:
            return encrypt_blocks_torch(images, key)  # NP is its own inverse
        index = _on_device(key, "gather-inverse", height, width, batch.device,
                           lambda: key.gather_index(height, width, inverse=True))
        return batch.reshape(batch.shape[0], -1).index_select(1, index).reshape(images.shape)
    batch = _check_tensor(images, (torch.int16, torch.int32, torch.int64, torch.uint16), key.block_size)
    height, width = batch.shape[1:3]
    values = batch.long()
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > FFX_MAX):
        raise TransformError(f"ffx-encrypted values must lie in 0..{FFX_MAX}")
    table = _on_device(key, "ffx-inverse-lookup", 0, 0, batch.device, key.ffx_inverse_lookup)
    offset = _on_device(key, "ffx-inverse-offset", height, width, batch.device,
                        lambda: key.selection_mask(height, width).astype(np.int64) * INVERSE_LOOKUP_OFFSET)
    plain = table[values + offset]
    if plain.numel() and int(plain.min()) < 0:
        raise TransformError("ffx-encrypted batch holds values this key never produces (wrong key or corrupted data)")
    return plain.to(torch.uint8).reshape(images.shape)


def encrypt_per_image_torch(images: Tensor, block_size: int = DEFAULT_BLOCK_SIZE,
                            sub_block: int = DEFAULT_SUB_BLOCK, *, randbytes: RandBytes = os.urandom) -> Tensor:
    """Per-image encryption of an HWC or NHWC uint8 tensor: fresh CSPRNG keys for every image."""
    batch = _check_tensor(images, (torch.uint8,), 1)
    height, width = batch.shape[1:3]
    check_geometry(height, width, block_size, sub_block)
    if batch.shape[0] == 0:
        return images.clone()
    index = np.stack([
        PerImageKey.generate(height, width, block_size, sub_block, randbytes=randbytes).gather_index()
        for _ in range(batch.shape[0])
    ])
    index = torch.from_numpy(index).to(batch.device, torch.int64, non_blocking=True)  # gather wants int64
    return batch.reshape(batch.shape[0], -1).gather(1, index).reshape(images.shape)


def quantize(images: Tensor) -> Tensor:
    """NCHW float in [0, 1] -> NHWC uint8, rounding to the nearest level (exact for x = k/255)."""
    if images.ndim != 4 or images.shape[1] != CHANNELS or not images.is_floating_point():
        raise TransformError(f"expected an NCHW float batch with {CHANNELS} channels, got {tuple(images.shape)}")
    return (images.clamp(0, 1) * 255).round_().to(torch.uint8).permute(0, 2, 3, 1)


def to_model_input(encrypted: Tensor, method: str) -> Tensor:
    """NHWC encrypted batch -> NCHW float32 in [0, 1] (paper 001 section 2.4: divide by the max value).
    The divisor is a tensor on the batch's device: CUDA divides by a Python number as a multiplication
    by its reciprocal, 1 ulp off the CPU's (and numpy's) quotient for some levels, and training on a
    GPU must see exactly the values the server computes. The result is always a fresh tensor, made
    in one pass (converted straight into NCHW memory) and then scaled in place."""
    scale = torch.full((), input_scale(method), dtype=torch.float32, device=encrypted.device)
    nchw = encrypted.permute(0, 3, 1, 2)
    return nchw.to(torch.float32, memory_format=torch.contiguous_format, copy=True).div_(scale)


class BlockEncryption(nn.Module):
    """NCHW float [0, 1] batch -> its SHF/NP/FFX encryption under one key, scaled for the model.

    Inputs are first quantised to uint8 so training sees exactly what the SDK sends at inference.
    The key is held as a plain attribute, never a buffer, so it stays out of state_dict.
    """

    def __init__(self, key: BlockKey) -> None:
        super().__init__()
        _check_key(key)
        self.key = key

    def forward(self, images: Tensor) -> Tensor:
        return to_model_input(encrypt_blocks_torch(quantize(images), self.key), self.key.method)

    def extra_repr(self) -> str:
        return repr(self.key)


class PerImageEncryption(nn.Module):
    """NCHW float [0, 1] batch -> per-image encryption with fresh keys for every image, scaled."""

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, sub_block: int = DEFAULT_SUB_BLOCK,
                 *, randbytes: RandBytes = os.urandom) -> None:
        super().__init__()
        check_geometry(block_size, block_size, block_size, sub_block)
        self.block_size, self.sub_block = block_size, sub_block
        self._randbytes = randbytes

    def forward(self, images: Tensor) -> Tensor:
        encrypted = encrypt_per_image_torch(quantize(images), self.block_size, self.sub_block,
                                            randbytes=self._randbytes)
        return to_model_input(encrypted, Mode.PER_IMAGE)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, sub_block={self.sub_block}"


def _on_device(key: BlockKey, name: str, height: int, width: int, device: torch.device,
               build: Callable[[], np.ndarray]) -> Tensor:
    entry = (name, height, width, str(device))
    with _device_cache_lock:
        cache = _device_cache.setdefault(key, {})
        tensor = cache.get(entry)
    if tensor is None:
        tensor = torch.from_numpy(np.array(build(), copy=True)).to(device)  # a writable copy
        with _device_cache_lock:
            if len(cache) >= _DEVICE_CACHE_LIMIT:
                cache.pop(next(iter(cache)))
            cache[entry] = tensor
    return tensor


def _check_key(key: object) -> None:
    if not isinstance(key, BlockKey):
        raise TransformError(f"key must be a BlockKey, got {type(key).__name__}")


def _check_tensor(images: object, dtypes: tuple[torch.dtype, ...], block_size: int) -> Tensor:
    """Return an NHWC view of an HWC/NHWC tensor with 3 channels and an allowed dtype."""
    if not isinstance(images, Tensor):
        raise TransformError(f"images must be a torch tensor, got {type(images).__name__}")
    if images.ndim not in (3, 4) or images.shape[-1] != CHANNELS:
        raise TransformError(f"images must be HWC or NHWC with {CHANNELS} channels, got {tuple(images.shape)}")
    if images.dtype not in dtypes:
        raise TransformError(f"images must be {' or '.join(str(d) for d in dtypes)}, got {images.dtype}")
    height, width = images.shape[-3:-1]
    if height == 0 or width == 0 or height % block_size or width % block_size:
        raise TransformError(f"image size {height}x{width} is not divisible by the block size {block_size}")
    return images if images.ndim == 4 else images.unsqueeze(0)
