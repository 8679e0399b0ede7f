"""seglock against its peers, serving the same models to the same client load.

Servers (each a real process on loopback, one after the other):
  seglock   `seglock serve` (default --backend auto), authentication on, /v1 multipart PNG
  litserve  LitServe with a LitAPI per model running the eager model, batching (max 8, 10 ms),
            JSON with a base64 PNG in and out, no authentication
  bare      FastAPI + uvicorn, one sync endpoint per model running the eager model per request
            (FastAPI's thread pool), multipart PNG in and PNG out, no authentication
Models: a plain lraspp_mobilenet_v3_large (6 classes, random weights, seed 0) and the same model
CP-protected at `features16` (seglock folds the key from its keystore; the peers serve the folded
module, which is what a peer holding the key would run).
Load: the same httpx client at concurrency 1, 16 and 64 (--concurrency), the same scene image.
Every server's mask of that image is checked against the eager forward's.

Prints throughput and p50/p99 latency per server, model and concurrency, and seglock's ratios;
targets at concurrency 16: seglock >= 1.3x LitServe's and the bare endpoint's throughput, p99 no worse.

    python benchmarks/peers.py [--arch lraspp_mobilenet_v3_large] [--size 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from fastapi import FastAPI, UploadFile
from fastapi.responses import Response
from PIL import Image

SERVERS = ("seglock", "litserve", "bare")
MODELS = ("plain", "cp")
TAPS = {"tiny": "dec2", "lraspp_mobilenet_v3_large": "features16"}  # as benchmarks/serve.py


# -- the peers, run as `peers.py --serve KIND` in their own process ---------------------------------

def load_eager(folder: Path, model: str):
    """The eager module a peer serves, and its manifest (the CP model with its key folded in)."""
    from seglock.models import CPKey, fold_key, load_artifact

    module, manifest = load_artifact(folder / model)
    if manifest.mode == "cp":
        key = CPKey.from_dict(json.loads((folder / "cp.key.json").read_text()))
        module = fold_key(module, manifest.protection["tap"], key)
    return module.eval(), manifest


def preprocess(png: bytes, manifest) -> torch.Tensor:
    from seglock.client.imaging import resize_rgb
    from seglock.models.inputs import model_input

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    resized = resize_rgb(image, tuple(manifest.input_size))
    return model_input(torch.from_numpy(np.ascontiguousarray(resized))[None], manifest)[0]


def mask_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def serve_bare(folder: Path, port: int) -> None:
    import uvicorn

    app = FastAPI()
    models = {name: load_eager(folder, name) for name in MODELS}

    def endpoint(name: str):
        module, manifest = models[name]

        def predict(image: UploadFile) -> Response:  # sync: FastAPI runs it in its thread pool
            x = preprocess(image.file.read(), manifest)
            with torch.inference_mode():
                mask = module(x[None]).argmax(1)[0].numpy()
            return Response(mask_png(mask), media_type="image/png")

        return predict

    for name in MODELS:
        app.post(f"/predict/{name}")(endpoint(name))
    app.get("/health")(lambda: {"ok": True})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


try:  # LitServe's workers are spawned processes: its API class must live at module level
    import litserve as ls
except ImportError:  # pragma: no cover - `pip install 'seglock[dev]'` has it
    ls = None

if ls is not None:
    class LitSegment(ls.LitAPI):
        def __init__(self, folder: Path, name: str):
            super().__init__(max_batch_size=8, batch_timeout=0.01, api_path=f"/predict/{name}")
            self.folder, self.name = folder, name

        def setup(self, device):
            self.module, self.manifest = load_eager(self.folder, self.name)

        def decode_request(self, request):
            return preprocess(base64.b64decode(request["image"]), self.manifest)

        def batch(self, inputs):
            return torch.stack(inputs)

        def predict(self, x):
            with torch.inference_mode():
                return self.module(x).argmax(1).numpy()

        def unbatch(self, output):
            return list(output)

        def encode_response(self, mask):
            return {"mask": base64.b64encode(mask_png(mask)).decode()}


def serve_litserve(folder: Path, port: int) -> None:
    if ls is None:
        raise SystemExit("litserve is not installed: pip install 'seglock[dev]'")
    # timeout=False: no 504s, every request is measured rather than shed
    server = ls.LitServer([LitSegment(folder, name) for name in MODELS], accelerator="cpu", timeout=False)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, num_api_servers=1, log_level="warning")


# -- the driver --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(work: Path, args, env: dict) -> dict:
    """Artifacts, key file, a seglock home with both models and a token; the eager masks of the scene."""
    from seglock.app.home import Home
    from seglock.keystore import Keystore
    from seglock.models import build_model, fold_key, protect, save_artifact
    from seglock.models.data import generate_scene
    from seglock.models.inputs import model_input

    torch.manual_seed(0)
    plain = build_model(args.arch, 6).eval()
    protected = copy.deepcopy(plain)
    tap = TAPS.get(args.arch, "layer4")
    key = protect(protected, tap)
    common = dict(class_names=[f"c{i}" for i in range(6)], input_size=[args.size, args.size])
    plain_manifest = save_artifact(plain, work / "plain", name="plain", **common)
    save_artifact(protected, work / "cp", name="cp", protection={"mode": "cp", "tap": tap},
                  key={"id": "kpeers", "version": 1}, **common)
    key_file = work / "cp.key.json"
    key_file.write_text(json.dumps(key.to_dict()))
    key_file.chmod(0o600)

    home = work / "home"
    keystore = Keystore.open(home, create=True, env=env)
    Home(home, keystore).import_artifact(work / "plain")
    Home(home, keystore).import_artifact(work / "cp", key=key)
    _, token = keystore.create_token("peers", ["segment"], list(MODELS))

    image = generate_scene(0, 0, args.size)[0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    x = model_input(torch.from_numpy(image)[None], plain_manifest)
    with torch.inference_mode():
        expected = {"plain": plain(x).argmax(1)[0].numpy().astype(np.uint8),
                    "cp": fold_key(protected, tap, key)(x).argmax(1)[0].numpy().astype(np.uint8)}
    return {"home": home, "token": token, "png": buffer.getvalue(), "expected": expected}


def start(kind: str, work: Path, setup: dict, env: dict, args) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    if kind == "seglock":
        command = [sys.executable, "-m", "seglock.app.cli", "serve", "--home", str(setup["home"]), "--port", str(port),
                   "--no-demo", "--device", "cpu", "--max-batch", "8", "--max-wait-ms", "10",
                   "--compile-budget", str(args.compile_budget), "--log-level", "warning"]
        ready = "/readyz"
    else:
        command = [sys.executable, __file__, "--serve", kind, "--work", str(work), "--port", str(port)]
        ready = "/health"
    log = open(work / f"{kind}.log", "wb")  # noqa: SIM115 - closed with the process
    # a session of its own: LitServe's spawned workers stop with their server (stop() signals the group)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, f"http://127.0.0.1:{port}", ready


def wait_ready(process, base: str, path: str, limit_s: float, log: Path) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(base + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {limit_s:.0f} s:\n{log.read_text()[-2000:]}")


def wait_compiled(base: str, token: str, limit_s: float) -> str:
    """seglock's backends once the background compiles settled (what a long-running server serves)."""
    deadline = time.monotonic() + limit_s
    while True:
        states = {}
        for model in MODELS:
            params = httpx.get(f"{base}/v2/models/{model}", headers={"Authorization": f"Bearer {token}"},
                               timeout=10).json()["parameters"]
            states[model] = (params["backend"], params["compile"])
        if all(state != "compiling" for _, state in states.values()) or time.monotonic() > deadline:
            return ", ".join(f"{m}: {b}" + ("" if c in (None, "ready") else f" (compile {c})")
                             for m, (b, c) in states.items())
        time.sleep(2)


