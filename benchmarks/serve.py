"""Serving speed, measured in one process tree; prints ratios against the targets.

(a) CP-protected (key folded in, as served) vs plain forward time      target <= 1.02
(b) HTTP throughput at concurrency 16 on a real uvicorn server (default --backend auto, /v1 and
    /v2) vs the raw batched forward of the same model on the same device:
      vs the eager fp32 forward                                          target >= 1.5 CPU
      vs the fastest exact raw forward found (channels_last, compile)    target >= 0.9
    and the server's masks identical to the eager forward's
(c) p50 / p99 latency at concurrency 1 and 16

    python benchmarks/serve.py [--arch lraspp_mobilenet_v3_large] [--size 256] [--device cpu]
                               [--compile-budget 900] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from seglock.app.backends import use_compile_cache
from seglock.app.home import Home
from seglock.keystore import Keystore
from seglock.models import apply_key, build_model, fold_key, get_tap, protect, save_artifact
from seglock.models.artifact import IMAGENET_NORMALIZATION
from seglock.models.data import generate_scene
from seglock.models.device import resolve_device
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


def raw_forwards(served, inputs, repeats: int, compile_budget: float) -> dict:
    """Batched forward time of each exact way to run `served`: eager fp32 (contiguous), channels_last,
    and torch.compile (when the budget allows), masks compared with eager's."""
    cl_module = copy.deepcopy(served).to(memory_format=torch.channels_last)
    cl_inputs = inputs.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = served(inputs).argmax(1).cpu()
        timers = {"eager": lambda: served(inputs).argmax(1).cpu(),
                  "channels_last": lambda: cl_module(cl_inputs).argmax(1).cpu()}
        out = {"eager": {"name": "eager", "seconds": timed(timers["eager"], repeats), "exact": True},
               "channels_last": {"name": "channels_last", "exact": torch.equal(cl_module(cl_inputs).argmax(1).cpu(),
                                                                              reference),
                                 "seconds": timed(timers["channels_last"], repeats)}}
        if compile_budget > 0:
            started = time.perf_counter()
            compiled = torch.compile(cl_module)
            dynamic = cl_inputs.clone()
            torch._dynamo.mark_dynamic(dynamic, 0)  # as the server compiles it
            exact = torch.equal(compiled(dynamic).argmax(1).cpu(), reference)
            timers["compile"] = lambda: compiled(cl_inputs).argmax(1).cpu()
            out["compile"] = {"name": "compile", "exact": exact, "compile_s": time.perf_counter() - started,
                              "seconds": timed(timers["compile"], repeats)}
    out["_eager_mask"] = reference.numpy().astype(np.uint8)
    out["_timers"] = timers
    return out


def retime(raw: dict, timers: dict, repeats: int) -> None:
    """Time the raw forwards again after the HTTP load and keep the mean of before and after, so
    drift in a shared machine's load falls on both sides of the ratio alike."""
    with torch.inference_mode():
        for name, fn in timers.items():
            after = timed(fn, repeats, warmup=1)
            raw[name]["seconds_before"], raw[name]["seconds_after"] = raw[name]["seconds"], after
            raw[name]["seconds"] = (raw[name]["seconds"] + after) / 2


def wait_for_backend(base: str, token: str, limit_s: float) -> str:
    """The server's backend for the benchmark model once its background compile (if any) settled."""
    deadline = time.monotonic() + limit_s
    while True:
        params = httpx.get(f"{base}/v2/models/bench", headers={"Authorization": f"Bearer {token}"},
                           timeout=10).json()["parameters"]
        if params["compile"] != "compiling" or time.monotonic() > deadline:
            settled = params["compile"] in (None, "ready")
            return params["backend"] + ("" if settled else f" (compile {params['compile']})")
        time.sleep(2)


async def masks_over_http(base: str, token: str, data: bytes, image: np.ndarray) -> list[np.ndarray]:
    """The mask of the benchmark image from /v1 (PNG) and /v2 (binary tensor)."""
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=300) as http:
        v1 = await http.post("/v1/models/bench/segment", files={"image": ("x.png", data)})
        v1.raise_for_status()
        body, headers = v2_body(image)
        v2 = await http.post("/v2/models/bench/infer", content=body, headers=headers)
        v2.raise_for_status()
    length = int(v2.headers["inference-header-content-length"])
    return [np.asarray(Image.open(io.BytesIO(v1.content))),
            np.frombuffer(v2.content[length:], np.uint8).reshape(image.shape[:2])]


