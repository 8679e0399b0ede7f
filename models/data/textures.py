"""A texture-mosaic segmentation set built from real photographs that scikit-image ships.

seglock's second data set, made from pixels seglock does not generate: every scene's background
is a crop of a "clutter" photograph (an astronaut, the Hubble deep field, a cameraman, a rocket
launch, a coffee cup, coins), and 1-4 shapes (ellipses and polygons) are filled with crops of
texture photographs, one class per texture: brick, grass, gravel (CC0 texture photos), fur (the
cat in `chelsea.png`, regions that show only fur) and tissue (the immunohistochemistry slide
`ihc.png`). Crops have random scale, flip and rotation by multiples of 90 degrees and a mild
brightness/contrast jitter; grayscale photographs become three equal channels. Masks are exact
by construction (hard shape edges, no ignore pixels).

Validation scenes take every crop from source regions that training scenes never touch (for
most photos the left 70 % feeds training and the right 30 % validation; the cat's fur comes from
hand-picked fur-only boxes, some for training and others for validation), so a validation scene
is not a copy of training pixels. The split is decided per scene index by a seeded draw, and
scene `index` of `seed` depends on (seed, index, size, split) only.

The photographs are read from the installed scikit-image package (its wheel holds them); nothing
is downloaded. Seeded numpy generators are right here: this is data, not a key.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from seglock.models.data.errors import DatasetError

CLASS_NAMES = ("background", "brick", "grass", "gravel", "fur", "tissue")
MIN_SIZE = 16

# Source regions (x0, y0, x1, y1) in the photo's pixels, per split. `None` = the whole photo split
# at 70 % of its width: the left part for training scenes, the right part for validation scenes.
_TRAIN_SHARE = 0.7
_CLASS_SOURCES: dict[str, tuple[str, dict[str, list[tuple[int, int, int, int]]] | None]] = {
    "brick": ("brick.png", None),
    "grass": ("grass.png", None),
    "gravel": ("gravel.png", None),
    # chelsea.png (451 x 300): fur-only boxes, away from the eyes, nose and the room behind the cat.
    "fur": (
        "chelsea.png",
        {"train": [(60, 5, 205, 85), (15, 125, 130, 300)], "val": [(205, 0, 295, 110), (150, 160, 235, 222)]},
    ),
    "tissue": ("ihc.png", None),
}
CLUTTER_PHOTOS = (
    "astronaut.png",
    "hubble_deep_field.jpg",
    "camera.png",
    "rocket.jpg",
    "coffee.png",
    "coins.png",
)
SPLITS = ("train", "val")

_SCENE_STREAM = 11  # separates the per-scene generators from the split generator
_SPLIT_STREAM = 12
_OBJECTS = (1, 4)  # shapes per scene, inclusive
_RADIUS = (0.18, 0.36)  # shape radius as a fraction of the scene side
_ZOOM = (0.6, 1.2)  # source pixels per scene pixel, at a 128-pixel scene
_REFERENCE_SIZE = 128
_BRIGHTNESS = (-18.0, 18.0)
_CONTRAST = (0.85, 1.15)


def photos_dir() -> Path:
    """The folder of scikit-image's bundled photographs; DatasetError if scikit-image is missing."""
    try:
        import skimage
    except ImportError:
        raise DatasetError(
            "the textures data set needs scikit-image (pip install 'seglock[data]' or 'scikit-image>=0.26')"
        ) from None
    folder = Path(skimage.__file__).parent / "data"
    missing = [name for name in _all_photos() if not (folder / name).is_file()]
    if missing:
        raise DatasetError(
            f"scikit-image at {folder.parent} lacks its bundled photos ({', '.join(missing)}): "
            "install scikit-image>=0.26"
        )
    return folder


def _all_photos() -> list[str]:
    return [photo for photo, _ in _CLASS_SOURCES.values()] + list(CLUTTER_PHOTOS)


