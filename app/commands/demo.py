"""`seglock demo`: encrypt a synthetic picture with every transform, check round trips, write PNGs."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from seglock.app.cli import CLIError
from seglock.client.modes import Mode
from seglock.client.transforms import BlockKey, PerImageKey, decrypt_blocks, encrypt_blocks, input_scale

PER_IMAGE_BLOCK = 16  # paper 003: the ViT patch size
PER_IMAGE_SUB_BLOCK = 4
_REPEATS = 15


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="encrypt a synthetic picture with SHF, NP, FFX and per-image keys; check round trips",
        description="Encrypt a synthetic test picture with fresh SHF, NP and FFX keys (paper 001) and "
        "per-image keys (paper 003), check that each decrypts to the original, and write PNGs.",
    )
    parser.add_argument("--out", type=Path, default=Path("seglock-demo"), help="output folder (default ./seglock-demo)")
    parser.add_argument("--size", type=int, default=256, help="picture side in pixels (default 256)")
    parser.add_argument("--block-size", type=int, default=4, help="SHF/NP/FFX block size M (default 4)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    size, block_size = args.size, args.block_size
    if block_size < 1:
        raise CLIError(f"--block-size must be positive, got {block_size}")
    multiple = math.lcm(block_size, PER_IMAGE_BLOCK)
    if size < 1 or size % multiple:
        raise CLIError(f"--size must be a positive multiple of {multiple} "
                       f"(block size {block_size} and per-image block {PER_IMAGE_BLOCK})")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    picture = synthetic_picture(size)
    _save(picture, out / "plain.png")

    results = []
    for method in Mode.block_modes():
        key = BlockKey.generate(method, block_size)
        encrypted = encrypt_blocks(picture, key)
        ok = bool(np.array_equal(decrypt_blocks(encrypted, key), picture))
        path = out / f"{method}.png"
        _save(_viewable(encrypted, method), path)
        results.append(_result(method, ok, path,
                               _median_ms(lambda key=key: encrypt_blocks(picture, key)),
                               _median_ms(lambda key=key, encrypted=encrypted: decrypt_blocks(encrypted, key))))

    key = PerImageKey.generate(size, size, PER_IMAGE_BLOCK, PER_IMAGE_SUB_BLOCK)
    encrypted = key.apply(picture)
    ok = bool(np.array_equal(key.invert(encrypted), picture))
    path = out / "per-image.png"
    _save(encrypted, path)
    # Timed as a client does it: fresh keys for every picture.
    results.append(_result(Mode.PER_IMAGE, ok, path, _median_ms(
        lambda: PerImageKey.generate(size, size, PER_IMAGE_BLOCK, PER_IMAGE_SUB_BLOCK).apply(picture)),
        _median_ms(lambda: key.invert(encrypted))))

    all_ok = all(r["round_trip_ok"] for r in results)
    if args.json:
        print(json.dumps({"out": str(out), "size": size, "block_size": block_size,
                          "per_image": {"block_size": PER_IMAGE_BLOCK, "sub_block": PER_IMAGE_SUB_BLOCK},
                          "results": results, "round_trip_ok": all_ok}, indent=2))
    else:
        print(f"{size}x{size} synthetic picture, block size {block_size}, "
              f"per-image {PER_IMAGE_BLOCK}/{PER_IMAGE_SUB_BLOCK}; PNGs in {out}")
        print(f"{'method':<10} {'encrypt ms':>10} {'decrypt ms':>10}  round trip  file")
        for r in results:
            print(f"{r['method']:<10} {r['encrypt_ms']:>10.3f} {r['decrypt_ms']:>10.3f}  "
                  f"{'ok' if r['round_trip_ok'] else 'FAILED':<10}  {r['file']}")
        print("round trip ok" if all_ok else "round trip FAILED")
    return 0 if all_ok else 1


def synthetic_picture(size: int) -> np.ndarray:
    """HWC uint8 test scene drawn with numpy: sky, ground, sun, house, road stripes."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((size, size, 3), dtype=np.float32)
    sky = y < 0.6
    image[sky] = np.stack([0.35 + 0.3 * y, 0.55 + 0.3 * y, np.full_like(y, 0.95)], axis=-1)[sky]
    image[~sky] = np.stack([0.25 + 0.1 * x, 0.55 - 0.2 * y, 0.2 + 0.0 * x], axis=-1)[~sky]
    sun = (x - 0.78) ** 2 + (y - 0.18) ** 2 < 0.01
    image[sun] = (1.0, 0.85, 0.2)
    house = (x > 0.15) & (x < 0.45) & (y > 0.4) & (y < 0.7)
    image[house] = (0.7, 0.25, 0.2)
    roof = (y > 0.25) & (y <= 0.4) & (np.abs(x - 0.3) < (y - 0.25))
    image[roof] = (0.35, 0.2, 0.15)
    road = (y > 0.8) & (y < 0.9)
    image[road] = (0.3, 0.3, 0.32)
    image[road & ((x * 10) % 1 < 0.5) & (np.abs(y - 0.85) < 0.005 + 1.0 / size)] = (0.95, 0.95, 0.9)
    return (image.clip(0, 1) * 255).round().astype(np.uint8)


def _viewable(encrypted: np.ndarray, method: str) -> np.ndarray:
    # FFX values run to 999: rescale to 8 bits for viewing only.
    if encrypted.dtype == np.uint8:
        return encrypted
    return (encrypted.astype(np.float32) * (255 / input_scale(method))).round().astype(np.uint8)


def _save(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path)


def _median_ms(run: Callable[[], Any]) -> float:
    times = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1e3, 4)


def _result(method: str, ok: bool, path: Path, encrypt_ms: float, decrypt_ms: float) -> dict[str, Any]:
    return {"method": str(method), "encrypt_ms": encrypt_ms, "decrypt_ms": decrypt_ms,
            "round_trip_ok": ok, "file": str(path)}
