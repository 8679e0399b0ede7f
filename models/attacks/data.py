"""The attacker's small data set D' (paper 000 §IV-D): a fixed fraction of the owner's training split."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from seglock.models.data import DatasetError, RandomResizedCropFlip, detect_format, open_dataset
from seglock.models.data.folder import FolderDataset
from seglock.models.errors import ModelError
from seglock.models.train import DEFAULT_SPLITS, HOLDOUT_EVERY

__all__ = ["AttackError", "attacker_subset", "check_fraction"]


class AttackError(ModelError):
    """An attack that cannot be run as asked."""


def check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise AttackError(f"the attacker's fraction of the training data must be in (0, 1], got {fraction!r}")
    return float(fraction)


def attacker_subset(
    data_dir: str | os.PathLike[str],
    size: tuple[int, int],
    fraction: float,
    *,
    seed: int = 0,
    augment: bool = True,
) -> tuple[Dataset, Dataset, int]:
    """(D' with training augmentation, D' without it, number of training images it was drawn from).

    D' is ceil(fraction x N) images of the training split (the same split `seglock train` uses),
    drawn without replacement by a generator seeded by `seed`: the same images on every run.
    """
    fraction = check_fraction(fraction)
    try:
        kind = detect_format(data_dir)
        crop = RandomResizedCropFlip(scale=(0.25, 1.0)) if augment else None
        if kind == "folder" and not (Path(data_dir) / "splits.json").is_file():
            # train's fixed holdout: every 10th stem validates, the rest trains
            plain = FolderDataset(data_dir, "all", size=size)
            augmented = FolderDataset(data_dir, "all", size=size, augment=crop, seed=seed)
            pool = [i for i in range(len(plain)) if i % HOLDOUT_EVERY or len(plain) == 1]
        else:
            split = DEFAULT_SPLITS[kind][0]
            plain = open_dataset(data_dir, split, kind=kind, size=size)
            augmented = open_dataset(data_dir, split, kind=kind, size=size, augment=crop, seed=seed)
            pool = list(range(len(plain)))
    except DatasetError as exc:
        raise AttackError(str(exc)) from None
    count = max(1, math.ceil(fraction * len(pool) - 1e-9))
    chosen = np.random.default_rng([seed, 5]).choice(len(pool), size=count, replace=False)
    indices = sorted(pool[i] for i in chosen)
    return Subset(augmented, indices), Subset(plain, indices), len(pool)
