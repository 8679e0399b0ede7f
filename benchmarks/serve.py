"""Serving speed, measured in one process tree; prints ratios against the targets.

(a) CP-protected (key folded in, as served) vs plain forward time      target <= 1.02
(b) HTTP throughput at concurrency 16 on a real uvicorn server (default --backend auto; /v1 with a
    PNG file, /v1 with what the SDK uploads for a decoded image (.npy), /v2 with a binary tensor) vs
    the raw batched forward of the same model on the same device:
      vs the eager fp32 forward at --max-batch                           target >= 1.5 CPU
      (and, printed beside it, at its fastest batch size)
      vs the fastest exact raw forward found (channels_last, fused,      target >= 0.9
      script, compile; each at batch 1, 2, 4, ... --max-batch); /v1
      with the PNG file carries the target, the other windows' ratios
      and the CPU per image of each are printed beside it
    and the server's masks identical to the eager forward's
(c) p50 / p99 latency at concurrency 1 and 16, and the first request once the server is ready

Raw and HTTP are measured the same way: the raw forwards run in `--workers` processes started
like the server's workers (the same `--threads`, set before torch loads; warm), all at once, and
their throughput is the sum. Each is timed at every batch size the server chooses among
(`seglock serve --tune-batch`: 1, 2, 4, ... --max-batch; on CPU a smaller batch can cost less per
image); the fastest forward is the fastest of them all, and the eager forward the target is set
against is the eager forward at --max-batch (the baseline the target was set with; eager at its
fastest size is printed beside it). The server and the raw processes stay up together and are
measured in `--rounds` interleaved rounds (raw forwards, then HTTP load, then again), so a shared
machine's drifting load falls on both sides; the ratios are medians of per-round ratios, and the
load average is printed before and after. The load comes from benchmarks/loadgen.py (each request
encoded once, keep-alive connections): the client shares the cores and should take as little from
them as it can.

    python benchmarks/serve.py [--arch lraspp_mobilenet_v3_large] [--size 256] [--device cpu]
                               [--workers 2] [--threads 1] [--rounds 5] [--compile-budget 900]
                               [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import copy
import functools
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import loadgen  # benchmarks/, beside this script
import numpy as np
import torch
from PIL import Image

from seglock.app.backends import batch_sizes, fold_batch_norms, forward_clock, script_module, set_threads
from seglock.app.engine import autocast_dtype
from seglock.app.home import Home
from seglock.app.settings import thread_environment, usable_cores
from seglock.keystore import Keystore
from seglock.models import apply_key, build_model, fold_key, get_tap, protect, save_artifact
from seglock.models.artifact import IMAGENET_NORMALIZATION
from seglock.models.data import generate_scene
from seglock.models.device import resolve_device
from seglock.models.inputs import scaled_input

WINDOWS = ("http_v1", "http_v1_sdk", "http_v2")  # the concurrency-16 windows of each round
TAPS = {"tiny": "dec2", "vit_seg": "head", "lraspp_mobilenet_v3_large": "features16",
        "deeplabv3_mobilenet_v3_large": "features16"}


def timed(fn, repeats: int, warmup: int = 2, clock=time.perf_counter) -> float:
    """Median seconds of `fn()` over `repeats` runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = clock()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(clock() - started)
    return statistics.median(samples)


def forward_ratio(plain, protected, tap, key, batch, repeats) -> dict:
    """Forward times of the plain model, the CP model as served (key folded in) and the CP model
    with a gather at the tap. Measured in interleaved rounds, so drift in the machine's load
    falls on all three alike; each is its fastest round. The three do the same arithmetic, so
    what tells them apart is the machine's noise, which only ever adds time: on a shared 2-core
    VM, in one process, medians of 7 rounds put the same ratio anywhere from 0.88 to 1.06 and
    fastest rounds from 1.00 to 1.02; from one process to the next the fastest rounds still
    move it by ±7 % (0.94-1.07), so one run's (a) is a coarse figure there."""
    modules = {"plain": plain, "cp_folded": fold_key(protected, tap, key).eval(),
               "cp_gather": apply_key(protected, tap, key).eval()}
    samples: dict[str, list[float]] = {name: [] for name in modules}
    clock = forward_clock(batch.device)  # one CPU thread: its CPU time, which preemption does not inflate
    with torch.inference_mode():
        for module in modules.values():
            timed(lambda m=module: m(batch), 1, warmup=2)
        for _ in range(repeats):
            for name, module in modules.items():
                samples[name].append(timed(lambda m=module: m(batch), 3, warmup=0, clock=clock))
    results = {name: min(values) for name, values in samples.items()}
    return {
        "plain_ms": results["plain"] * 1000,
        "cp_served_ms": results["cp_folded"] * 1000,
        "cp_gather_ms": results["cp_gather"] * 1000,
        "ratio_served_vs_plain": results["cp_folded"] / results["plain"],
        "ratio_gather_vs_plain": results["cp_gather"] / results["plain"],
        "rounds": repeats,
    }


