"""seglock against its peers, serving the same models to the same client load.

Servers (each a real process tree on loopback):
  seglock   `seglock serve` (default --backend auto), authentication on, /v1 multipart PNG
  litserve  LitServe with a LitAPI per model running the eager model, batching (max 8, 10 ms),
            JSON with a base64 PNG in and out, no authentication
  bare      FastAPI + uvicorn, one sync endpoint per model running the eager model per request
            (FastAPI's thread pool), multipart PNG in and PNG out, no authentication
Models: a plain lraspp_mobilenet_v3_large (6 classes, random weights, seed 0) and the same model
CP-protected at `features16` (seglock folds the key from its keystore; the peers serve the folded
module, which is what a peer holding the key would run).
Load: the same client (benchmarks/loadgen.py: each request encoded once, keep-alive connections, a
few tens of microseconds of CPU per request) at concurrency 1, 16 and 64 (--concurrency), the same
scene image.
Every server's mask of that image is checked against the eager forward's.

Equal-handed: every server gets `--workers` worker processes (seglock --workers, uvicorn workers,
LitServe workers_per_device) and every process `--threads` torch/OpenMP threads (OMP_NUM_THREADS,
set before torch loads), stated in the output. Robust on a shared machine: every server is started
once and kept up, and the windows are interleaved in `--rounds` rounds (each round measures every
model and concurrency on every server back to back, the servers' order rotating), so drift in the
machine's load falls on all servers alike, and while one server is measured the others are paused
(SIGSTOP of their process groups: idle LitServe workers poll their queues, 78 % of a core here, and
would otherwise take it from the server being measured). Printed: medians over rounds of throughput, p50/p99 and
the server's CPU time per image (its whole process tree; a load-independent cost), seglock's ratios
as medians of per-round ratios, and the load average before and after.
Targets at concurrency 16: seglock >= 1.3x LitServe's and the bare endpoint's throughput, p99 no worse.

    python benchmarks/peers.py [--arch lraspp_mobilenet_v3_large] [--size 256] [--workers 2] [--threads 1]
                               [--rounds 3] [--concurrency 1,16,64] [--json OUT] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import copy
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import loadgen  # benchmarks/, beside this script
import numpy as np
import torch
from fastapi import FastAPI, UploadFile
from fastapi.responses import Response
from PIL import Image

from seglock.app.settings import thread_environment, usable_cores

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


def bare_app() -> FastAPI:
    """The bare endpoint's app (a factory: `uvicorn --factory --workers N peers:bare_app` builds one
    per worker, serving the models in $PEERS_WORK)."""
    folder = Path(os.environ["PEERS_WORK"])
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
    return app


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


def serve_litserve(folder: Path, port: int, workers: int) -> None:
    if ls is None:
        raise SystemExit("litserve is not installed: pip install 'seglock[dev]'")
    # timeout=False: no 504s, every request is measured rather than shed
    server = ls.LitServer([LitSegment(folder, name) for name in MODELS], accelerator="cpu", timeout=False,
                          workers_per_device=workers)
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
                   "--workers", str(args.workers), "--threads", str(args.threads),
                   "--compile-budget", str(args.compile_budget), "--log-level", "warning"]
        ready = "/readyz"
    elif kind == "bare":  # uvicorn's own command: its workers do not re-import this script before answering pings
        command = [sys.executable, "-m", "uvicorn", "peers:bare_app", "--factory",
                   "--app-dir", str(Path(__file__).parent),
                   "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers),
                   "--timeout-worker-healthcheck", "120", "--log-level", "warning", "--no-access-log"]
        env = {**env, "PEERS_WORK": str(work)}
        ready = "/health"
    else:
        command = [sys.executable, __file__, "--serve", kind, "--work", str(work), "--port", str(port),
                   "--workers", str(args.workers), "--threads", str(args.threads)]
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


def wait_compiled(base: str, token: str, limit_s: float, workers: int) -> str:
    """seglock's backends once every worker's background compiles settled (what a long-running server
    serves): asked until `4 * workers` answers in a row (any worker may answer) are settled."""
    deadline = time.monotonic() + limit_s
    seen: set[str] = set()
    settled_in_a_row = 0
    while settled_in_a_row < 4 * workers:
        states = {}
        for model in MODELS:
            params = httpx.get(f"{base}/v2/models/{model}", headers={"Authorization": f"Bearer {token}"},
                               timeout=10).json()["parameters"]
            states[model] = (params["backend"], params["compile"])
        if any(state == "compiling" for _, state in states.values()) and time.monotonic() < deadline:
            settled_in_a_row = 0
            seen.clear()
            time.sleep(2)
            continue
        settled_in_a_row += 1
        seen.add(", ".join(f"{m}: {b}" + ("" if c in (None, "ready") else f" (compile {c})")
                           for m, (b, c) in states.items()))
    return " / ".join(sorted(seen))


def request_for(kind: str, model: str, setup: dict, base: str):
    """(the request, encoded once, and a function reading the mask out of the answer's body)."""
    png = setup["png"]

    def from_png(body: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(body)))

    if kind in ("seglock", "bare"):
        body, content_type = loadgen.multipart({"image": ("x.png", png)})
        headers = {"Content-Type": content_type}
        if kind == "seglock":
            headers["Authorization"] = f"Bearer {setup['token']}"
        path = f"/v1/models/{model}/segment" if kind == "seglock" else f"/predict/{model}"
        return loadgen.request("POST", base + path, body=body, headers=headers), from_png
    body = json.dumps({"image": base64.b64encode(png).decode()}).encode()
    return (loadgen.request("POST", base + f"/predict/{model}", body=body,
                            headers={"Content-Type": "application/json"}),
            lambda answer: from_png(base64.b64decode(json.loads(answer)["mask"])))