def request_for(kind: str, model: str, setup: dict):
    """(path, httpx keyword arguments, function reading the mask out of the response)."""
    png = setup["png"]

    def from_png(response):
        return np.asarray(Image.open(io.BytesIO(response.content)))

    if kind == "seglock":
        return (f"/v1/models/{model}/segment",
                {"files": {"image": ("x.png", png)}, "headers": {"Authorization": f"Bearer {setup['token']}"}},
                from_png)
    if kind == "bare":
        return f"/predict/{model}", {"files": {"image": ("x.png", png)}}, from_png
    return (f"/predict/{model}", {"json": {"image": base64.b64encode(png).decode()}},
            lambda r: np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["mask"])))))


async def drive(base: str, path: str, kwargs: dict, concurrency: int, total: int) -> dict:
    """`total` requests from `concurrency` workers; throughput and latency percentiles."""
    latencies: list[float] = []
    failed = [0]
    left = [total]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        async def worker():
            while left[0] > 0:
                left[0] -= 1
                started = time.perf_counter()
                try:
                    response = await http.post(path, **kwargs)
                except httpx.HTTPError:
                    failed[0] += 1
                    continue
                if response.status_code != 200:  # counted, not fatal: one peer's timeout must not end the run
                    failed[0] += 1
                    continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies or [float("nan")]) * 1000
    return {"images_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "requests": total, "failed": failed[0]}


def measure(kind: str, work: Path, setup: dict, env: dict, args) -> dict:
    process, base, ready = start(kind, work, setup, env, args)
    out: dict = {}
    try:
        wait_ready(process, base, ready, 900, work / f"{kind}.log")
        if kind == "seglock":
            out["backend"] = wait_compiled(base, setup["token"], args.compile_budget + 120)
        for model in MODELS:
            path, kwargs, read_mask = request_for(kind, model, setup)
            response = httpx.post(base + path, timeout=600, **kwargs)
            response.raise_for_status()
            out.setdefault("masks_identical", {})[model] = bool(np.array_equal(read_mask(response),
                                                                               setup["expected"][model]))
            asyncio.run(drive(base, path, kwargs, 8, 16))  # warm-up
            for concurrency in args.concurrency:
                total = max(args.min_requests, args.requests_per_worker * concurrency)
                result = asyncio.run(drive(base, path, kwargs, concurrency, total))
                out.setdefault(model, {})[str(concurrency)] = result
                print(f"  {kind:<9} {model:<6} c={concurrency:<3} {result['images_per_s']:6.1f} img/s  "
                      f"p50 {result['p50_ms']:7.0f} ms  p99 {result['p99_ms']:7.0f} ms"
                      + (f"  {result['failed']} failed" if result["failed"] else ""), flush=True)
    finally:
        stop(process)
    return out


def stop(process: subprocess.Popen) -> None:
    """Terminate the server and every process it started (its process group), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    except ProcessLookupError:
        pass


def report(results: dict, concurrency: list[int]) -> None:
    print("\nserver    model  conc  img/s    p50 ms    p99 ms")
    for kind in SERVERS:
        for model in MODELS:
            for c in concurrency:
                r = results[kind][model][str(c)]
                print(f"{kind:<9} {model:<6} {c:>4} {r['images_per_s']:6.1f} {r['p50_ms']:9.0f} {r['p99_ms']:9.0f}")
    print(f"\nseglock backends: {results['seglock'].get('backend')}")
    print("masks identical to the eager forward: "
          + ", ".join(f"{k}/{m}={v}" for k in SERVERS for m, v in results[k]["masks_identical"].items()))
    if "16" not in {str(c) for c in concurrency}:
        return
    print("\nseglock's ratios at concurrency 16 (targets: throughput >= 1.3x, p99 no worse):")
    for peer in ("litserve", "bare"):
        for model in MODELS:
            ours, theirs = results["seglock"][model]["16"], results[peer][model]["16"]
            ratio = ours["images_per_s"] / theirs["images_per_s"]
            ok = ratio >= 1.3 and ours["p99_ms"] <= theirs["p99_ms"]
            print(f"  vs {peer:<8} {model:<6} throughput {ratio:5.2f}x, p99 {ours['p99_ms']:.0f} vs "
                  f"{theirs['p99_ms']:.0f} ms: {'ok' if ok else 'MISSED'}")
    for peer in ("litserve", "bare"):
        for c in concurrency:
            ratios = [results["seglock"][m][str(c)]["images_per_s"] / results[peer][m][str(c)]["images_per_s"]
                      for m in MODELS]
            results.setdefault("ratios", {}).setdefault(peer, {})[str(c)] = ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16, 64],
                        help="comma-separated concurrency levels (default 1,16,64)")
    parser.add_argument("--requests-per-worker", type=int, default=4, help="requests per concurrent worker")
    parser.add_argument("--min-requests", type=int, default=16, help="at least this many requests per level")
    parser.add_argument("--servers", type=lambda s: s.split(","), default=list(SERVERS),
                        help="comma-separated subset of seglock,litserve,bare")
    parser.add_argument("--compile-budget", type=float, default=900, help="seglock's --compile-budget")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--serve", choices=["litserve", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve == "bare":
        serve_bare(Path(args.work), args.port)
        return 0
    if args.serve == "litserve":
        serve_litserve(Path(args.work), args.port)
        return 0

    work = Path(tempfile.mkdtemp(prefix="seglock-peers-"))
    env = {**os.environ, "SEGLOCK_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}
    setup = prepare(work, args, env)
    print(f"peers benchmark: {args.arch} {args.size}px, concurrency {args.concurrency}, work folder {work}", flush=True)
    results = {"arch": args.arch, "size": args.size, "concurrency": args.concurrency}
    for kind in args.servers:
        results[kind] = measure(kind, work, setup, env, args)
    if set(args.servers) == set(SERVERS):
        report(results, args.concurrency)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