def v2_body(image: np.ndarray) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, *image.shape],
                                     "parameters": {"binary_data_size": image.nbytes}}],
                         "outputs": [{"name": "mask", "parameters": {"binary_data": True}}]}).encode()
    return header + image.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def load(base: str, token: str, data, concurrency: int, total: int, *,
               v2: bool = False) -> tuple[float, list[float]]:
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
                if v2:
                    body, headers = v2_body(data)
                    response = await http.post("/v2/models/bench/infer", content=body, headers=headers)
                else:
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
    parser.add_argument("--compile-budget", type=float, default=900,
                        help="seconds torch.compile may take, here and in the server; 0 = no compile")
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

    # the raw batched forwards of the served model, on the same device, with the same preprocessing
    use_compile_cache(home / "cache" / "compile")  # the server below reuses these kernels
    served = fold_key(protected, tap, key).eval().to(device)
    image = generate_scene(0, 0, args.size)[0]  # a photo-like scene, not PNG-hostile noise
    with torch.inference_mode():
        inputs = scaled_input(torch.from_numpy(np.stack([image] * args.max_batch)), "cp",
                              IMAGENET_NORMALIZATION).to(device)
    raw = raw_forwards(served, inputs, args.repeats, args.compile_budget)
    eager_mask = raw.pop("_eager_mask")[0]
    timers = raw.pop("_timers")
    del plain, protected

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    data = buffer.getvalue()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "seglock.app.cli", "serve", "--home", str(home), "--port", str(port), "--no-demo",
         "--device", str(device), "--max-batch", str(args.max_batch), "--max-wait-ms", "10",
         "--compile-budget", str(args.compile_budget),
         "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        backend = wait_for_backend(base, token, args.compile_budget + 60)
        asyncio.run(load(base, token, data, 4, 8))  # warm-up
        server_masks = asyncio.run(masks_over_http(base, token, data, image))
        _, lat1 = asyncio.run(load(base, token, data, 1, max(8, args.requests // 4)))
        throughput16, lat16 = asyncio.run(load(base, token, data, 16, args.requests))
        throughput16_v2, _ = asyncio.run(load(base, token, image, 16, args.requests, v2=True))
    finally:
        server.terminate()
        server.wait(30)
    retime(raw, timers, args.repeats)
    raw_throughput = args.max_batch / raw["eager"]["seconds"]
    fastest = min((r for r in raw.values() if r["exact"]), key=lambda r: r["seconds"])
    fastest_throughput = args.max_batch / fastest["seconds"]

    results = {
        "arch": args.arch, "size": args.size, "device": str(device), "tap": tap, "max_batch": args.max_batch,
        "a_forward": ratio_a,
        "raw_forwards": raw,
        "server_backend": backend,
        "b_throughput": {"http_images_per_s": throughput16, "http_v2_images_per_s": throughput16_v2,
                         "raw_eager_images_per_s": raw_throughput, "raw_fastest_images_per_s": fastest_throughput,
                         "fastest": fastest["name"], "ratio": throughput16 / raw_throughput,
                         "ratio_vs_fastest": throughput16 / fastest_throughput,
                         "masks_identical_to_eager": all(np.array_equal(m, eager_mask) for m in server_masks)},
        "c_latency_ms": {"c1_p50": percentile(lat1, 50), "c1_p99": percentile(lat1, 99),
                         "c16_p50": percentile(lat16, 50), "c16_p99": percentile(lat16, 99)},
    }
    print(f"seglock serve benchmark: {args.arch} {args.size}px on {device}, tap {tap}, max batch {args.max_batch}")
    a = results["a_forward"]
    print(f"(a) forward, batch 1: plain {a['plain_ms']:.2f} ms, CP as served (folded) {a['cp_served_ms']:.2f} ms, "
          f"CP with a gather {a['cp_gather_ms']:.2f} ms")
    print(f"    ratio served/plain = {a['ratio_served_vs_plain']:.3f} (target <= 1.02: "
          f"{'ok' if a['ratio_served_vs_plain'] <= 1.02 else 'MISSED'})")
    for r in raw.values():
        print(f"    raw forward, batch {args.max_batch}: {r['name']:<13} {r['seconds'] * 1e3:7.1f} ms "
              f"(before/after the HTTP load {r['seconds_before'] * 1e3:.0f}/{r['seconds_after'] * 1e3:.0f} ms) "
              f"({args.max_batch / r['seconds']:.1f} img/s){'' if r['exact'] else '  masks differ from eager'}"
              + (f", compiled in {r['compile_s']:.0f} s" if "compile_s" in r else ""))
    b = results["b_throughput"]
    target_eager = 1.5 if device.type == "cpu" else 1.0
    print(f"(b) HTTP at concurrency 16 (server backend: {backend}): /v1 {b['http_images_per_s']:.1f} img/s, "
          f"/v2 {b['http_v2_images_per_s']:.1f} img/s")
    print(f"    vs raw eager forward {b['raw_eager_images_per_s']:.1f} img/s: ratio = {b['ratio']:.3f} "
          f"(target >= {target_eager}: {'ok' if b['ratio'] >= target_eager else 'MISSED'})")
    print(f"    vs fastest raw forward ({b['fastest']}) {b['raw_fastest_images_per_s']:.1f} img/s: ratio = "
          f"{b['ratio_vs_fastest']:.3f} (target >= 0.9: {'ok' if b['ratio_vs_fastest'] >= 0.9 else 'MISSED'})")
    print(f"    server masks identical to the eager forward: {b['masks_identical_to_eager']}")
    c = results["c_latency_ms"]
    print(f"(c) latency ms: concurrency 1 p50 {c['c1_p50']:.1f} p99 {c['c1_p99']:.1f}; "
          f"concurrency 16 p50 {c['c16_p50']:.1f} p99 {c['c16_p99']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