def cpu_seconds(process: subprocess.Popen) -> float:
    """CPU time (user + system) of a server and every process it started, so far."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(process.pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


async def drive(req: loadgen.Request, concurrency: int, total: int) -> dict:
    """`total` requests from `concurrency` connections; throughput and latency percentiles."""
    result = await loadgen.drive(req, concurrency, total)
    ms = np.array(result.latencies_s or [float("nan")]) * 1000
    return {"images_per_s": result.answered / result.elapsed_s, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "requests": total, "failed": result.failed,
            "opening": result.opening}


def window(server: dict, model: str, concurrency: int, total: int) -> dict:
    """One measured window: the load, and the server's CPU time per answered image."""
    req, _ = server["requests"][model]
    cpu_before = cpu_seconds(server["process"])
    result = asyncio.run(drive(req, concurrency, total))
    answered = result["requests"] - result["failed"] + result["opening"]  # the CPU window holds both
    result["cpu_ms_per_image"] = (cpu_seconds(server["process"]) - cpu_before) * 1000 / max(answered, 1)
    return result


def start_all(work: Path, setup: dict, env: dict, args) -> dict:
    """Every server started once and kept up for the whole run; masks checked; each warmed up."""
    servers: dict = {}
    for kind in args.servers:  # started together, so their start-up (and seglock's compile) overlap
        process, base, ready = start(kind, work, setup, env, args)
        servers[kind] = {"process": process, "base": base, "ready": ready}
    for kind, server in servers.items():
        wait_ready(server["process"], server["base"], server["ready"], 900, work / f"{kind}.log")
        if kind == "seglock":
            server["backend"] = wait_compiled(server["base"], setup["token"], args.compile_budget + 120,
                                              args.workers)
        server["requests"] = {model: request_for(kind, model, setup, server["base"]) for model in MODELS}
        server["masks_identical"] = {}
        for model in MODELS:
            req, read_mask = server["requests"][model]
            answer = asyncio.run(loadgen.send_once(req, timeout_s=600))
            if answer.status != 200:
                raise SystemExit(f"{kind} answered {answer.status} for model {model}: {answer.body[:200]!r}")
            server["masks_identical"][model] = bool(np.array_equal(read_mask(answer.body), setup["expected"][model]))
            asyncio.run(drive(req, 8, 8 * args.workers))  # warm-up, every worker
    return servers