# -- the raw forwards, in processes started like the server's workers ----------------------------

def raw_worker(work: Path, batch: int, compile_budget: float, core: int | None, device: torch.device,
               amp: str) -> None:
    """`serve.py --raw-worker`: build every way to run the served model, then time one on each
    command line ("NAME REPEATS BATCH", BATCH at most `batch`) and answer one JSON line. Started with
    the server's thread variables, so its forward runs with exactly the threads a server worker's
    does, and on a core of its own as a server worker's forward thread is (`--pin-forward`). On an
    accelerator every forward runs there in the server's precision (`--amp`: bf16 autocast by
    default on CUDA), and the eager reference is eager in that precision, as the server's is."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    from seglock.models import CPKey, fold_key, load_artifact

    protected, manifest = load_artifact(work / "artifact")
    key = CPKey.from_dict(json.loads((work / "cp.key.json").read_text()))
    served = fold_key(protected, manifest.protection["tap"], key).eval().to(device)
    image = np.load(work / "image.npy")
    with torch.inference_mode():
        inputs = scaled_input(torch.from_numpy(np.stack([image] * batch)), "cp", IMAGENET_NORMALIZATION).to(device)
    cl_module = copy.deepcopy(served).to(memory_format=torch.channels_last)
    fused_module = fold_batch_norms(copy.deepcopy(served)).to(memory_format=torch.channels_last)
    cl_inputs = inputs.contiguous(memory_format=torch.channels_last)
    info: dict = {"threads": torch.get_num_threads(), "backends": {}}
    dtype = autocast_dtype(amp, device)
    precision = (torch.autocast(device.type, dtype=dtype) if dtype is not None  # the server's, for every forward
                 else contextlib.nullcontext())
    with torch.inference_mode(), precision:
        reference = served(inputs).argmax(1)
        np.save(work / "eager-mask.npy", reference[0].cpu().numpy().astype(np.uint8))
        scripted = script_module(fused_module, cl_inputs)
        timers = {"eager": lambda n=batch: served(inputs[:n]).argmax(1),
                  "channels_last": lambda n=batch: cl_module(cl_inputs[:n]).argmax(1),
                  "fused": lambda n=batch: fused_module(cl_inputs[:n]).argmax(1),
                  "script": lambda n=batch: scripted(cl_inputs[:n]).argmax(1)}
        info["backends"]["eager"] = {"exact": True}
        for name in ("channels_last", "fused", "script"):
            info["backends"][name] = {"exact": torch.equal(timers[name](), reference)}
        if compile_budget > 0:
            started = time.perf_counter()  # the module the server compiles: fused where fused is exact
            compiled = torch.compile(fused_module if info["backends"]["fused"]["exact"] else cl_module)
            dynamic = cl_inputs.clone()
            torch._dynamo.mark_dynamic(dynamic, 0)  # as the server compiles it
            exact = torch.equal(compiled(dynamic).argmax(1), reference)
            timers["compile"] = lambda n=batch: compiled(cl_inputs[:n]).argmax(1)
            info["backends"]["compile"] = {"exact": exact, "compile_s": time.perf_counter() - started}
        for fn in timers.values():  # warm: oneDNN primitives made, caches filled
            fn()
            fn()
    print(json.dumps(info), flush=True)
    warm = {(name, batch) for name in timers}
    with torch.inference_mode(), precision:
        for line in sys.stdin:
            name, repeats, size = line.split()
            run = functools.partial(timers[name], int(size))
            if (name, int(size)) not in warm:  # a frozen trace optimises on its first runs of a shape
                run()
                run()
                warm.add((name, int(size)))
            cpu_before = time.process_time()
            seconds = timed(run, int(repeats), warmup=1)
            cpu_per_image = (time.process_time() - cpu_before) / ((int(repeats) + 1) * int(size))
            print(json.dumps({"seconds": seconds, "cpu_s_per_image": cpu_per_image}), flush=True)


class RawForwards:
    """`workers` raw-forward processes timed together: the same processes, threads, batch and warm
    state as the server's workers, so raw and HTTP throughput are measured the same way."""

    def __init__(self, work: Path, env: dict, args):
        command = [sys.executable, __file__, "--raw-worker", "--work", str(work), "--max-batch", str(args.max_batch),
                   "--compile-budget", str(args.compile_budget), "--device", str(args.device), "--amp", args.amp]
        self.processes = []
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        pin = args.threads == 1 and 1 < len(cores) and args.workers <= len(cores)
        for index in range(args.workers):  # one at a time: the first compile fills the cache the others read
            process = subprocess.Popen(command + (["--core", str(cores[index])] if pin else []), env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.processes.append(process)
            self.info = json.loads(process.stdout.readline())
        self.backends = self.info["backends"]

    def measure(self, name: str, repeats: int, batch: int) -> tuple[float, float]:
        """(images/s, CPU ms per image) of `name` at `batch` with every worker running its forward at once."""
        for process in self.processes:
            process.stdin.write(f"{name} {repeats} {batch}\n")
            process.stdin.flush()
        answers = [json.loads(process.stdout.readline()) for process in self.processes]
        return (sum(batch / answer["seconds"] for answer in answers),
                1000 * statistics.mean(answer["cpu_s_per_image"] for answer in answers))

    def close(self) -> None:
        for process in self.processes:
            process.stdin.close()
            process.wait(30)


def bench_home(work: Path, protected: torch.nn.Module, key, tap: str, size: int, env: dict) -> str:
    """`work`/home serving the CP-protected model as `bench` (saved to `work`/artifact); returns a
    segment token granted it."""
    save_artifact(protected, work / "artifact", name="bench", class_names=[f"c{i}" for i in range(6)],
                  input_size=[size, size], protection={"mode": "cp", "tap": tap}, key={"id": "kbench", "version": 1})
    keystore = Keystore.open(work / "home", create=True, env=env)
    Home(work / "home", keystore).import_artifact(work / "artifact", key=key)
    return keystore.create_token("bench", ["segment"], ["bench"])[1]


def bench_image(size: int) -> tuple[np.ndarray, bytes]:
    """The benchmark image (a photo-like scene, not PNG-hostile noise) and its PNG."""
    image = generate_scene(0, 0, size)[0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return image, buffer.getvalue()


def wait_for_backend(base: str, token: str, limit_s: float, workers: int) -> tuple[str, list[int]]:
    """(the server's backends for the benchmark model, the batch sizes its workers tuned their forward
    to) once every worker's background compile (if any) settled: asked until `4 * workers` answers in
    a row (any worker may answer) are settled."""
    deadline = time.monotonic() + limit_s
    seen: set[str] = set()
    batches: set[int] = set()
    settled_in_a_row = 0
    while settled_in_a_row < 4 * workers:
        params = httpx.get(f"{base}/v2/models/bench", headers={"Authorization": f"Bearer {token}"},
                           timeout=10).json()["parameters"]
        if params["compile"] == "compiling" and time.monotonic() < deadline:
            settled_in_a_row = 0
            seen.clear()
            time.sleep(2)
            continue
        settled_in_a_row += 1
        settled = params["compile"] in (None, "ready")
        seen.add(params["backend"] + ("" if settled else f" (compile {params['compile']})"))
        batches.add(params["max_batch"])
    return " / ".join(sorted(seen)), sorted(batches)


async def masks_over_http(base: str, token: str, data: bytes, image: np.ndarray) -> list[np.ndarray]:
    """The mask of the benchmark image from /v1 (the PNG file, and the SDK's upload of the decoded
    image) and /v2 (binary tensor)."""
    sdk = sdk_upload(image)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=300) as http:
        v1 = await http.post("/v1/models/bench/segment", files={"image": ("x.png", data)})
        v1.raise_for_status()
        v1_sdk = await http.post("/v1/models/bench/segment", files={"image": (sdk.filename, sdk.content)})
        v1_sdk.raise_for_status()
        body, headers = v2_body(image)
        v2 = await http.post("/v2/models/bench/infer", content=body, headers=headers)
        v2.raise_for_status()
    length = int(v2.headers["inference-header-content-length"])
    return [np.asarray(Image.open(io.BytesIO(v1.content))), np.asarray(Image.open(io.BytesIO(v1_sdk.content))),
            np.frombuffer(v2.content[length:], np.uint8).reshape(image.shape[:2])]


def sdk_upload(image: np.ndarray):
    """What `SegLockClient.segment(image, "bench")` uploads for a decoded image of a cp model."""
    from seglock.client.sdk import _plain_upload

    return _plain_upload(image, lossless=True)


def v2_body(image: np.ndarray) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, *image.shape],
                                     "parameters": {"binary_data_size": image.nbytes}}],
                         "outputs": [{"name": "mask", "parameters": {"binary_data": True}}]}).encode()
    return header + image.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def requests_for(base: str, token: str, data: bytes, image: np.ndarray) -> dict[str, loadgen.Request]:
    """The /v1 (multipart: the PNG file; the SDK's upload of the decoded image) and /v2 (binary
    tensor) requests of the benchmark image, encoded once."""
    auth = {"Authorization": f"Bearer {token}"}
    body, content_type = loadgen.multipart({"image": ("x.png", data)})
    sdk = sdk_upload(image)
    sdk_body, sdk_type = loadgen.multipart({"image": (sdk.filename, sdk.content)})
    v2, headers = v2_body(image)
    return {"v1": loadgen.request("POST", f"{base}/v1/models/bench/segment", body=body,
                                  headers={**auth, "Content-Type": content_type}),
            "v1_sdk": loadgen.request("POST", f"{base}/v1/models/bench/segment", body=sdk_body,
                                      headers={**auth, "Content-Type": sdk_type}),
            "v2": loadgen.request("POST", f"{base}/v2/models/bench/infer", body=v2, headers={**auth, **headers})}


