"""Cityscapes (fine annotations) from its usual layout on disk.

    ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png

labelIds (0..33) map to the 19 training ids of the benchmark; every other id becomes 255
(ignore), as in cityscapesScripts' `labels.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seglock.models.data.augment import RandomResizedCropFlip
from seglock.models.data.dataset import DEFAULT_SIZE, IGNORE_INDEX, Augment, Sample, SegmentationDataset, missing_list
from seglock.models.data.errors import DatasetError

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_SPLITS = ("train", "val", "test")
# labelId -> trainId for the 19 evaluated classes (cityscapesScripts helpers/labels.py).
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"
_LAYOUT = "expected leftImg8bit/{split}/{city}/*_leftImg8bit.png and gtFine/{split}/{city}/*_gtFine_labelIds.png"


def train_id_table() -> np.ndarray:
    """uint8[256] lookup: labelId -> trainId, 255 for ids not evaluated."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


class CityscapesDataset(SegmentationDataset):
    """Cityscapes fine annotations as 19 train ids (255 = ignore); split "train", "val" or "test"."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        size: int | tuple[int, int] | None = DEFAULT_SIZE,
        augment: Augment | RandomResizedCropFlip | None = None,
        seed: int | None = None,
    ) -> None:
        root = Path(root)
        if split not in CITYSCAPES_SPLITS:
            raise DatasetError(f"unknown Cityscapes split {split!r}: choose one of {', '.join(CITYSCAPES_SPLITS)}")
        if not root.is_dir():
            raise DatasetError(f"data directory {root} does not exist")
        for part in ("leftImg8bit", "gtFine"):
            if not (root / part / split).is_dir():
                raise DatasetError(f"no {part}/{split}/ folder in {root}: {_LAYOUT}")
        images = sorted((root / "leftImg8bit" / split).glob(f"*/*{_IMAGE_SUFFIX}"))
        if not images:
            raise DatasetError(f"no *{_IMAGE_SUFFIX} images in {root / 'leftImg8bit' / split}: {_LAYOUT}")
        samples = []
        for image in images:
            stem = image.name[: -len(_IMAGE_SUFFIX)]
            label = root / "gtFine" / split / image.parent.name / f"{stem}{_LABEL_SUFFIX}"
            samples.append(Sample(stem, image, label))
        missing = [s.stem for s in samples if not s.mask.is_file()]
        if missing:
            raise DatasetError(
                f"{len(missing)} images have no *{_LABEL_SUFFIX} in {root / 'gtFine' / split}: {missing_list(missing)}"
            )
        super().__init__(
            samples, CITYSCAPES_CLASSES, size=size, augment=augment, seed=seed,
            label_map=train_id_table(), name=f"cityscapes:{split}",
        )
        self.root = root
        self.split = split
