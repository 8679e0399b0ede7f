"""Synthetic segmentation scenes whose classes are shapes and textures, never colours.

Every object kind (class) is a shape with a texture; its colours come from one palette shared by
all classes and by the background clutter, so a per-pixel colour lookup cannot tell classes
apart and a model has to learn shape and texture. Objects have random scale, rotation and
position, and later objects cover earlier ones. Edges are drawn hard, so every pixel has an exact
class: synthetic masks never hold the ignore index 255.

Scene `index` of seed `seed` depends on (seed, index, size, classes) only, not on how many
scenes are made. Seeded numpy generators are right here: this is data, not a key.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from seglock.models.data.errors import DatasetError

CLASS_NAMES = (
    "background",
    "disc",
    "square",
    "triangle",
    "ring",
    "striped_blob",
    "checker_hexagon",
    "cross",
    "dotted_star",
    "crescent",
)
DEFAULT_CLASSES = 6  # background + 5 object kinds
MIN_CLASSES = 2
MAX_CLASSES = len(CLASS_NAMES)
MIN_SIZE = 16

# One palette for every class and for the background: colour carries no class information.
PALETTE = np.array(
    [
        (220, 40, 40), (40, 170, 60), (40, 80, 210), (230, 200, 40),
        (200, 60, 200), (40, 190, 200), (240, 130, 30), (130, 130, 130),
        (245, 245, 245), (30, 30, 30), (140, 90, 40), (120, 200, 120),
    ],
    dtype=np.float64,
)

_SCENE_STREAM = 1  # separates the per-scene generators from the split generator
_SPLIT_STREAM = 2
_OBJECTS = (2, 6)  # objects per scene, inclusive
_RADIUS = (0.08, 0.24)  # object radius as a fraction of the image side
_CLUTTER_LINES = (3, 8)
_NOISE_STD = 6.0
_SQRT3 = math.sqrt(3.0)


# Shapes: (u, v) are object coordinates (rotated, in units of the radius); each fits the unit disc.
def _disc(u, v, phase):
    return u * u + v * v <= 1.0


def _square(u, v, phase):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.7


def _triangle(u, v, phase):
    return (v >= -0.5) & (_SQRT3 * u + v <= 1.0) & (-_SQRT3 * u + v <= 1.0)


def _ring(u, v, phase):
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55**2)


def _blob(u, v, phase):
    theta = np.arctan2(v, u)
    return np.hypot(u, v) <= 0.78 + 0.22 * np.sin(3.0 * theta + 2.0 * math.pi * phase)


def _hexagon(u, v, phase):
    return (np.abs(v) <= _SQRT3 / 2) & (_SQRT3 * np.abs(u) + np.abs(v) <= _SQRT3)


def _cross(u, v, phase):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))


def _star(u, v, phase):
    theta = np.arctan2(v, u)
    tip = 2.0 * np.abs((5.0 * theta / (2.0 * math.pi)) % 1.0 - 0.5)  # 1 at the five tips
    return np.hypot(u, v) <= 0.45 + 0.55 * tip


def _crescent(u, v, phase):
    return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.7**2)


# Textures: colour per pixel from two palette colours c0, c1 (each of shape (3,)).
def _solid(u, v, c0, c1, phase):
    return np.broadcast_to(c0, u.shape + (3,))


def _stripes(u, v, c0, c1, phase):
    return np.where((((u * 3.0 + phase) % 1.0) < 0.5)[..., None], c0, c1)


def _checker(u, v, c0, c1, phase):
    cells = np.floor(u * 2.5 + phase) + np.floor(v * 2.5 + phase)
    return np.where((cells % 2 == 0)[..., None], c0, c1)


def _dots(u, v, c0, c1, phase):
    period = 0.35
    du = (u + phase * period) % period - period / 2
    dv = (v + phase * period) % period - period / 2
    return np.where((du * du + dv * dv <= 0.12**2)[..., None], c1, c0)


def _gradient(u, v, c0, c1, phase):
    t = np.clip((u + 1.0) / 2.0, 0.0, 1.0)[..., None]
    return c0 + (c1 - c0) * t


# Class index -> (shape, texture); index 0 is the background.
_KINDS = (
    None,
    (_disc, _solid),
    (_square, _solid),
    (_triangle, _solid),
    (_ring, _solid),
    (_blob, _stripes),
    (_hexagon, _checker),
    (_cross, _solid),
    (_star, _dots),
    (_crescent, _gradient),
)


def check_params(size: int, num_classes: int) -> None:
    """DatasetError unless the scene size and number of classes are supported."""
    if size < MIN_SIZE:
        raise DatasetError(f"scene size must be at least {MIN_SIZE} pixels, got {size}")
    if not MIN_CLASSES <= num_classes <= MAX_CLASSES:
        raise DatasetError(f"number of classes must be {MIN_CLASSES}..{MAX_CLASSES}, got {num_classes}")


def generate_scene(
    seed: int, index: int, size: int, num_classes: int = DEFAULT_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Scene `index` of `seed`: (uint8 H x W x 3 image, uint8 H x W mask of class indices)."""
    check_params(size, num_classes)
    if seed < 0 or index < 0:
        raise DatasetError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, _SCENE_STREAM, index])
    image = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(_OBJECTS[0], _OBJECTS[1] + 1))):
        _draw_object(image, mask, int(rng.integers(1, num_classes)), rng)
    image += rng.normal(0.0, _NOISE_STD, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _pick_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    return PALETTE[rng.choice(len(PALETTE), size=count, replace=False)]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A gradient between two palette colours crossed by palette-coloured clutter lines."""
    c0, c1 = _pick_colours(rng, 2)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    coords = (np.arange(size) + 0.5) / size
    t = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-9)
    image = c0 + (c1 - c0) * t[..., None]
    ys, xs = coords[:, None] * size, coords[None, :] * size
    for _ in range(int(rng.integers(_CLUTTER_LINES[0], _CLUTTER_LINES[1] + 1))):
        (y0, x0), (y1, x1) = rng.uniform(0, size, size=(2, 2))
        half_width = rng.uniform(0.5, max(1.0, size / 96))
        colour = _pick_colours(rng, 1)[0]
        image[_segment_distance(ys, xs, y0, x0, y1, x1) <= half_width] = colour
    return image


def _segment_distance(ys, xs, y0, x0, y1, x1) -> np.ndarray:
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((ys - y0) * dy + (xs - x0) * dx) / max(dy * dy + dx * dx, 1e-9), 0.0, 1.0)
    return np.hypot(ys - (y0 + t * dy), xs - (x0 + t * dx))


def _draw_object(image: np.ndarray, mask: np.ndarray, cls: int, rng: np.random.Generator) -> None:
    """Paint one object of class `cls` over whatever is there (occlusion by drawing order)."""
    size = mask.shape[0]
    # Every object draws the same random values in the same order, whatever its kind.
    radius = rng.uniform(*_RADIUS) * size
    cy, cx = rng.uniform(0.1, 0.9, size=2) * size
    angle = rng.uniform(0.0, 2.0 * math.pi)
    c0, c1 = _pick_colours(rng, 2) * rng.uniform(0.8, 1.15)  # brightness jitter blurs the palette
    phase = rng.uniform(0.0, 1.0)
    top, bottom = max(0, int(cy - radius) - 1), min(size, int(cy + radius) + 2)
    left, right = max(0, int(cx - radius) - 1), min(size, int(cx + radius) + 2)
    dy = ((np.arange(top, bottom) + 0.5 - cy) / radius)[:, None]
    dx = ((np.arange(left, right) + 0.5 - cx) / radius)[None, :]
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    shape, texture = _KINDS[cls]
    inside = shape(u, v, phase)
    image[top:bottom, left:right][inside] = texture(u, v, c0, c1, phase)[inside]
    mask[top:bottom, left:right][inside] = cls


def split_stems(stems: list[str], seed: int, val_fraction: float) -> dict[str, list[str]]:
    """Seeded train/val split; at least one validation scene when the fraction is positive."""
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"validation fraction must be in [0, 1), got {val_fraction}")
    n = len(stems)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    val = set(order[:n_val].tolist())
    return {
        "train": [s for i, s in enumerate(stems) if i not in val],
        "val": [s for i, s in enumerate(stems) if i in val],
    }


def scene_stem(index: int) -> str:
    return f"{index:06d}"


def prepare_output(out: str | Path, *, force: bool) -> tuple[Path, Path]:
    """Make `out`/images and `out`/masks for a new data set; (images dir, masks dir).

    Refuses a directory that already holds images or masks unless `force`, which first removes
    the old PNGs so that no stale scene survives.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} exists and is not a directory")
    images_dir, masks_dir = out / "images", out / "masks"
    existing = [d for d in (images_dir, masks_dir) if d.is_dir() and any(d.iterdir())]
    if existing and not force:
        raise DatasetError(
            f"{out} already holds a data set ({existing[0].name}/ is not empty): replace it with --force (force=True)"
        )
    for folder in existing:
        shutil.rmtree(folder)
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    return images_dir, masks_dir


