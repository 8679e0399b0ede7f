"""PASCAL VOC2012 segmentation from its usual layout on disk.

    ROOT/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    ROOT/VOCdevkit/VOC2012/SegmentationClass/<id>.png        palette PNGs: index = class, 255 = border
    ROOT/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt

ROOT may also be the VOCdevkit or VOC2012 folder itself. Splits: "train" (1464), "val" (the
1449 development images papers 000 and 001 evaluate on), "trainval", and paper 000's split of
the training set (000_03ca646f856607f9.txt, section IV-A-1): "train-1318" is the first 1318
ids of train.txt in file order and "val-146" the last 146.
"""

from __future__ import annotations

from pathlib import Path

from seglock.models.data.augment import RandomResizedCropFlip
from seglock.models.data.dataset import DEFAULT_SIZE, Augment, Sample, SegmentationDataset, missing_list
from seglock.models.data.errors import DatasetError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
VOC_SPLITS = ("train", "val", "trainval", "train-1318", "val-146")
VOC_TRAIN_SIZE = 1464
PAPER_TRAIN_SIZE = 1318  # paper 000: 1318 for training, 146 for validating the loss
_LAYOUT = "expected VOCdevkit/VOC2012 with JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/"


def find_voc_root(root: str | Path) -> Path:
    """The VOC2012 folder under `root` (root itself, root/VOC2012 or root/VOCdevkit/VOC2012)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data directory {root} does not exist")
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DatasetError(f"no VOC2012 layout under {root}: {_LAYOUT}")


def voc_split_ids(voc: Path, split: str) -> list[str]:
    """Image ids of a split, in the list file's order."""
    if split not in VOC_SPLITS:
        raise DatasetError(f"unknown VOC split {split!r}: choose one of {', '.join(VOC_SPLITS)}")
    list_name = "train" if split in ("train-1318", "val-146") else split
    path = voc / "ImageSets" / "Segmentation" / f"{list_name}.txt"
    if not path.is_file():
        raise DatasetError(f"no {path.relative_to(voc)} in {voc}: {_LAYOUT}")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if split in ("train-1318", "val-146"):
        if len(ids) != VOC_TRAIN_SIZE:
            raise DatasetError(
                f"{path} lists {len(ids)} ids; the {split} split needs VOC2012's {VOC_TRAIN_SIZE}-image train.txt"
            )
        return ids[:PAPER_TRAIN_SIZE] if split == "train-1318" else ids[PAPER_TRAIN_SIZE:]
    return ids


class VOC2012Dataset(SegmentationDataset):
    """VOC2012 segmentation (21 classes, 255 = ignore); see the module docstring for splits."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        size: int | tuple[int, int] | None = DEFAULT_SIZE,
        augment: Augment | RandomResizedCropFlip | None = None,
        seed: int | None = None,
    ) -> None:
        voc = find_voc_root(root)
        if not (voc / "SegmentationClass").is_dir():
            raise DatasetError(f"no SegmentationClass/ folder in {voc}: {_LAYOUT}")
        ids = voc_split_ids(voc, split)
        if not ids:
            raise DatasetError(f"split {split!r} of {voc} is empty")
        samples = [Sample(i, voc / "JPEGImages" / f"{i}.jpg", voc / "SegmentationClass" / f"{i}.png") for i in ids]
        for what, attr in (("images", "image"), ("masks", "mask")):
            missing = [s.stem for s in samples if not getattr(s, attr).is_file()]
            if missing:
                folder = "JPEGImages" if attr == "image" else "SegmentationClass"
                raise DatasetError(
                    f"{len(missing)} {what} of split {split!r} missing from {voc / folder}: {missing_list(missing)}"
                )
        super().__init__(samples, VOC_CLASSES, size=size, augment=augment, seed=seed, name=f"voc2012:{split}")
        self.root = voc
        self.split = split
