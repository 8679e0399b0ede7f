"""Data sets: the seglock folder format, VOC2012, Cityscapes, synthetic scenes, augmentation.

Every loader yields `(image, mask)`: uint8 H x W x 3 (channels last, ready for the block
transforms) and int64 H x W class indices with 255 = ignore, at a fixed size (256 by default).
"""

from __future__ import annotations

from pathlib import Path

from seglock.models.data.augment import RandomResizedCropFlip, as_generator, random_resized_crop_params, resize_pair
from seglock.models.data.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_SPLITS, CityscapesDataset, train_id_table
from seglock.models.data.dataset import DEFAULT_SIZE, IGNORE_INDEX, SegmentationDataset, describe
from seglock.models.data.errors import DatasetError
from seglock.models.data.folder import FOLDER_SPLITS, FolderDataset
from seglock.models.data.synth import CLASS_NAMES, generate_scene, write_synth_dataset
from seglock.models.data.voc import VOC_CLASSES, VOC_SPLITS, VOC2012Dataset, find_voc_root

FORMATS = {"folder": FolderDataset, "voc": VOC2012Dataset, "cityscapes": CityscapesDataset}
SPLITS = {"folder": FOLDER_SPLITS, "voc": VOC_SPLITS, "cityscapes": CITYSCAPES_SPLITS}


def detect_format(root: str | Path) -> str:
    """"folder", "voc" or "cityscapes", from what lies in `root`."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data directory {root} does not exist")
    if (root / "images").is_dir() or (root / "classes.json").is_file():
        return "folder"
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    try:
        find_voc_root(root)
        return "voc"
    except DatasetError:
        pass
    raise DatasetError(
        f"cannot tell the data format of {root}: expected the folder format of `seglock data synth` "
        "(images/, masks/, classes.json), VOCdevkit/VOC2012, or Cityscapes (leftImg8bit/, gtFine/)"
    )


def open_dataset(
    root: str | Path,
    split: str,
    *,
    kind: str | None = None,
    size: int | tuple[int, int] | None = DEFAULT_SIZE,
    augment: RandomResizedCropFlip | None = None,
    seed: int | None = None,
) -> SegmentationDataset:
    """The data set at `root` (format detected unless `kind` is given) for `split`."""
    kind = kind or detect_format(root)
    if kind not in FORMATS:
        raise DatasetError(f"unknown data format {kind!r}: choose one of {', '.join(FORMATS)}")
    return FORMATS[kind](root, split, size=size, augment=augment, seed=seed)


__all__ = [
    "CITYSCAPES_CLASSES",
    "CLASS_NAMES",
    "CityscapesDataset",
    "DEFAULT_SIZE",
    "DatasetError",
    "FORMATS",
    "FolderDataset",
    "IGNORE_INDEX",
    "RandomResizedCropFlip",
    "SPLITS",
    "SegmentationDataset",
    "VOC2012Dataset",
    "VOC_CLASSES",
    "as_generator",
    "describe",
    "detect_format",
    "find_voc_root",
    "generate_scene",
    "open_dataset",
    "random_resized_crop_params",
    "resize_pair",
    "train_id_table",
    "write_synth_dataset",
]
