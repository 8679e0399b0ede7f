"""Serving speed, measured in one process tree; prints ratios against the targets.

(a) CP-protected (key folded in, as served) vs plain forward time      target <= 1.02
(b) HTTP throughput at concurrency 16 on a real uvicorn server vs the
    raw batched forward of the same model on the same device            target >= 0.7 CPU, >= 0.85 GPU
(c) p50 / p99 latency at concurrency 1 and 16

    python benchmarks/serve.py [--arch deeplabv3_mobilenet_v3_large] [--size 256] [--device cpu] [--json OUT]
"""

from __future__ import annotations

import os
import sys

import argparse
import asyncio
import base64
import copy
import io
import json
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from seglock.app.home import Home
from seglock.models.device import resolve_device
from seglock.keystore import Keystore
from seglock.models import apply_key, build_model, fold_key, get_tap, protect, save_artifact
from seglock.models.artifact import IMAGENET_NORMALIZATION
from seglock.models.data import generate_scene
from seglock.models.inputs import scaled_input

TAPS = {"tiny": "dec2", "vit_seg": "head", "lraspp_mobilenet_v3_large": "features16"}


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn()` over `repeats` runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def forward_ratio(plain, protected, tap, key, batch, repeats) -> dict:
    """Forward times of the plain model, the CP model as served (key folded in) and the CP model
    with a gather at the tap. Measured in interleaved rounds, so drift in the machine's load
    falls on all three alike; medians over rounds."""
    modules = {"plain": plain, "cp_folded": fold_key(protected, tap, key).eval(),
               "cp_gather": apply_key(protected, tap, key).eval()}
    samples: dict[str, list[float]] = {name: [] for name in modules}
    with torch.inference_mode():
        for module in modules.values():
            timed(lambda m=module: m(batch), 1, warmup=2)
        for _ in range(repeats):
            for name, module in modules.items():
                samples[name].append(timed(lambda m=module: m(batch), 3, warmup=0))
    results = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "plain_ms": results["plain"] * 1000,
        "cp_served_ms": results["cp_folded"] * 1000,
        "cp_gather_ms": results["cp_gather"] * 1000,
        "ratio_served_vs_plain": results["cp_folded"] / results["plain"],
        "ratio_gather_vs_plain": results["cp_gather"] / results["plain"],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def load(base: str, token: str, data: bytes, concurrency: int, total: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue: asyncio.Queue = asyncio.Queue()
    for _ in range(total):
        queue.put_nowait(None)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"},
                                 timeout=300, limits=limits) as http:
        async def worker():
            while not queue.empty():
                queue.get_nowait()
                started = time.perf_counter()
                response = await http.post("/v1/models/bench/segment", files={"image": ("x.png", data)})
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return total / elapsed, latencies


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency-16 run")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    plain = build_model(args.arch, 6).eval().to(device)
    tap = TAPS.get(args.arch, "layer4")
    protected = copy.deepcopy(plain)
    key = protect(protected, tap)
    get_tap(protected, tap)  # fails early on a bad tap

    batch = torch.randn(args.max_batch, 3, args.size, args.size, device=device)
    ratio_a = forward_ratio(plain, protected, tap, key, batch[:1], args.repeats)

    work = Path(tempfile.mkdtemp(prefix="seglock-bench-"))
    master = base64.b64encode(os.urandom(32)).decode()
    env = {**os.environ, "SEGLOCK_MASTER_KEY": master}
    save_artifact(protected.cpu(), work / "artifact", name="bench", class_names=[f"c{i}" for i in range(6)],
                  input_size=[args.size, args.size], protection={"mode": "cp", "tap": tap},
                  key={"id": "kbench", "version": 1})
    home = work / "home"
    keystore = Keystore.open(home, create=True, env=env)
    Home(home, keystore).import_artifact(work / "artifact", key=key)
    _, token = keystore.create_token("bench", ["segment"], ["bench"])

    # the raw batched forward of the served model, on the same device, with the same preprocessing
    served = fold_key(protected, tap, key).eval().to(device)
    image = generate_scene(0, 0, args.size)[0]  # a photo-like scene, not PNG-hostile noise
    with torch.inference_mode():
        inputs = scaled_input(torch.from_numpy(np.stack([image] * args.max_batch)), "cp",
                              IMAGENET_NORMALIZATION).to(device)
        raw_seconds = timed(lambda: served(inputs).argmax(1).cpu(), args.repeats)
    raw_throughput = args.max_batch / raw_seconds
    del served, plain, protected

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    data = buffer.getvalue()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "seglock.app.cli", "serve", "--home", str(home), "--port", str(port), "--no-demo",
         "--device", str(device), "--max-batch", str(args.max_batch), "--max-wait-ms", "10",
         "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        asyncio.run(load(base, token, data, 4, 8))  # warm-up
        _, lat1 = asyncio.run(load(base, token, data, 1, max(8, args.requests // 4)))
        throughput16, lat16 = asyncio.run(load(base, token, data, 16, args.requests))
    finally:
        server.terminate()
        server.wait(30)

    results = {
        "arch": args.arch, "size": args.size, "device": str(device), "tap": tap, "max_batch": args.max_batch,
        "a_forward": ratio_a,
        "b_throughput": {"http_images_per_s": throughput16, "raw_batched_images_per_s": raw_throughput,
                         "ratio": throughput16 / raw_throughput},
        "c_latency_ms": {"c1_p50": percentile(lat1, 50), "c1_p99": percentile(lat1, 99),
                         "c16_p50": percentile(lat16, 50), "c16_p99": percentile(lat16, 99)},
    }
    target_b = 0.85 if device.type == "cuda" else 0.7
    print(f"seglock serve benchmark: {args.arch} {args.size}px on {device}, tap {tap}, max batch {args.max_batch}")
    a = results["a_forward"]
    print(f"(a) forward, batch 1: plain {a['plain_ms']:.2f} ms, CP as served (folded) {a['cp_served_ms']:.2f} ms, "
          f"CP with a gather {a['cp_gather_ms']:.2f} ms")
    print(f"    ratio served/plain = {a['ratio_served_vs_plain']:.3f} (target <= 1.02: "
          f"{'ok' if a['ratio_served_vs_plain'] <= 1.02 else 'MISSED'})")
    b = results["b_throughput"]
    print(f"(b) HTTP at concurrency 16: {b['http_images_per_s']:.1f} img/s; raw batched forward "
          f"{b['raw_batched_images_per_s']:.1f} img/s; ratio = {b['ratio']:.3f} (target >= {target_b}: "
          f"{'ok' if b['ratio'] >= target_b else 'MISSED'})")
    c = results["c_latency_ms"]
    print(f"(c) latency ms: concurrency 1 p50 {c['c1_p50']:.1f} p99 {c['c1_p99']:.1f}; "
          f"concurrency 16 p50 {c['c16_p50']:.1f} p99 {c['c16_p99']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
