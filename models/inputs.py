"""The model input of every protection mode, in one place (training, evaluation, attacks, serving).

A batch is NHWC: uint8 pixels, or, once FFX-encrypted, int16 values 0..999. The model sees
NCHW float32: the (encrypted) values divided by `input_scale(method)` (paper 001 section 2.4),
then normalised by the artifact's mean and std.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from seglock.client.modes import Mode
from seglock.client.transforms import BlockKey
from seglock.models.encryption import encrypt_blocks_torch, encrypt_per_image_torch, to_model_input


def normalize_(batch: Tensor, normalization: Mapping[str, Any]) -> Tensor:
    """(x - mean) / std per channel of an NCHW float batch, in place: the same two operations as
    out of place, in the same order, so the same values, without two more images in memory."""
    mean = torch.as_tensor(normalization["mean"], dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    std = torch.as_tensor(normalization["std"], dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    return batch.sub_(mean).div_(std)


def scaled_input(encrypted: Tensor, mode: str, normalization: Mapping[str, Any]) -> Tensor:
    """An already-encrypted (or plain, for none/cp) NHWC batch -> normalised NCHW model input."""
    method = mode if Mode(mode).is_block else Mode.NONE
    return normalize_(to_model_input(encrypted, method), normalization)  # a fresh tensor: ours to change


def encrypt_for_mode(batch: Tensor, protection: Mapping[str, Any], key: BlockKey | None = None) -> Tensor:
    """Encrypt a uint8 NHWC batch the way a model of this protection expects its input."""
    mode = Mode(protection["mode"])
    if mode.is_block:
        if key is None:
            raise ValueError(f"a {mode} model needs its block key to encrypt inputs")
        return encrypt_blocks_torch(batch, key)
    if mode is Mode.PER_IMAGE:
        return encrypt_per_image_torch(batch, protection["block_size"], protection["sub_block"])
    return batch


def model_input(batch: Tensor, manifest) -> Tensor:
    """NHWC batch already in the model's input domain (encrypted where needed) -> model input of
    the artifact described by `manifest` (a `models.Manifest`)."""
    return scaled_input(batch, manifest.protection["mode"], manifest.normalization)
