"""Time seglock's numpy transforms against the reference torch method, on one CPU core.

    python benchmarks/transforms.py [--size 256] [--block-size 4] [--sub-block 4] [--json] [--check]

The reference is the published block-wise code's tensor method (paper 001): segment the image
into blocks with reshape/permute, index the last dimension with the key, integrate back, on an
NCHW float batch in [0, 1]. Paper 003 publishes no code, so its reference is the straightforward
torch version (argsort of torch.rand keys, gather). Times are medians of many runs.
"""

from __future__ import annotations

import os
import sys

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, set before numpy and torch load their thread pools

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pyffx  # noqa: E402
import torch  # noqa: E402

from seglock.client.transforms import BlockKey, decrypt_blocks, encrypt_blocks, encrypt_per_image  # noqa: E402

BUDGET_MS = {"shf": 1.0, "np": 1.0, "ffx": 1.0, "per-image": 5.0}


class ReferenceBlockTransform:
    """The reference code's tensor method for SHF/NP/FFX, re-implemented for timing."""

    def __init__(self, method: str, height: int, width: int, block_size: int, seed: int, password: str) -> None:
        self.method, self.m = method, block_size
        self.by, self.bx = height // block_size, width // block_size
        torch.manual_seed(seed)
        key = torch.randperm(block_size * block_size * 3)
        self.key = key if method == "shf" else key > len(key) / 2
        self.inverse = torch.argsort(key)
        if method == "ffx":
            fpe = pyffx.Integer(password.encode(), length=3)
            self.lookup = torch.tensor([fpe.encrypt(v) for v in range(256)])
            self.relookup = torch.tensor([fpe.decrypt(v) for v in range(1000)])

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1).reshape(-1, self.by, self.m, self.bx, self.m, 3)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, self.by, self.bx, self.m * self.m * 3)

    def integrate(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.by, self.bx, self.m, self.m, 3).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, self.by * self.m, self.bx * self.m, 3).permute(0, 3, 1, 2).contiguous()

    def encrypt(self, x: torch.Tensor) -> torch.Tensor:
        x = self.segment(x)
        if self.method == "shf":
            x = x[:, :, :, self.key]
        elif self.method == "np":
            x[:, :, :, self.key] = 1 - x[:, :, :, self.key]
        else:
            x = (torch.clamp(x, 0, 1) * 255).long()
            x[:, :, :, self.key] = self.lookup[x[:, :, :, self.key]]
            x = x.float() / self.lookup.max()
        return self.integrate(x)

    def decrypt(self, x: torch.Tensor) -> torch.Tensor:
        x = self.segment(x)
        if self.method == "shf":
            x = x[:, :, :, self.inverse]
        elif self.method == "np":
            x[:, :, :, self.key] = 1 - x[:, :, :, self.key]
        else:
            x = (x * self.lookup.max()).round().long()  # the reference truncates; round avoids off-by-one
            x[:, :, :, self.key] = self.relookup[x[:, :, :, self.key]]
            x = x.float() / 255
        return self.integrate(x)


def reference_per_image(x: torch.Tensor, block_size: int, sub_block: int) -> torch.Tensor:
    """Paper 003 in plain torch: per-(sub-block, channel) pixel shuffles, per-block channel shuffle."""
    n, c, h, w = x.shape
    s, r = sub_block, block_size // sub_block
    sub = x.reshape(n, c, h // s, s, w // s, s).permute(0, 2, 4, 1, 3, 5).reshape(n, h // s, w // s, c, s * s)
    pixel_keys = torch.argsort(torch.rand(sub.shape), dim=-1)
    sub = torch.gather(sub, -1, pixel_keys)
    channel_keys = torch.argsort(torch.rand(n, h // block_size, w // block_size, c), dim=-1)
    channel_keys = channel_keys.repeat_interleave(r, dim=1).repeat_interleave(r, dim=2)
    sub = torch.gather(sub, 3, channel_keys[..., None].expand_as(sub))
    out = sub.reshape(n, h // s, w // s, c, s, s).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(n, c, h, w).contiguous()


def median_ms(run: Callable[[], object], repeats: int) -> float:
    for _ in range(max(3, repeats // 20)):
        run()  # warm caches and lazily built layouts
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def synthetic_image(size: int) -> np.ndarray:
    """A smooth picture with edges (no downloads): gradients plus a disc."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    disc = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.09).astype(np.float32)
    image = np.stack([xx, yy, 0.5 * disc + 0.25 * (1 - xx)], axis=-1)
    return (image * 255).round().astype(np.uint8)


def run(size: int, block_size: int, sub_block: int, repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    image = synthetic_image(size)
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255)
    rows = []
    for method in ("shf", "np", "ffx"):
        key = BlockKey.from_reference(method, block_size, seed=7, password="password" if method == "ffx" else None)
        reference = ReferenceBlockTransform(method, size, size, block_size, seed=7, password="password")
        encrypted = encrypt_blocks(image, key)
        reference_encrypted = reference.encrypt(batch.clone())
        for op, ours, ref in (
            ("encrypt", lambda: encrypt_blocks(image, key), lambda: reference.encrypt(batch.clone())),
            ("decrypt", lambda: decrypt_blocks(encrypted, key), lambda: reference.decrypt(reference_encrypted.clone())),
        ):
            rows.append(_row(method, op, median_ms(ours, repeats), median_ms(ref, repeats)))
    rows.append(_row("per-image", "encrypt", median_ms(lambda: encrypt_per_image(image, 16, sub_block), repeats),
                     median_ms(lambda: reference_per_image(batch, 16, sub_block), repeats)))
    return rows


def _row(method: str, op: str, ours_ms: float, reference_ms: float) -> dict:
    return {
        "method": method,
        "op": op,
        "ours_ms": round(ours_ms, 4),
        "reference_ms": round(reference_ms, 4),
        "ratio": round(ours_ms / reference_ms, 3),
        "budget_ms": BUDGET_MS[method],
        "ok": ours_ms <= BUDGET_MS[method] and ours_ms <= reference_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--block-size", type=int, default=4, help="SHF/NP/FFX block size M (default 4)")
    parser.add_argument("--sub-block", type=int, default=4, help="per-image sub-block size (default 4; blocks are 16)")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per case (default 200)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a case is over budget or slower than the reference")
    args = parser.parse_args(argv)
    rows = run(args.size, args.block_size, args.sub_block, args.repeats)
    if args.json:
        print(json.dumps({"size": args.size, "block_size": args.block_size, "sub_block": args.sub_block,
                          "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    else:
        print(f"{args.size}x{args.size}x3 uint8, block size {args.block_size}, per-image 16/{args.sub_block}, "
              f"1 thread, median of {args.repeats}")
        print(f"{'method':<10} {'op':<8} {'ours ms':>9} {'ref ms':>9} {'ours/ref':>9} {'budget':>7}  ok")
        for r in rows:
            print(f"{r['method']:<10} {r['op']:<8} {r['ours_ms']:>9.3f} {r['reference_ms']:>9.3f} "
                  f"{r['ratio']:>9.3f} {r['budget_ms']:>7.1f}  {'yes' if r['ok'] else 'NO'}")
    return 1 if args.check and not all(r["ok"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
