"""Headless, bounded load against a real `seglock serve`: throughput, latency, and peak memory.

    python benchmarks/load.py mixed [--seconds 120] [--concurrency 16]     # throughput and latency
    python benchmarks/load.py worst [--concurrency 32] [--rounds 2]         # peak RSS under the worst requests
    python benchmarks/load.py keystore [--calls 10000]                      # keystore size after client-key calls

Each mode starts its own server (fresh home, demo models, the first start's real tokens, one
worker, 127.0.0.1) unless `--url` and `--token` name one, and stops it at the end. `worst`
sends, `--concurrency` at a time, the largest uploads the default limits admit and a few they
refuse on /v1 (8-bit RGB at the pixel budget, 16-bit greyscale at its budget, RGBA, a huge JPEG, a
6300x6300 16-bit PNG, JSON answers) and on /v2 (binary UINT8 and UINT16 tensors at the body limit,
a JSON tensor at its limit, a JSON answer over its limit), and reads the server's peak RSS (VmHWM)
from /proc.
Every mode prints one JSON document; `--json OUT` writes it too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ALLOWED_WORST = {200, 413, 422, 503}


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def gradient(height: int, width: int, channels: int, dtype=np.uint8) -> np.ndarray:
    """A smooth image: compresses to a small upload, decodes to a full-size buffer."""
    top = 65535 if dtype == np.uint16 else 255
    row = (np.arange(width, dtype=np.float64) * top / max(1, width - 1)).astype(dtype)
    image = np.broadcast_to(row, (height, width))
    if channels == 1:
        return np.ascontiguousarray(image)
    return np.ascontiguousarray(np.stack([image] * channels, axis=2))


def worst_uploads() -> list[tuple[str, bytes, str]]:
    """(label, body, accept) of the heaviest uploads; the defaults allow 16 M 8-bit RGB pixels."""
    jpeg = io.BytesIO()
    Image.fromarray(gradient(4000, 4000, 3)).save(jpeg, format="JPEG", quality=90)
    return [
        ("rgb-16M", png(gradient(4000, 4000, 3)), "image/png"),
        ("grey16-8M", png(gradient(2828, 2828, 1, np.uint16)), "image/png"),
        ("rgba-8M", png(gradient(2828, 2828, 4)), "image/png"),
        ("jpeg-16M", jpeg.getvalue(), "image/png"),
        ("rgb-16M-json", png(gradient(4000, 4000, 3)), "application/json"),
        ("grey16-40M", png(gradient(6300, 6300, 1, np.uint16)), "application/json"),
    ]


def v2_binary(images: np.ndarray, datatype: str, *, binary_output: bool = True) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "image", "shape": list(images.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": images.nbytes}}],
                         "outputs": [{"name": "mask", "parameters": {"binary_data": binary_output}}]}).encode()
    return header + images.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def worst_v2_requests() -> list[tuple[str, bytes, dict]]:
    """(label, body, headers) of the heaviest /v2 infer requests the default limits admit (20 MiB
    bodies, 4 MiB of JSON) and one they refuse (a JSON answer over 1 M pixels)."""
    u8 = gradient(2580, 2580, 3)[None]  # 19.97 MB of binary tensor
    # 20.76 MB; 3.46 M pixels that count double; parsed in full, then refused (422) by a plain model
    u16 = gradient(1860, 1860, 3, np.uint16)[None]
    values = (np.arange(580 * 580 * 3) % 156 + 100).tolist()  # three digits and a comma each: 4.04 MB
    json_tensor = json.dumps({"inputs": [{"name": "image", "shape": [1, 580, 580, 3], "datatype": "UINT8",
                                          "data": values}]}, separators=(",", ":")).encode()
    over = gradient(1024, 1100, 3)[None]
    return [
        ("v2-u8-20MB", *v2_binary(u8, "UINT8")),
        ("v2-u16-20MB", *v2_binary(u16, "UINT16")),
        ("v2-json-4MB", json_tensor, {"Content-Type": "application/json"}),
        ("v2-json-answer-1.1M", *v2_binary(over, "UINT8", binary_output=False)),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(args):
    """(base URL, admin token, client token, server pid or None, home or None)."""
    if args.url:
        yield args.url.rstrip("/"), args.token, args.token, None, None
        return
    with tempfile.TemporaryDirectory(prefix="seglock-load-") as work:
        home = Path(work) / "home"
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "SEGLOCK_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}
        log = open(Path(work) / "server.log", "wb")
        process = subprocess.Popen([sys.executable, "-m", "seglock.app.cli", "serve", "--home", str(home),
                                    "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start:\n" + (Path(work) / "server.log").read_text()[-3000:])
                time.sleep(0.5)
            tokens = json.loads((home / "initial-tokens.json").read_text())
            yield base, tokens["admin"], tokens["client"], process.pid, home
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()


def peak_rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def percentiles(samples: list[float]) -> dict:
    if not samples:
        return {}
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": round(pick(0.5) * 1000, 1), "p95_ms": round(pick(0.95) * 1000, 1),
            "p99_ms": round(pick(0.99) * 1000, 1), "max_ms": round(ordered[-1] * 1000, 1)}


async def mixed(base: str, client_token: str, seconds: float, concurrency: int) -> dict:
    """Segment (PNG and JSON), /v2 infer, client-key, model list and healthz, from `concurrency` clients."""
    rng = np.random.default_rng(0)
    image = png(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    headers = {"Authorization": f"Bearer {client_token}"}
    tensor, tensor_headers = v2_binary(rng.integers(0, 256, (1, 240, 320, 3), dtype=np.uint8), "UINT8")
    plan = [("segment", "demo-plain", "image/png"), ("segment", "demo-cp", "image/png"),
            ("segment", "demo-shf", "application/json"), ("client-key", "demo-shf", None),
            ("v2-infer", "demo-cp", None), ("models", None, None), ("healthz", None, None)]
    statuses: Counter = Counter()
    latencies: dict[str, list[float]] = {}
    deadline = time.monotonic() + seconds

    async def worker(index: int, client: httpx.AsyncClient) -> None:
        step = index
        while time.monotonic() < deadline:
            kind, model, accept = plan[step % len(plan)]
            step += 1
            started = time.perf_counter()
            if kind == "segment":
                answer = await client.post(f"{base}/v1/models/{model}/segment", files={"image": ("x.png", image)},
                                           headers={**headers, "Accept": accept})
            elif kind == "v2-infer":
                answer = await client.post(f"{base}/v2/models/{model}/infer", content=tensor,
                                           headers={**headers, **tensor_headers})
            elif kind == "client-key":
                answer = await client.get(f"{base}/v1/models/{model}/client-key", headers=headers)
            elif kind == "models":
                answer = await client.get(f"{base}/v1/models", headers=headers)
            else:
                answer = await client.get(f"{base}/healthz")
            latencies.setdefault(kind, []).append(time.perf_counter() - started)
            statuses[answer.status_code] += 1

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(i, client) for i in range(concurrency)))
    elapsed = time.monotonic() - started
    total = sum(statuses.values())
    return {"seconds": round(elapsed, 1), "concurrency": concurrency, "requests": total,
            "requests_per_s": round(total / elapsed, 1), "statuses": dict(statuses),
            "latency": {kind: {"n": len(s), **percentiles(s)} for kind, s in latencies.items()}}


async def worst(base: str, client_token: str, concurrency: int, rounds: int, pid: int | None) -> dict:
    uploads = worst_uploads()
    v2 = worst_v2_requests()
    headers = {"Authorization": f"Bearer {client_token}"}
    labels = [label for label, _, _ in uploads + v2]
    statuses: dict[str, Counter] = {label: Counter() for label in labels}

    async def one(client: httpx.AsyncClient, index: int) -> None:
        pick = index % len(labels)
        if pick < len(uploads):
            label, body, accept = uploads[pick]
            answer = await client.post(f"{base}/v1/models/demo-plain/segment", files={"image": ("x", body)},
                                       headers={**headers, "Accept": accept})
        else:
            label, body, extra = v2[pick - len(uploads)]
            answer = await client.post(f"{base}/v2/models/demo-plain/infer", content=body,
                                       headers={**headers, **extra})
        statuses[label][answer.status_code] += 1

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        for _ in range(rounds):
            await asyncio.gather(*(one(client, i) for i in range(concurrency)))
    seen = {code for counts in statuses.values() for code in counts}
    return {"concurrency": concurrency, "rounds": rounds, "seconds": round(time.monotonic() - started, 1),
            "upload_bytes": {label: len(body) for label, body, _ in uploads + v2},
            "statuses": {label: dict(c) for label, c in statuses.items()},
            "only_allowed_statuses": seen <= ALLOWED_WORST, "peak_rss_mb": peak_rss_mb(pid)}


def keystore_growth(base: str, client_token: str, home: Path | None, calls: int) -> dict:
    path = None if home is None else home / "keystore.json"
    before = path.stat().st_size if path else None
    audit_before = _audit_bytes(home)
    statuses: Counter = Counter()
    with httpx.Client(timeout=30) as client:
        for _ in range(calls):
            statuses[client.get(f"{base}/v1/models/demo-shf/client-key",
                                headers={"Authorization": f"Bearer {client_token}"}).status_code] += 1
    return {"calls": calls, "statuses": dict(statuses), "keystore_bytes_before": before,
            "keystore_bytes_after": path.stat().st_size if path else None,
            "keystore_growth_bytes": (path.stat().st_size - before) if path else None,
            "audit_log_growth_bytes": None if home is None else _audit_bytes(home) - audit_before}


def _audit_bytes(home: Path | None) -> int:
    if home is None:
        return 0
    return sum(p.stat().st_size for p in home.iterdir() if p.name.startswith("keystore.audit-"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("mode", choices=["mixed", "worst", "keystore"])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--token", help="a segment token granted the demo models (with --url)")
    parser.add_argument("--seconds", type=float, default=120.0, help="mixed: how long (default 120)")
    parser.add_argument("--concurrency", type=int, default=None, help="clients at once (mixed 16, worst 32)")
    parser.add_argument("--rounds", type=int, default=2, help="worst: rounds of --concurrency uploads")
    parser.add_argument("--calls", type=int, default=10_000, help="keystore: client-key calls")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.url and not args.token:
        parser.error("--url needs --token")
    with served(args) as (base, _admin, client_token, pid, home):
        if args.mode == "mixed":
            result = asyncio.run(mixed(base, client_token, args.seconds, args.concurrency or 16))
            result["peak_rss_mb"] = peak_rss_mb(pid)
        elif args.mode == "worst":
            result = asyncio.run(worst(base, client_token, args.concurrency or 32, args.rounds, pid))
        else:
            result = keystore_growth(base, client_token, home, args.calls)
    result["mode"] = args.mode
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