@cache
def _photo(name: str) -> np.ndarray:
    """A bundled photograph as float64 H x W x 3 (grayscale repeated into three channels)."""
    with Image.open(photos_dir() / name) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def source_regions(name: str, split: str) -> list[tuple[int, int, int, int]]:
    """The (x0, y0, x1, y1) regions of photo `name` that scenes of `split` may crop from."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: choose train or val")
    for photo, regions in _CLASS_SOURCES.values():
        if photo == name and regions is not None:
            return list(regions[split])
    if name not in _all_photos():
        raise DatasetError(f"{name} is not a source photo of the textures data set")
    height, width = _photo(name).shape[:2]
    cut = int(round(width * _TRAIN_SHARE))
    return [(0, 0, cut, height)] if split == "train" else [(cut, 0, width, height)]


def _crop(rng: np.random.Generator, name: str, split: str, side: int, zoom: float) -> tuple[np.ndarray, tuple]:
    """A `side` x `side` crop of photo `name` from `split`'s regions, at `zoom` source px per px.

    Returns the crop (float64, after flip, rotation and jitter) and where it came from
    (photo, x0, y0, x1, y1) in the photo's pixels. A region too small for the zoom is cropped
    at its largest square instead.
    """
    regions = source_regions(name, split)
    areas = np.array([(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in regions], dtype=np.float64)
    x0, y0, x1, y1 = regions[int(rng.choice(len(regions), p=areas / areas.sum()))]
    source = max(1, min(int(round(side * zoom)), x1 - x0, y1 - y0))
    left = int(rng.integers(x0, x1 - source + 1))
    top = int(rng.integers(y0, y1 - source + 1))
    patch = _photo(name)[top : top + source, left : left + source]
    resized = Image.fromarray(np.clip(patch, 0, 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    out = np.asarray(resized, dtype=np.float64)
    if rng.integers(2):
        out = out[:, ::-1]
    out = np.rot90(out, int(rng.integers(4)))
    contrast, brightness = rng.uniform(*_CONTRAST), rng.uniform(*_BRIGHTNESS)
    mean = out.mean()
    out = (out - mean) * contrast + mean + brightness
    return out, (name, left, top, left + source, top + source)


def _shape_mask(rng: np.random.Generator, side: int) -> np.ndarray:
    """A random ellipse or polygon (3-7 corners, star-shaped around the centre) filling a side x side box."""
    coords = (np.arange(side) + 0.5) / side * 2.0 - 1.0
    v, u = np.meshgrid(coords, coords, indexing="ij")
    angle = rng.uniform(0.0, math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    ru, rv = cos * u + sin * v, -sin * u + cos * v
    if rng.uniform() < 0.4:
        aspect = rng.uniform(0.55, 1.0)
        return ru**2 + (rv / aspect) ** 2 <= 1.0
    corners = int(rng.integers(3, 8))
    # Corners spread around the centre (each within its own sector), so no sliver shapes.
    jitter = rng.uniform(-0.3, 0.3, corners) * (2.0 * math.pi / corners)
    spread = np.arange(corners) * 2.0 * math.pi / corners + jitter + rng.uniform(0.0, 2.0 * math.pi)
    thetas = np.sort(spread % (2.0 * math.pi))
    radii = rng.uniform(0.6, 1.0, corners)
    xs, ys = radii * np.cos(thetas), radii * np.sin(thetas)
    # A star-shaped polygon around the origin: a pixel is inside when it lies within the triangle
    # (origin, corner i, corner i+1) of its angular sector.
    theta = np.arctan2(rv, ru) % (2.0 * math.pi)
    sector = np.searchsorted(thetas, theta) % corners
    prev = (sector - 1) % corners
    ax, ay, bx, by = xs[prev], ys[prev], xs[sector], ys[sector]
    cross_edge = (bx - ax) * (rv - ay) - (by - ay) * (ru - ax)
    cross_origin = (bx - ax) * (0.0 - ay) - (by - ay) * (0.0 - ax)
    inside = np.sign(cross_edge) == np.sign(cross_origin)
    return inside | ((ru * ru + rv * rv) <= 1e-6)


def check_params(size: int) -> None:
    if size < MIN_SIZE:
        raise DatasetError(f"scene size must be at least {MIN_SIZE} pixels, got {size}")


def generate_texture_scene(
    seed: int, index: int, size: int, split: str, *, provenance: list | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scene `index` of `seed` for `split`: (uint8 H x W x 3 image, uint8 H x W mask of class indices).

    When `provenance` is a list, one (class index, photo, x0, y0, x1, y1) entry per crop is
    appended to it (the background first), for tests and audits.
    """
    check_params(size)
    if seed < 0 or index < 0:
        raise DatasetError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: choose train or val")
    rng = np.random.default_rng([seed, _SCENE_STREAM, index])
    scale = _REFERENCE_SIZE / size  # the same field of view at every scene size
    clutter = CLUTTER_PHOTOS[int(rng.integers(len(CLUTTER_PHOTOS)))]
    image, where = _crop(rng, clutter, split, size, rng.uniform(*_ZOOM) * scale)
    if provenance is not None:
        provenance.append((0, *where))
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(_OBJECTS[0], _OBJECTS[1] + 1))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        side = max(4, int(round(2.0 * rng.uniform(*_RADIUS) * size)))
        top, left = (int(x) for x in rng.integers(-side // 4, size - 3 * side // 4, size=2))
        shape = _shape_mask(rng, side)
        photo = _CLASS_SOURCES[CLASS_NAMES[cls]][0]
        patch, where = _crop(rng, photo, split, side, rng.uniform(*_ZOOM) * scale)
        if provenance is not None:
            provenance.append((cls, *where))
        # Clip the shape's box to the scene; later shapes cover earlier ones.
        t0, l0 = max(top, 0), max(left, 0)
        t1, l1 = min(top + side, size), min(left + side, size)
        if t1 <= t0 or l1 <= l0:
            continue
        inside = shape[t0 - top : t1 - top, l0 - left : l1 - left]
        image[t0:t1, l0:l1][inside] = patch[t0 - top : t1 - top, l0 - left : l1 - left][inside]
        mask[t0:t1, l0:l1][inside] = cls
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def split_of(seed: int, n: int, val_fraction: float) -> list[str]:
    """The split ("train" or "val") of each of `n` scenes: a seeded draw, at least one val scene
    when the fraction is positive (and n > 1)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"validation fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    val = set(order[:n_val].tolist())
    return ["val" if i in val else "train" for i in range(n)]


def write_textures_dataset(
    out: str | Path,
    n: int,
    seed: int,
    size: int,
    val_fraction: float = 0.1,
    *,
    force: bool = False,
    on_scene: Callable[[], None] | None = None,
) -> dict:
    """Write `n` texture-mosaic scenes in the folder format (images/, masks/, classes.json, splits.json).

    Same rules as `write_synth_dataset`: refuses a folder that already holds images or masks
    unless `force` (which removes the old PNGs first). Returns a summary with the class pixel shares.
    """
    from seglock.models.data.synth import finish_output, prepare_output, scene_stem

    check_params(size)
    if n < 1:
        raise DatasetError(f"number of scenes must be at least 1, got {n}")
    if seed < 0:
        raise DatasetError(f"seed must be non-negative, got {seed}")
    photos_dir()  # a clear error before touching the output folder
    images_dir, masks_dir = prepare_output(out, force=force)
    out = Path(out)
    splits_of = split_of(seed, n, val_fraction)
    pixels = np.zeros(len(CLASS_NAMES), dtype=np.int64)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for index in range(n):
        image, mask = generate_texture_scene(seed, index, size, splits_of[index])
        stem = scene_stem(index)
        Image.fromarray(image).save(images_dir / f"{stem}.png")
        Image.fromarray(mask).save(masks_dir / f"{stem}.png")
        pixels += np.bincount(mask.reshape(-1), minlength=len(CLASS_NAMES))
        splits[splits_of[index]].append(stem)
        if on_scene is not None:
            on_scene()
    return finish_output(out, list(CLASS_NAMES), splits, pixels, scenes=n, seed=seed, size=size)