def pause(server: dict, paused: bool) -> None:
    """Stop (SIGSTOP) or resume (SIGCONT) a server's whole process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server["process"].pid, signal.SIGSTOP if paused else signal.SIGCONT)


def measured_alone(servers: dict, kind: str) -> None:
    """Every server but `kind` paused: an idle server takes no CPU from the one being measured.
    (Idle LitServe workers poll their queues: 78 % of a core here, taken from whichever server was
    measured beside it.)"""
    for other, server in servers.items():
        pause(server, other != kind)
    time.sleep(0.5)  # the resumed server's threads are running again


def run_rounds(servers: dict, args) -> dict:
    """`--rounds` interleaved rounds: in each, every (model, concurrency) window is measured on every
    server back to to back (the servers' order rotating from round to round), so drift in a shared
    machine's load falls on all servers alike; the others are paused during a server's window."""
    try:
        return _run_rounds(servers, args)
    finally:
        for server in servers.values():
            pause(server, False)


def _run_rounds(servers: dict, args) -> dict:
    kinds = list(servers)
    samples: dict = {kind: {model: {str(c): [] for c in args.concurrency} for model in MODELS} for kind in kinds}
    for index in range(args.rounds):
        order = kinds[index % len(kinds):] + kinds[:index % len(kinds)]
        for concurrency in args.concurrency:
            total = max(args.min_requests, args.requests_per_worker * concurrency)
            for model in MODELS:
                for kind in order:
                    measured_alone(servers, kind)
                    result = window(servers[kind], model, concurrency, total)
                    samples[kind][model][str(concurrency)].append(result)
                    print(f"  round {index + 1} {kind:<9} {model:<6} c={concurrency:<3} "
                          f"{result['images_per_s']:6.1f} img/s  p50 {result['p50_ms']:7.0f} ms  "
                          f"p99 {result['p99_ms']:7.0f} ms  cpu {result['cpu_ms_per_image']:6.1f} ms/img"
                          + (f"  {result['failed']} failed" if result["failed"] else ""), flush=True)
    return samples


def median_of(samples: list[dict], field: str) -> float:
    return float(np.median([sample[field] for sample in samples]))


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


def summarize(samples: dict, args) -> dict:
    """Medians over rounds per server, model and concurrency; seglock's ratios as medians of the
    per-round ratios (each round's seglock window against the same round's peer window)."""
    summary: dict = {kind: {model: {} for model in MODELS} for kind in samples}
    for kind, models in samples.items():
        for model, levels in models.items():
            for c, rounds in levels.items():
                summary[kind][model][c] = {field: median_of(rounds, field) for field in
                                           ("images_per_s", "p50_ms", "p99_ms", "cpu_ms_per_image")}
                summary[kind][model][c]["failed"] = sum(r["failed"] for r in rounds)
    if "seglock" in samples:
        for peer in (k for k in samples if k != "seglock"):
            for model in MODELS:
                for c in map(str, args.concurrency):
                    ours, theirs = samples["seglock"][model][c], samples[peer][model][c]
                    summary["seglock"][model][c][f"ratio_vs_{peer}"] = float(np.median(
                        [o["images_per_s"] / t["images_per_s"] for o, t in zip(ours, theirs, strict=True)]))
    return summary


def report(summary: dict, servers: dict, args, load: tuple) -> None:
    print(f"\nevery server process: {args.threads} torch thread(s) (OMP_NUM_THREADS={args.threads}); "
          f"{args.workers} worker process(es) per server (seglock --workers, uvicorn workers, LitServe "
          f"workers_per_device); medians of {args.rounds} interleaved rounds")
    print(f"load average (1 min) before {load[0][0]:.2f}, after {load[1][0]:.2f}")
    print("\nserver    model  conc  img/s    p50 ms    p99 ms  cpu ms/img")
    for kind in summary:
        for model in MODELS:
            for c in args.concurrency:
                r = summary[kind][model][str(c)]
                print(f"{kind:<9} {model:<6} {c:>4} {r['images_per_s']:6.1f} {r['p50_ms']:9.0f} {r['p99_ms']:9.0f} "
                      f"{r['cpu_ms_per_image']:10.1f}" + (f"  ({r['failed']} failed)" if r["failed"] else ""))
    if "seglock" in servers:
        print(f"\nseglock backends: {servers['seglock'].get('backend')}")
    print("masks identical to the eager forward: "
          + ", ".join(f"{k}/{m}={v}" for k, s in servers.items() for m, v in s["masks_identical"].items()))
    if "seglock" not in summary or 16 not in args.concurrency:
        return
    print("\nseglock's ratios at concurrency 16, medians of per-round ratios (targets: throughput >= 1.3x, "
          "median p99 no worse):")
    for peer in (k for k in summary if k != "seglock"):
        for model in MODELS:
            ours, theirs = summary["seglock"][model]["16"], summary[peer][model]["16"]
            ratio = ours[f"ratio_vs_{peer}"]
            ok = ratio >= 1.3 and ours["p99_ms"] <= theirs["p99_ms"]
            print(f"  vs {peer:<8} {model:<6} throughput {ratio:5.2f}x, p99 {ours['p99_ms']:.0f} vs "
                  f"{theirs['p99_ms']:.0f} ms, cpu/img {ours['cpu_ms_per_image']:.1f} vs "
                  f"{theirs['cpu_ms_per_image']:.1f} ms: {'ok' if ok else 'MISSED'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16, 64],
                        help="comma-separated concurrency levels (default 1,16,64)")
    parser.add_argument("--requests-per-worker", type=int, default=2,
                        help="requests per concurrent client worker in each window")
    parser.add_argument("--min-requests", type=int, default=16, help="at least this many requests per window")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all servers")
    parser.add_argument("--workers", type=int, default=usable_cores(),
                        help="worker processes of every server (default: one per core)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of every server process "
                                                               "(default 1)")
    parser.add_argument("--servers", type=lambda s: s.split(","), default=list(SERVERS),
                        help="comma-separated subset of seglock,litserve,bare")
    parser.add_argument("--compile-budget", type=float, default=900, help="seglock's --compile-budget")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (servers' logs, keystore, CP key) instead of removing it at exit")
    parser.add_argument("--serve", choices=["litserve"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        torch.set_num_threads(args.threads)  # as OMP_NUM_THREADS, which the driver set before torch loaded
    if args.serve == "litserve":
        serve_litserve(Path(args.work), args.port, args.workers)
        return 0

    work = Path(tempfile.mkdtemp(prefix="seglock-peers-"))
    if not args.keep:
        atexit.register(shutil.rmtree, work, ignore_errors=True)  # its keystore, token and CP key go with it
    env = {**os.environ, "SEGLOCK_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
           **thread_environment(args.threads)}
    setup = prepare(work, args, env)
    print(f"peers benchmark: {args.arch} {args.size}px, concurrency {args.concurrency}, servers {args.servers}, "
          f"{args.workers} worker(s) x {args.threads} thread(s) each, work folder {work}"
          + ("" if args.keep else " (removed at exit; --keep keeps it)"), flush=True)
    servers: dict = {}
    try:
        servers = start_all(work, setup, env, args)
        load_before = os.getloadavg()
        samples = run_rounds(servers, args)
        load_after = os.getloadavg()
    finally:
        for server in servers.values():
            stop(server["process"])
    summary = summarize(samples, args)
    report(summary, servers, args, (load_before, load_after))
    if args.json:
        results = {"arch": args.arch, "size": args.size, "concurrency": args.concurrency, "workers": args.workers,
                   "threads": args.threads, "rounds": args.rounds, "load_before": load_before,
                   "load_after": load_after, "summary": summary, "samples": samples,
                   "seglock_backend": servers.get("seglock", {}).get("backend"),
                   "masks_identical": {k: s["masks_identical"] for k, s in servers.items()}}
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
