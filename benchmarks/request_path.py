"""The request path's CPU per request, in-process: what a worker spends on a request besides the forward.

serve.py measures a live server, where the forward takes nine tenths of the CPU and this machine's
noise (±10 %) hides a change of a tenth of a millisecond. Here the app of `seglock serve` (the same
middleware, routes, token checks, decoding and encoding, thread hops) is called directly as ASGI on
a uvloop event loop, with no sockets, and the model's batcher answers each request at once with the
mask its real forward gave the first request: what is left is the request path alone. Printed per
route: the process's CPU time per request and the event loop thread's share of it, the fastest of
`--rounds` rounds (noise only ever adds time) and the median.

    python benchmarks/request_path.py [--arch lraspp_mobilenet_v3_large] [--size 256] [--requests 320]
                                      [--rounds 5] [--routes live,meta,v1,v2] [--json OUT]

Routes: live = GET /v2/health/live (no token), meta = GET /v2/models/bench (a token check),
v1 = POST /v1/models/bench/segment (multipart PNG in, PNG mask out), v2 = POST
/v2/models/bench/infer (binary UINT8 tensor in, binary mask out). The uploads go in 64 KiB chunks
at concurrency 16, the GETs one at a time. The model is CP-protected, as in serve.py.

`--routes floor` measures the least a /v1 request can cost here besides the forward, whatever the
framework: a bare ASGI app under uvicorn (on a core of its own) that reads the same multipart upload
and answers a mask-sized PNG, driven over sockets by serve.py's load generator (on the other core),
with the server's and the client's CPU per request; and the work no server of this API can skip,
each timed alone: decoding the upload (`decode_upload`), the model input, the mask PNG. Against the
fastest raw forward's CPU per image that serve.py prints, a ratio of 0.9 leaves a ninth of it for all
of this.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 65536


def build_home(work: Path, arch: str, size: int) -> tuple[str, bytes, object]:
    """A home serving a CP-protected `arch` as `bench`, as serve.py builds it: (token, PNG, HWC image)."""
    import torch
    from serve import TAPS, bench_home, bench_image  # benchmarks/, beside this script

    from seglock.models import build_model, protect

    torch.manual_seed(0)
    model = build_model(arch, 6).eval()
    key = protect(model, TAPS[arch])
    token = bench_home(work, model, key, TAPS[arch], size, dict(os.environ))
    image, png = bench_image(size)
    return token, png, image


def answered_at_once(batcher) -> None:
    """The batcher answers every job with the first job's real result, without a forward."""
    real = batcher.submit_scored
    held: dict[bool, tuple] = {}

    async def submit_scored(tensor, *, score: bool, arrival=None):
        if score not in held:
            held[score] = await real(tensor, score=score, arrival=arrival)
        elif arrival is not None:
            arrival.close()
        return held[score]

    batcher.submit_scored = submit_scored


class Caller:
    """Calls the ASGI app as uvicorn would, with the request's body in 64 KiB chunks."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> int:
        chunks = [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)] or [b""]
        sent = 0
        status = []

        async def receive():
            nonlocal sent
            if sent < len(chunks):
                sent += 1
                return {"type": "http.request", "body": chunks[sent - 1], "more_body": sent < len(chunks)}
            await asyncio.Event().wait()  # the client stays connected

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        raw = [(b"host", b"127.0.0.1"), (b"authorization", b"Bearer " + self.token),
               (b"content-length", str(len(body)).encode())]
        raw += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": raw, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {}}
        await self.app(scope, receive, send)
        return status[0]


async def lifespan(app) -> tuple[asyncio.Queue, asyncio.Task]:
    inbox: asyncio.Queue = asyncio.Queue()
    outbox: asyncio.Queue = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get,
                                   outbox.put))
    message = await outbox.get()
    if message["type"] != "lifespan.startup.complete":
        raise SystemExit(f"the app did not start: {message}")
    return inbox, task


async def measure(args, token: str, png: bytes, image) -> dict[str, dict[str, list[float]]]:
    import loadgen
    from serve import v2_body

    from seglock.app.main import create_app
    from seglock.app.settings import Settings

    app = create_app(Settings())
    inbox, task = await lifespan(app)
    answered_at_once(app.state.registry.current("bench").batcher)
    call = Caller(app, token)
    multipart, content_type = loadgen.multipart({"image": ("x.png", png)})
    tensor, tensor_headers = v2_body(image)
    routes = {"live": ("GET", "/v2/health/live", {}, b"", 1),
              "meta": ("GET", "/v2/models/bench", {}, b"", 1),
              "v1": ("POST", "/v1/models/bench/segment", {"content-type": content_type}, multipart, 16),
              "v2": ("POST", "/v2/models/bench/infer", tensor_headers, tensor, 16)}
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for name in args.routes:
            method, path, headers, body, concurrency = routes[name]
            for _ in range(2):  # warm: the first mask, the thread pools, the caches
                statuses = await asyncio.gather(*(call(method, path, headers, body) for _ in range(concurrency)))
                if set(statuses) != {200}:
                    raise SystemExit(f"{name}: answered {statuses}")
            samples = results.setdefault(name, {"cpu_ms": [], "loop_ms": []})
            count = args.requests // concurrency * concurrency
            for _ in range(args.rounds):
                cpu, loop = time.process_time(), time.thread_time()
                for _ in range(count // concurrency):
                    await asyncio.gather(*(call(method, path, headers, body) for _ in range(concurrency)))
                samples["cpu_ms"].append((time.process_time() - cpu) * 1000 / count)
                samples["loop_ms"].append((time.thread_time() - loop) * 1000 / count)
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await task
    return results


async def bare_app(scope, receive, send) -> None:
    """`--routes floor`: reads the whole body and answers BARE_ANSWER (a mask-sized PNG), nothing else."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(BARE_ANSWER)).encode())]})
    await send({"type": "http.response.body", "body": BARE_ANSWER})


