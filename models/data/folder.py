"""The folder format every seglock command reads (and `seglock data synth` writes).

    DIR/images/<stem>.png|jpg|jpeg|webp|bmp   RGB images
    DIR/masks/<stem>.png                      single-channel class indices, 255 = ignore
    DIR/classes.json                          class names in index order: ["background", ...]
                                              (an object {"classes": [...]} is read too)
    DIR/splits.json                           optional: {"train": [stems], "val": [stems]}

Split "all" is every stem in sorted order; "train" and "val" come from splits.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from seglock.models.data.augment import RandomResizedCropFlip
from seglock.models.data.dataset import DEFAULT_SIZE, Augment, Sample, SegmentationDataset, missing_list
from seglock.models.data.errors import DatasetError

FOLDER_SPLITS = ("all", "train", "val")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_LAYOUT = "expected the folder format of `seglock data synth` (images/, masks/, classes.json)"


def read_classes(path: Path) -> list[str]:
    """Class names from classes.json: a list of names, or {"classes": [names]}."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if isinstance(data, dict):
        data = data.get("classes")
    if not isinstance(data, list) or not data or not all(isinstance(n, str) for n in data):
        raise DatasetError(f"{path} must hold a non-empty JSON list of class names")
    return data


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in found:
                names = f"{found[path.stem].name}, {path.name}"
                raise DatasetError(f"two files for stem {path.stem!r} in {folder}: {names}")
            found[path.stem] = path
    return found


def _read_split(root: Path, split: str) -> list[str]:
    path = root / "splits.json"
    if not path.is_file():
        raise DatasetError(f"no splits.json in {root}: use split 'all' or add splits.json with train/val stem lists")
    try:
        splits = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    stems = splits.get(split) if isinstance(splits, dict) else None
    if not isinstance(stems, list) or not all(isinstance(s, str) for s in stems):
        raise DatasetError(f"{path} has no list of stems for split {split!r}")
    return stems


class FolderDataset(SegmentationDataset):
    """A data set in the folder format; `split` is "all", "train" or "val"."""

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        *,
        size: int | tuple[int, int] | None = DEFAULT_SIZE,
        augment: Augment | RandomResizedCropFlip | None = None,
        seed: int | None = None,
    ) -> None:
        root = Path(root)
        if split not in FOLDER_SPLITS:
            choices = ", ".join(FOLDER_SPLITS)
            raise DatasetError(f"unknown split {split!r} for a folder data set: choose one of {choices}")
        if not root.is_dir():
            raise DatasetError(f"data directory {root} does not exist")
        for part in ("images", "masks"):
            if not (root / part).is_dir():
                raise DatasetError(f"no {part}/ folder in {root}: {_LAYOUT}")
        if not (root / "classes.json").is_file():
            raise DatasetError(f"no classes.json in {root}: {_LAYOUT}")
        classes = read_classes(root / "classes.json")
        images = _files_by_stem(root / "images", IMAGE_SUFFIXES)
        masks = _files_by_stem(root / "masks", (".png",))
        if not images:
            raise DatasetError(f"no images in {root / 'images'}: {_LAYOUT}")
        no_mask = sorted(set(images) - set(masks))
        if no_mask:
            raise DatasetError(f"{len(no_mask)} images have no mask in {root / 'masks'}: {missing_list(no_mask)}")
        no_image = sorted(set(masks) - set(images))
        if no_image:
            raise DatasetError(f"{len(no_image)} masks have no image in {root / 'images'}: {missing_list(no_image)}")
        stems = sorted(images) if split == "all" else _read_split(root, split)
        unknown = [s for s in stems if s not in images]
        if unknown:
            raise DatasetError(
                f"splits.json lists {len(unknown)} stems with no image in {root}: {missing_list(unknown)}"
            )
        if not stems:
            raise DatasetError(f"split {split!r} of {root} is empty")
        samples = [Sample(s, images[s], masks[s]) for s in stems]
        super().__init__(samples, classes, size=size, augment=augment, seed=seed, name=f"{root}:{split}")
        self.root = root
        self.split = split
