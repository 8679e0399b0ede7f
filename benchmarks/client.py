"""Client-side overhead of one `segment` call per protection mode, on one CPU core.

    python benchmarks/client.py [--size 256] [--input-size 256] [--block-size 4] [--json]

Times the SDK's own request path without the network: decode the image file, resize it to the
model input, encrypt (shf/np/ffx with a cached key; per-image with fresh keys), encode the upload
(.npy by default, or PNG with --encrypted-format png), then read the answer (decode the mask PNG,
resize it back). The target is 5 ms per 256x256 image (issue 5). Times are medians of many runs.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, set before numpy loads its thread pool

import argparse
import io
import json
import sys
import time
from collections.abc import Callable

import httpx
import numpy as np
from PIL import Image

from seglock.client import imaging
from seglock.client.sdk import ModelInfo, _encrypted_upload, _mask_from, _model_array, _plain_upload
from seglock.client.transforms import BlockKey, encrypt_blocks, encrypt_per_image

TARGET_MS = 5.0
MODES = ("none", "cp", "shf", "np", "ffx", "per-image")


def picture(size: int, seed: int = 0) -> np.ndarray:
    """A photo-like test picture: smooth shading, a few flat shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([180 * x + 40, 160 * y + 50, 120 * (1 - x * y) + 60], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 4, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def timings_ms(fn: Callable[[], object], repeats: int) -> np.ndarray:
    fn()  # warm caches (index layouts are built once per key and size)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * np.asarray(times)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return float(np.median(timings_ms(fn, repeats)))


def total(fn: Callable[[], object], repeats: int) -> dict:
    """Median and best of the whole path: on a shared machine the best run is the uncontended cost."""
    times = timings_ms(fn, repeats)
    return {"total_ms": float(np.median(times)), "best_ms": float(times.min())}


def model_info(mode: str, input_size: int, block_size: int, per_image: tuple[int, int]) -> ModelInfo:
    protection: dict = {"mode": mode}
    if mode in ("shf", "np", "ffx"):
        protection["block_size"] = block_size
    elif mode == "per-image":
        protection.update(block_size=per_image[0], sub_block=per_image[1])
    return ModelInfo(name=f"bench-{mode}", mode=mode, input_size=(input_size, input_size), num_classes=21,
                     class_names=(), key_version=1, protection=protection)


def measure(mode: str, args: argparse.Namespace) -> dict:
    image = picture(args.size)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # the user's file, as a camera app would write it
    data = buffer.getvalue()
    info = model_info(mode, args.input_size, args.block_size, (args.per_image_block, args.sub_block))
    key = (1, BlockKey.generate(mode, args.block_size)) if mode in ("shf", "np", "ffx") else None
    mask = (np.arange(args.input_size * args.input_size) // 97 % 21).astype(np.uint8).reshape(
        args.input_size, args.input_size)
    answer = httpx.Response(200, content=imaging.encode_png(mask))
    r = args.repeats

    if mode in ("none", "cp"):
        # plain files travel unchanged; the server answers at the image's size, so nothing to resize
        plain_answer = httpx.Response(200, content=imaging.encode_png(imaging.resize_mask(mask, image.shape[:2])))
        upload = _plain_upload(data, True)
        return {"mode": mode, "upload": "file as is", "upload_kb": round(len(upload.content) / 1024, 1),
                "decode_ms": None, "resize_ms": None, "encrypt_ms": None, "encode_ms": None,
                "answer_ms": median_ms(lambda: _mask_from(plain_answer, upload), r),
                **total(lambda: _mask_from(plain_answer, _plain_upload(data, True)), r)}

    rgb = imaging.load_rgb(data)
    model_array = imaging.resize_rgb(rgb, info.input_size)
    if mode == "per-image":
        encrypt = lambda: encrypt_per_image(model_array, args.per_image_block, args.sub_block)  # noqa: E731
    else:
        encrypt = lambda: encrypt_blocks(model_array, key[1])  # noqa: E731
    encrypted = encrypt()
    fmt = args.encrypted_format
    encode = imaging.encode_png if fmt == "png" and encrypted.dtype == np.uint8 else imaging.encode_npy
    upload = _encrypted_upload(model_array, rgb.shape[:2], info, key, fmt)

    def whole() -> None:
        array, size = _model_array(data, info)
        _mask_from(answer, _encrypted_upload(array, size, info, key, fmt))

    return {
        "mode": mode,
        "upload": "npy" if upload.filename.endswith(".npy") else "png",
        "upload_kb": round(len(upload.content) / 1024, 1),
        "decode_ms": median_ms(lambda: imaging.load_rgb(data), r),
        "resize_ms": median_ms(lambda: imaging.resize_rgb(rgb, info.input_size), r),  # 0 when sizes agree
        "encrypt_ms": median_ms(encrypt, r),
        "encode_ms": median_ms(lambda: encode(encrypted), r),
        "answer_ms": median_ms(lambda: _mask_from(answer, upload), r),
        **total(whole, r),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Client-side overhead of seglock's SDK per image, one core.")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--input-size", type=int, default=256, help="model input side (default 256)")
    parser.add_argument("--block-size", type=int, default=4, help="shf/np/ffx block size (default 4)")
    parser.add_argument("--per-image-block", type=int, default=16, help="per-image block size (default 16)")
    parser.add_argument("--sub-block", type=int, default=4, help="per-image sub-block size (default 4)")
    parser.add_argument("--encrypted-format", choices=["npy", "png"], default="npy",
                        help="how uint8 encrypted inputs travel (default npy, the SDK's default)")
    parser.add_argument("--repeats", type=int, default=60, help="timed runs per number (default 60)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    results = [measure(mode, args) for mode in MODES]
    for row in results:
        row["ratio_to_target"] = round(row["total_ms"] / TARGET_MS, 2)
    if args.json:
        print(json.dumps({"size": args.size, "input_size": args.input_size, "target_ms": TARGET_MS,
                          "results": results}, indent=2))
        return 0
    print(f"client overhead per {args.size}x{args.size} image, model input {args.input_size}x{args.input_size}, "
          f"one core; target {TARGET_MS:g} ms")
    columns = ("decode_ms", "resize_ms", "encrypt_ms", "encode_ms", "answer_ms", "total_ms", "best_ms")
    print(f"{'mode':<10} {'upload':<11} {'KiB':>6} " + " ".join(f"{c[:-3]:>8}" for c in columns) + "  x target")
    for row in results:
        cells = " ".join("       -" if row[c] is None else f"{row[c]:8.2f}" for c in columns)
        print(f"{row['mode']:<10} {row['upload']:<11} {row['upload_kb']:>6} {cells}  {row['ratio_to_target']:.2f}")
    print("(ms, medians; answer = decode the mask PNG and resize it back; total = the SDK's whole path, "
          "best = its fastest run; x target = total / 5 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
