"""The torch Dataset every loader builds: (image, mask) pairs at a fixed size.

Items are `(image, mask)`: image a uint8 tensor H x W x 3 (channels last, the layout the block
transforms of `seglock.client.transforms` encrypt), mask an int64 tensor H x W of class indices with
255 = ignore. Training code encrypts and normalises after this, so augmentation always sees
plain pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from seglock.models.data.augment import Size, as_size, resize_pair
from seglock.models.data.errors import DatasetError

IGNORE_INDEX = 255
DEFAULT_SIZE = 256  # paper 000, section IV-A-1: images and ground truths resized to 256 x 256
_MASK_MODES = ("L", "P", "I", "I;16")
_SHOW_MISSING = 5

Augment = Callable[[np.ndarray, np.ndarray, Size | None, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Sample:
    stem: str
    image: Path
    mask: Path


def missing_list(names: Sequence[str]) -> str:
    """'a, b, c' for the first few names, with a count of the rest."""
    shown = ", ".join(names[:_SHOW_MISSING])
    rest = len(names) - _SHOW_MISSING
    return shown + (f" (and {rest} more)" if rest > 0 else "")


def read_image(path: Path) -> np.ndarray:
    """uint8 H x W x 3 RGB."""
    with Image.open(path) as img:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def read_mask(path: Path) -> np.ndarray:
    """uint8 H x W class indices from a single-channel PNG (L, or P palette indices as in VOC)."""
    with Image.open(path) as img:
        if img.mode not in _MASK_MODES:
            raise DatasetError(
                f"mask {path} must be a single-channel image of class indices (mode L or P), got mode {img.mode}"
            )
        mask = np.asarray(img)
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise DatasetError(f"mask {path} holds values outside 0..255")
        mask = mask.astype(np.uint8)
    return mask


class SegmentationDataset(Dataset):
    """Image/mask pairs, resized to `size` (or augmented to it) on access.

    `augment(image, mask, size, rng)` replaces the plain resize when given. With a `seed`,
    item i of epoch e draws from numpy's Generator seeded by (seed, e, i): the same on every
    run and in every DataLoader worker; without one, each access draws fresh entropy.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        *,
        size: int | tuple[int, int] | None = DEFAULT_SIZE,
        augment: Augment | None = None,
        seed: int | None = None,
        label_map: np.ndarray | None = None,
        name: str = "",
    ) -> None:
        if not samples:
            raise DatasetError(f"data set {name or '(unnamed)'} has no samples")
        if not 1 <= len(classes) <= IGNORE_INDEX:
            raise DatasetError(f"need 1..{IGNORE_INDEX} classes, got {len(classes)}")
        if label_map is not None and (label_map.shape != (256,) or label_map.dtype != np.uint8):
            raise DatasetError("label_map must be a uint8 lookup table of 256 entries")
        self.samples = list(samples)
        self.classes = list(classes)
        self.size = as_size(size)
        self.augment = augment
        self.seed = seed
        self.label_map = label_map
        self.name = name
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def stems(self) -> list[str]:
        return [s.stem for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Draw a new set of augmentations (with a seed, still reproducible)."""
        self.epoch = int(epoch)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item `index` at its stored size: uint8 H x W x 3 image, uint8 H x W mask (mapped, checked)."""
        sample = self.samples[index]
        image, mask = read_image(sample.image), read_mask(sample.mask)
        if image.shape[:2] != mask.shape:
            raise DatasetError(
                f"{sample.stem}: image is {image.shape[1]}x{image.shape[0]} but mask is {mask.shape[1]}x{mask.shape[0]}"
            )
        if self.label_map is not None:
            mask = self.label_map[mask]
        bad = mask[(mask >= self.num_classes) & (mask != IGNORE_INDEX)]
        if bad.size:
            raise DatasetError(
                f"mask {sample.mask} holds class {int(bad.max())} but the data set has {self.num_classes} classes"
            )
        return image, mask

    def generator(self, index: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        image, mask = self.load(index)
        if self.augment is not None:
            image, mask = self.augment(image, mask, self.size, self.generator(index))
        else:
            image, mask = resize_pair(image, mask, self.size)
        # A writable C-contiguous copy only when needed: PIL-backed arrays are read-only.
        image = np.require(image, np.uint8, requirements=["C", "W"])
        return torch.from_numpy(image), torch.from_numpy(mask.astype(np.int64))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, samples={len(self)}, classes={self.num_classes}, "
            f"size={self.size}, augment={self.augment!r})"
        )


def describe(dataset: SegmentationDataset) -> dict[str, Any]:
    """A JSON-ready summary: name, count, classes, size."""
    return {
        "name": dataset.name,
        "samples": len(dataset),
        "classes": dataset.classes,
        "size": list(dataset.size) if dataset.size else None,
    }
