"""From an upload to a model input tensor, and from a mask to a response body.

Pure functions of arrays and the hosted model; the routes run them off the event loop (or in place
where a thread cannot help: `app/offload.py`).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from seglock.app.errors import StaleKeyVersion, unprocessable, unsupported_media
from seglock.app.imageio import Upload, encode_mask_png, resize_mask, resize_rgb
from seglock.app.registry import HostedModel
from seglock.client.modes import Mode
from seglock.client.transforms import encrypt_blocks, encrypt_per_image
from seglock.client.transforms.ffx import FFX_MAX


def check_key_version(hosted: HostedModel, header: str | None) -> None:
    """Encrypted block inputs must name the key they were made with, and it must be current."""
    if header is None:
        raise StaleKeyVersion(f"encrypted input for {hosted.name} needs X-Seglock-Key-Version "
                       f"(current: {hosted.key_version})")
    try:
        version = int(header)
    except ValueError:
        raise StaleKeyVersion(f"X-Seglock-Key-Version must be an integer (current: {hosted.key_version})") from None
    if version != hosted.key_version:
        raise StaleKeyVersion(f"key version {version} is stale; the current key version of {hosted.name} is "
                       f"{hosted.key_version}: fetch the client key again")


def encrypted_array(upload: Upload, hosted: HostedModel) -> np.ndarray:
    """An input the client encrypted: lossless, exactly the model's input size, the right dtype."""
    if not upload.lossless:
        raise unsupported_media(f"encrypted input must be lossless (PNG or .npy), not {upload.kind.upper()}")
    if upload.source_mode not in ("RGB", "npy"):
        raise unprocessable(f"an encrypted PNG must be 8-bit RGB, not mode {upload.source_mode}")
    height, width = hosted.manifest.input_size
    if upload.array.shape[:2] != (height, width):
        raise unprocessable(f"encrypted input must be exactly {height}x{width} (HxW), "
                            f"got {upload.array.shape[0]}x{upload.array.shape[1]}")
    if hosted.mode is Mode.FFX:
        if upload.array.dtype != np.uint16 or int(upload.array.max(initial=0)) > FFX_MAX:
            raise unprocessable(f"ffx input must be a uint16 .npy with values 0..{FFX_MAX}")
    elif upload.array.dtype != np.uint8:
        raise unprocessable(f"{hosted.mode} input must be uint8")
    return upload.array


def plain_to_model_array(image: np.ndarray, hosted: HostedModel) -> np.ndarray:
    """A plain image resized to the model's input and, where the model needs it, encrypted here."""
    resized = resize_rgb(image, tuple(hosted.manifest.input_size))
    if hosted.mode.is_block:
        return encrypt_blocks(resized, hosted.block_key)
    if hosted.mode is Mode.PER_IMAGE:
        protection = hosted.manifest.protection
        return encrypt_per_image(resized, block_size=protection["block_size"], sub_block=protection["sub_block"])
    return resized


def to_tensor(array: np.ndarray, hosted: HostedModel) -> torch.Tensor:
    """HWC array (already encrypted where the mode needs it) -> CHW float model input."""
    if array.dtype == np.uint16:
        batch = torch.from_numpy(array.astype(np.int16))[None]
    else:
        batch = torch.from_numpy(np.require(array, requirements=["C", "W"]))[None]
    return hosted.prepare(batch)[0]


def prepare(upload: Upload, hosted: HostedModel, *, encrypted: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """(model input, the size the mask is answered at)."""
    if encrypted:
        array = encrypted_array(upload, hosted)
        return to_tensor(array, hosted), array.shape[:2]
    if upload.array.dtype != np.uint8:
        raise unprocessable("a plain image must be 8-bit; uint16 tensors are for ffx-encrypted input")
    return to_tensor(plain_to_model_array(upload.array, hosted), hosted), upload.size


def mask_png(mask: np.ndarray, size: tuple[int, int]) -> bytes:
    return encode_mask_png(resize_mask(mask, size))


def mask_json(mask: np.ndarray, size: tuple[int, int], hosted: HostedModel) -> bytes:
    full = resize_mask(mask, size)
    counts = np.bincount(full.reshape(-1), minlength=hosted.manifest.num_classes)
    names = list(hosted.manifest.class_names)
    body = {
        "model": hosted.name,
        "model_version": hosted.revision,
        "key_version": hosted.key_version,
        "height": int(full.shape[0]),
        "width": int(full.shape[1]),
        "class_names": names,
        "counts": {names[i] if i < len(names) else str(i): int(c) for i, c in enumerate(counts) if c},
        "mask": full.tolist(),
    }
    return json.dumps(body, separators=(",", ":")).encode()