BARE_ANSWER = bytes.fromhex(os.environ.get("SEGLOCK_BARE_ANSWER", ""))


def floor(args, png: bytes, image) -> dict[str, list[float]]:
    """CPU ms per request of a bare uvicorn app and of the load generator over sockets, and of the
    decode, the model input and the mask PNG each alone (`--rounds` samples each)."""
    import loadgen
    import numpy as np
    import psutil
    import torch

    from seglock.app.imageio import decode_upload, encode_mask_png
    from seglock.models.artifact import IMAGENET_NORMALIZATION
    from seglock.models.inputs import scaled_input

    mask = np.zeros(image.shape[:2], np.uint8)
    mask[: image.shape[0] // 2] = 3
    answer = encode_mask_png(mask)
    cores = sorted(os.sched_getaffinity(0))
    port = free_port()
    command = ["-m", "uvicorn", "request_path:bare_app", "--app-dir", str(Path(__file__).resolve().parent),
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    server = subprocess.Popen([sys.executable, *command], env={**os.environ, "SEGLOCK_BARE_ANSWER": answer.hex()})
    samples: dict[str, list[float]] = {name: [] for name in ("server", "client", "decode", "input", "mask")}
    try:
        if len(cores) > 1:  # the server on one core, the client on another, as the forward would not let them be
            os.sched_setaffinity(server.pid, {cores[-1]})
            os.sched_setaffinity(0, {cores[0]})
        body, content_type = loadgen.multipart({"image": ("x.png", png)})
        req = loadgen.request("POST", f"http://127.0.0.1:{port}/v1/models/bench/segment", body=body,
                              headers={"Content-Type": content_type, "Authorization": "Bearer x"})
        wait_until_listening(port)
        asyncio.run(loadgen.drive(req, 16, 64))  # warm
        bare = psutil.Process(server.pid)
        for _ in range(args.rounds):
            before: list[float] = []
            result = asyncio.run(loadgen.drive(req, 16, args.requests, on_start=lambda: before.extend(
                (sum(bare.cpu_times()[:2]), time.process_time()))))
            if result.failed:
                raise SystemExit(f"the bare server failed {result.failed} requests")
            samples["server"].append((sum(bare.cpu_times()[:2]) - before[0]) * 1000 / result.answered)
            samples["client"].append((time.process_time() - before[1]) * 1000 / result.answered)
    finally:
        server.terminate()
        server.wait(30)
        os.sched_setaffinity(0, cores)
    work = {"decode": lambda: decode_upload(png, max_pixels=16_000_000),
            "input": lambda: scaled_input(torch.from_numpy(image)[None], "cp", IMAGENET_NORMALIZATION),
            "mask": lambda: encode_mask_png(mask)}
    for _ in range(args.rounds):
        for name, run in work.items():
            started = time.thread_time()
            for _ in range(100):
                run()
            samples[name].append((time.thread_time() - started) * 10)  # ms per call
    return samples


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_listening(port: int, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise SystemExit(f"the bare server did not listen on port {port} within {limit_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--requests", type=int, default=320, help="requests per route and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--routes", default="live,meta,v1,v2",
                        help="comma-separated: live, meta, v1, v2, floor (see above)")
    parser.add_argument("--json", help="also write the per-round figures here")
    args = parser.parse_args()
    args.routes = [name.strip() for name in args.routes.split(",") if name.strip()]
    unknown = sorted(set(args.routes) - {"live", "meta", "v1", "v2", "floor"})
    if unknown:
        parser.error(f"unknown route {unknown[0]!r}: choose from live, meta, v1, v2, floor")

    work = Path(tempfile.mkdtemp(prefix="seglock-path-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # its keystore and token go with it
    # one torch thread, as each `seglock serve --threads 1` worker; set before torch loads
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                       "SEGLOCK_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
                       "SEGLOCK_HOME": str(work / "home"), "SEGLOCK_DEMO": "false", "SEGLOCK_DEVICE": "cpu",
                       "SEGLOCK_THREADS": "1", "SEGLOCK_COMPILE_BUDGET_S": "0", "SEGLOCK_LOG_LEVEL": "warning",
                       "SEGLOCK_WARMUP": "false"})
    token, png, image = build_home(work, args.arch, args.size)

    import uvloop

    wanted = args.routes
    args.routes = [name for name in wanted if name != "floor"]
    results: dict = uvloop.run(measure(args, token, png, image)) if args.routes else {}
    print(f"seglock request path, in-process (the forward answered at once): {args.arch} {args.size}px, "
          f"{args.requests} requests per route and round, {args.rounds} rounds")
    for name, samples in results.items():
        cpu, loop = samples["cpu_ms"], samples["loop_ms"]
        print(f"  {name:<4} CPU per request {min(cpu):.3f} ms (median {statistics.median(cpu):.3f}), "
              f"of it the event loop {min(loop):.3f} ms (median {statistics.median(loop):.3f})")
    if "floor" in wanted:
        results["floor"] = least = floor(args, png, image)
        fastest = {name: min(values) for name, values in least.items()}
        labels = {"client": "the load generator", "server": "a bare uvicorn app reading the upload",
                  "decode": "decoding the PNG", "input": "the model input", "mask": "the mask PNG"}
        print(f"  floor of a /v1 request besides the forward (fastest of {args.rounds} rounds): "
              f"{sum(fastest.values()):.3f} ms = " + " + ".join(f"{labels[n]} {v:.3f}" for n, v in fastest.items())
              + f"; a forward must cost {9 * sum(fastest.values()):.1f} CPU ms per image or more for 0.9x of it")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
