"""Resizing and training augmentation on uint8 image/mask pairs, before any encryption.

Paper 000 (000_03ca646f856607f9.txt, section IV-A-1) resizes inputs and ground truths to a
fixed size and trains with random resized crop and horizontal flip. Both act on the plain
uint8 H x W x 3 image and its H x W mask together, so block encryption runs afterwards on
exactly what the model sees; masks are never encrypted. Images resample bilinearly, masks by
nearest neighbour (class indices must not be blended).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from seglock.models.data.errors import DatasetError

Size = tuple[int, int]  # (height, width)


def as_size(size: int | tuple[int, int] | None) -> Size | None:
    """(height, width) from an int (square), a pair, or None (keep each image's own size)."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise DatasetError(f"size must be a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def as_generator(generator: Any = None) -> np.random.Generator:
    """A numpy Generator from a numpy Generator, a torch.Generator (drawn from), or None (fresh)."""
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, np.random.Generator):
        return generator
    import torch

    if isinstance(generator, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    raise TypeError(f"generator must be a numpy or torch Generator, got {type(generator).__name__}")


def _resize(array: np.ndarray, size: Size, resample: Image.Resampling, box=None) -> np.ndarray:
    height, width = size
    if box is None and array.shape[:2] == (height, width):
        return array
    return np.asarray(Image.fromarray(array).resize((width, height), resample, box=box))


def resize_pair(image: np.ndarray, mask: np.ndarray, size: Size | None) -> tuple[np.ndarray, np.ndarray]:
    """Resize an image (bilinear) and its mask (nearest) to `size`; None keeps them."""
    if size is None:
        return image, mask
    return _resize(image, size, Image.Resampling.BILINEAR), _resize(mask, size, Image.Resampling.NEAREST)


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width): torchvision's RandomResizedCrop sampling, numpy-driven."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback, as torchvision: the whole image, centre-cropped to the nearest allowed ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class RandomResizedCropFlip:
    """Random resized crop then horizontal flip, applied to an image and its mask together.

    Defaults are torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a flip
    probability of 0.5; paper 000 names the methods but not their parameters.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise DatasetError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise DatasetError(f"crop ratio must satisfy 0 < low <= high, got {ratio}")
        if not 0 <= flip_p <= 1:
            raise DatasetError(f"flip probability must be in [0, 1], got {flip_p}")
        self.scale, self.ratio, self.flip_p = tuple(scale), tuple(ratio), float(flip_p)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, size: Size | int | None = None, generator: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 H x W x 3 image and H x W mask in; the augmented pair at `size` out (None: input size)."""
        if image.shape[:2] != mask.shape[:2]:
            raise DatasetError(f"image size {image.shape[:2]} differs from mask size {mask.shape[:2]}")
        rng = as_generator(generator)
        height, width = image.shape[:2]
        out_size = as_size(size) or (height, width)
        top, left, h, w = random_resized_crop_params(height, width, self.scale, self.ratio, rng)
        box = (left, top, left + w, top + h)
        image = _resize(image, out_size, Image.Resampling.BILINEAR, box=box)
        mask = _resize(mask, out_size, Image.Resampling.NEAREST, box=box)
        if rng.random() < self.flip_p:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)

    def __repr__(self) -> str:
        return f"RandomResizedCropFlip(scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p})"