def http_window(measured: dict, label: str, req: loadgen.Request, server: subprocess.Popen, total: int) -> list[float]:
    """One window of `total` requests at concurrency 16: its throughput into `measured[label]`, with
    the server's CPU per request (`_cpu_ms`), the load generator's, which runs in this process on
    the same cores (`_client_cpu_ms`), and the share of the cores the two kept busy (`_busy`), all
    over the timed requests (not those that opened the connections); the latencies back."""
    before: list[float] = []
    result = load(req, 16, total, on_start=lambda: before.extend(
        (cpu_seconds(server), time.process_time(), time.perf_counter())))
    after = (cpu_seconds(server), time.process_time(), time.perf_counter())
    server_s, client_s, wall = (end - start for end, start in zip(after, before, strict=True))
    measured[label] = result.answered / result.elapsed_s
    measured[f"{label}_cpu_ms"] = server_s * 1000 / result.answered
    measured[f"{label}_client_cpu_ms"] = client_s * 1000 / result.answered
    measured[f"{label}_busy"] = (server_s + client_s) / (wall * busy_cores())
    return result.latencies_s


def busy_cores() -> int:
    """The cores this benchmark, its server and its raw forwards may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load(req: loadgen.Request, concurrency: int, total: int,
         on_start: Callable[[], None] | None = None) -> loadgen.Result:
    """`total` requests on `concurrency` connections (`on_start` as in `loadgen.drive`); any failure
    ends the run."""
    result = asyncio.run(loadgen.drive(req, concurrency, total, on_start=on_start))
    if result.failed:
        raise SystemExit(f"{result.failed} of {total} requests failed (statuses {result.statuses})")
    return result


def cpu_seconds(process: subprocess.Popen) -> float:
    """CPU time (user + system) of the server and its worker processes, so far."""
    import psutil

    total = 0.0
    root = psutil.Process(process.pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--amp", choices=["auto", "fp16", "bf16", "off"], default="auto",
                        help="the server's mixed precision on CUDA, and the raw forwards' (ignored on CPU)")
    parser.add_argument("--workers", type=int,
                        help="server processes, and raw-forward processes run at once (default: one per core "
                             "on CPU, one on an accelerator)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads of every process: server workers, raw forwards, this one "
                             "(default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of raw forwards and HTTP load")
    parser.add_argument("--requests", type=int, default=512,
                        help="timed requests per concurrency-16 window (the raw forwards are timed at a steady "
                             "state; a short window adds its closing drain, when fewer than 16 are in flight)")
    parser.add_argument("--repeats", type=int, default=3, help="timed raw forwards per backend per round")
    parser.add_argument("--compile-budget", type=float, default=900,
                        help="seconds torch.compile may take, here and in the server; 0 = no compile")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--server-log", help="write the server's output here (default: discarded)")
    parser.add_argument("--raw-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_worker:
        raw_worker(Path(args.work), args.max_batch, args.compile_budget, args.core, resolve_device(args.device),
                   args.amp)
        return 0

    device = resolve_device(args.device)
    if args.workers is None:
        args.workers = usable_cores() if device.type == "cpu" else 1  # one process owns the accelerator
    set_threads(args.threads)
    torch.manual_seed(0)
    plain = build_model(args.arch, 6).eval().to(device)
    tap = TAPS.get(args.arch, "layer4")
    protected = copy.deepcopy(plain)
    key = protect(protected, tap)
    get_tap(protected, tap)  # fails early on a bad tap

    batch = torch.randn(args.max_batch, 3, args.size, args.size, device=device)
    ratio_a = forward_ratio(plain, protected, tap, key, batch[:1], max(args.repeats, 9))  # batch 1: cheap
    del plain

    work = Path(tempfile.mkdtemp(prefix="seglock-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # its keystore, token and CP key go with it
    master = base64.b64encode(os.urandom(32)).decode()
    env = {**os.environ, "SEGLOCK_MASTER_KEY": master, **thread_environment(args.threads),
           "TORCHINDUCTOR_CACHE_DIR": str(work / "home" / "cache" / "compile")}  # the server reuses the kernels
    token = bench_home(work, protected.cpu(), key, tap, args.size, env)
    home = work / "home"
    (work / "cp.key.json").write_text(json.dumps(key.to_dict()))
    (work / "cp.key.json").chmod(0o600)
    del protected

    image, data = bench_image(args.size)
    np.save(work / "image.npy", image)
    load_before = os.getloadavg()
    print(f"building the raw forwards in {args.workers} process(es)"
          + (f" (torch.compile: up to {args.compile_budget:.0f} s)" if args.compile_budget > 0 else ""), flush=True)
    raw = RawForwards(work, env, args)
    eager_mask = np.load(work / "eager-mask.npy")
    port = free_port()
    server_log = open(args.server_log, "ab") if args.server_log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "seglock.app.cli", "serve", "--home", str(home), "--port", str(port), "--no-demo",
         "--device", str(device), "--max-batch", str(args.max_batch), "--max-wait-ms", "10",
         "--workers", str(args.workers), "--threads", str(args.threads),
         "--compile-budget", str(args.compile_budget), "--amp", args.amp,
         "--log-level", "info" if args.server_log else "warning"], env=env, stdout=server_log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    rounds: list[dict] = []
    try:
        for _ in range(3000):  # 10 minutes
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit("the server did not become ready in 10 minutes")
        print("server ready; waiting for its backends to settle", flush=True)
        backend, server_batches = wait_for_backend(base, token, args.compile_budget + 60, args.workers)
        # every raw forward at every batch size the server's workers choose among (`--tune-batch`:
        # 1, 2, 4, ... --max-batch), so the fastest raw forward is the fastest at any of them
        candidates = {(name if size == args.max_batch else f"{name}@{size}"): (name, size)
                      for name in raw.backends for size in batch_sizes(args.max_batch)}
        requests = requests_for(base, token, data, image)
        # the first request the server answers once ready: a model is warmed on the thread that
        # serves it as it loads, so this costs a forward, not a thread's first (1.4 s on a GPU)
        started = time.perf_counter()
        first = asyncio.run(loadgen.send_once(requests["v1"]))
        first_ms = (time.perf_counter() - started) * 1000
        if first.status != 200:
            raise SystemExit(f"the first request was answered {first.status}")
        load(requests["v1"], 16, 32)  # warm-up of every worker
        server_masks = asyncio.run(masks_over_http(base, token, data, image))
        lat1 = load(requests["v1"], 1, 16).latencies_s
        # interleaved rounds: drift in a shared machine's load falls on raw and HTTP alike
        for index in range(args.rounds):
            measured: dict[str, float] = {}
            for label, (name, size) in candidates.items():
                measured[label], measured[f"{label}_cpu_ms"] = raw.measure(name, args.repeats, size)
            latencies = http_window(measured, "http_v1", requests["v1"], server, args.requests)
            http_window(measured, "http_v1_sdk", requests["v1_sdk"], server, args.requests)
            http_window(measured, "http_v2", requests["v2"], server, args.requests)
            measured["c16_p50_ms"], measured["c16_p99_ms"] = percentile(latencies, 50), percentile(latencies, 99)
            rounds.append(measured)
            print(f"  round {index + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in measured.items()), flush=True)
    finally:
        server.terminate()
        server.wait(30)
        raw.close()
        if args.server_log:
            server_log.close()
    load_after = os.getloadavg()

    def median(name: str) -> float:
        return statistics.median(r[name] for r in rounds)

    exact = [label for label, (name, _) in candidates.items() if raw.backends[name]["exact"]]
    fastest = max(exact, key=median)
    eager = max((label for label, (name, _) in candidates.items() if name == "eager"), key=median)
    ratios = {"vs_eager": [r["http_v1"] / r["eager"] for r in rounds],
              "vs_best_eager": [r["http_v1"] / r[eager] for r in rounds],
              "vs_fastest": [r["http_v1"] / r[fastest] for r in rounds],
              "v2_vs_eager": [r["http_v2"] / r["eager"] for r in rounds],
              "v2_vs_fastest": [r["http_v2"] / r[fastest] for r in rounds],
              "v1_sdk_vs_fastest": [r["http_v1_sdk"] / r[fastest] for r in rounds],
              "cpu_vs_fastest": [r[f"{fastest}_cpu_ms"] / r["http_v1_cpu_ms"] for r in rounds]}
    results = {
        "arch": args.arch, "size": args.size, "device": str(device), "tap": tap, "max_batch": args.max_batch,
        "workers": args.workers, "threads": args.threads, "load_before": load_before, "load_after": load_after,
        "a_forward": ratio_a, "raw_backends": raw.backends, "server_backend": backend, "rounds": rounds,
        "b_throughput": {"http_images_per_s": median("http_v1"), "http_v2_images_per_s": median("http_v2"),
                         "http_v1_sdk_images_per_s": median("http_v1_sdk"),
                         "raw_images_per_s": {label: median(label) for label in candidates}, "fastest": fastest,
                         "eager": eager, "server_batches": server_batches,
                         "ratio": statistics.median(ratios["vs_eager"]),
                         "ratio_vs_best_eager": statistics.median(ratios["vs_best_eager"]),
                         "ratio_vs_fastest": statistics.median(ratios["vs_fastest"]),
                         "ratio_v2": statistics.median(ratios["v2_vs_eager"]),
                         "ratio_v2_vs_fastest": statistics.median(ratios["v2_vs_fastest"]),
                         "ratio_v1_sdk_vs_fastest": statistics.median(ratios["v1_sdk_vs_fastest"]),
                         "cpu_ms_per_image": {name: median(f"{name}_cpu_ms")
                                              for name in [*candidates, *WINDOWS]},
                         "cpu_efficiency_vs_fastest": statistics.median(ratios["cpu_vs_fastest"]),
                         "client_cpu_ms_per_request": {name: median(f"{name}_client_cpu_ms")
                                                       for name in WINDOWS},
                         "cores_busy": {name: median(f"{name}_busy") for name in WINDOWS},
                         "masks_identical_to_eager": all(np.array_equal(m, eager_mask) for m in server_masks)},
        "c_latency_ms": {"first": first_ms, "c1_p50": percentile(lat1, 50), "c1_p99": percentile(lat1, 99),
                         "c16_p50": median("c16_p50_ms"), "c16_p99": median("c16_p99_ms")},
    }
    print(f"seglock serve benchmark: {args.arch} {args.size}px on {device}, tap {tap}, max batch {args.max_batch}")
    print(f"every process: {args.threads} torch thread(s) (OMP_NUM_THREADS={args.threads}); {args.workers} server "
          f"worker(s) and as many raw-forward processes; load average before {load_before[0]:.2f} "
          f"after {load_after[0]:.2f} (1 min)")
    a = results["a_forward"]
    print(f"(a) forward, batch 1 (fastest of {a['rounds']} rounds): plain {a['plain_ms']:.2f} ms, "
          f"CP as served (folded) {a['cp_served_ms']:.2f} ms, CP with a gather {a['cp_gather_ms']:.2f} ms")
    print(f"    ratio served/plain = {a['ratio_served_vs_plain']:.3f} (target <= 1.02: "
          f"{'ok' if a['ratio_served_vs_plain'] <= 1.02 else 'MISSED'})")
    b = results["b_throughput"]
    for label, (name, size) in candidates.items():
        info = raw.backends[name]
        print(f"    raw forward, batch {size} x {args.workers} process(es): {name:<13} "
              f"{b['raw_images_per_s'][label]:6.1f} img/s, {b['cpu_ms_per_image'][label]:.1f} CPU ms/img "
              f"(medians of {args.rounds} rounds)"
              + ("" if info["exact"] else "  masks differ from eager")
              + (f", compiled in {info['compile_s']:.0f} s" if "compile_s" in info else ""))
    target_eager = 1.5 if device.type == "cpu" else 1.0
    print(f"(b) HTTP at concurrency 16 (server backend: {backend}; batches of at most "
          f"{' / '.join(map(str, server_batches))}): /v1 {b['http_images_per_s']:.1f} img/s (a PNG file), "
          f"{b['http_v1_sdk_images_per_s']:.1f} img/s (the SDK's upload of the decoded image: .npy), "
          f"/v2 {b['http_v2_images_per_s']:.1f} img/s (medians of {args.rounds} rounds)")
    print(f"    /v1 vs the raw eager forward at batch {args.max_batch}: median of per-round ratios = {b['ratio']:.3f} "
          f"(target >= {target_eager}: {'ok' if b['ratio'] >= target_eager else 'MISSED'}); /v2: {b['ratio_v2']:.3f}; "
          f"/v1 vs eager at its fastest batch ({eager}): {b['ratio_vs_best_eager']:.3f}")
    print(f"    /v1 vs fastest exact raw forward ({fastest}): median of per-round ratios = "
          f"{b['ratio_vs_fastest']:.3f} (target >= 0.9: {'ok' if b['ratio_vs_fastest'] >= 0.9 else 'MISSED'}); "
          f"/v1 with the SDK's .npy upload: {b['ratio_v1_sdk_vs_fastest']:.3f}; "
          f"/v2 (binary tensors, no PNG): {b['ratio_v2_vs_fastest']:.3f}")
    cpu = b["cpu_ms_per_image"]
    print(f"    CPU time per image (load-independent): raw {fastest} forward {cpu[fastest]:.1f} ms, server over "
          f"/v1 {cpu['http_v1']:.1f} ms (all its work: HTTP, PNG, auth, forward); raw/server = "
          f"{b['cpu_efficiency_vs_fastest']:.3f} (the throughput ratio on an otherwise idle machine, with the "
          f"client elsewhere); server over /v1 with .npy {cpu['http_v1_sdk']:.1f} ms, over /v2 {cpu['http_v2']:.1f} ms")
    client, busy = b["client_cpu_ms_per_request"], b["cores_busy"]
    print(f"    the load generator, on the same cores: {client['http_v1']:.2f} CPU ms per request over /v1, "
          f"{client['http_v1_sdk']:.2f} over /v1 with .npy, {client['http_v2']:.2f} over /v2; the cores busy "
          f"(server and client) {100 * busy['http_v1']:.0f} % of the /v1 windows, "
          f"{100 * busy['http_v1_sdk']:.0f} % of /v1 with .npy, {100 * busy['http_v2']:.0f} % of /v2's; the raw "
          f"{fastest} forward "
          f"{100 * b['raw_images_per_s'][fastest] * cpu[fastest] / 1000 / busy_cores():.0f} %")
    print(f"    server masks (/v1 PNG and .npy, /v2) identical to the eager forward: {b['masks_identical_to_eager']}")
    c = results["c_latency_ms"]
    print(f"(c) latency ms: concurrency 1 p50 {c['c1_p50']:.1f} p99 {c['c1_p99']:.1f}; "
          f"concurrency 16 p50 {c['c16_p50']:.1f} p99 {c['c16_p99']:.1f} (medians over rounds); the first request "
          f"once ready {c['first']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