def write_synth_dataset(
    out: str | Path,
    n: int,
    seed: int,
    size: int,
    num_classes: int = DEFAULT_CLASSES,
    val_fraction: float = 0.1,
    *,
    force: bool = False,
    on_scene: Callable[[], None] | None = None,
) -> dict:
    """Write `n` scenes in the folder format (images/, masks/, classes.json, splits.json).

    Refuses a directory that already holds images or masks unless `force`, which first removes
    the old PNGs so that no stale scene survives. Returns a summary (counts, class pixel shares).
    """
    check_params(size, num_classes)
    if n < 1:
        raise DatasetError(f"number of scenes must be at least 1, got {n}")
    if seed < 0:
        raise DatasetError(f"seed must be non-negative, got {seed}")
    out = Path(out)
    images_dir, masks_dir = prepare_output(out, force=force)

    classes = list(CLASS_NAMES[:num_classes])
    pixels = np.zeros(num_classes, dtype=np.int64)
    stems = []
    for index in range(n):
        image, mask = generate_scene(seed, index, size, num_classes)
        stem = scene_stem(index)
        Image.fromarray(image).save(images_dir / f"{stem}.png")
        Image.fromarray(mask).save(masks_dir / f"{stem}.png")
        pixels += np.bincount(mask.reshape(-1), minlength=num_classes)
        stems.append(stem)
        if on_scene is not None:
            on_scene()
    splits = split_stems(stems, seed, val_fraction)
    return finish_output(out, classes, splits, pixels, scenes=n, seed=seed, size=size)


def finish_output(out: Path, classes: list[str], splits: dict[str, list[str]], pixels: np.ndarray, *, scenes: int,
                  seed: int, size: int) -> dict:
    """Write classes.json and splits.json beside the scenes; the summary `seglock data` prints."""
    (out / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    (out / "splits.json").write_text(json.dumps(splits, indent=2) + "\n")
    return {
        "out": str(out),
        "scenes": scenes,
        "seed": seed,
        "size": size,
        "classes": classes,
        "train": len(splits["train"]),
        "val": len(splits["val"]),
        "class_pixel_share": [round(float(p) / float(pixels.sum()), 6) for p in pixels],
    }
