"""Inference engine: one dynamic batcher per model, on one device.

Requests are preprocessed off the event loop into CHW float tensors of the model's input
size; a worker thread per model gathers up to `max_batch` of them (waiting at most
`max_wait_ms` after the first), runs one forward pass under `torch.inference_mode()` and
hands each request its class-index mask. The queue is bounded: a full queue is an
`Overloaded` error at once, so a burst never grows memory or latency without bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from seglock.app import affinity, backends

log = logging.getLogger("seglock.engine")


class Overloaded(Exception):
    """The model's queue is full; the client should retry after a short wait."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new work."""


def autocast_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only where it pays: on CUDA, bf16 if supported, else fp16."""
    if device.type != "cuda" or spec == "off":
        return None
    if spec == "fp16":
        return torch.float16
    if spec == "bf16" or (spec == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


@dataclass
class BatchStats:
    """Counters the metrics endpoint reads; updated only by the worker thread."""

    batches: int = 0
    items: int = 0
    last_batch_size: int = 0
    inference_seconds: float = 0.0


@dataclass
class _Job:
    tensor: torch.Tensor
    future: asyncio.Future | concurrent.futures.Future
    loop: asyncio.AbstractEventLoop | None  # None: a thread waits on a concurrent future (`run_sync`)
    score: bool = False  # also answer the softmax probability of each pixel's class


_STOP = object()
ARRIVAL_POLL_S = 0.002  # how often a collecting batch looks whether requests are still arriving


class ModelRunner:
    """The forward pass of one model on one device, with its serving options.

    `backend` (see `app/backends.py`) picks how the module runs; with `probe` (an NCHW batch of the
    model's input size) `auto` measures its candidates and `compile` checks the compiled module's
    masks against eager before it serves.
    """

    def __init__(self, module: nn.Module, device: torch.device, *, amp: str = "auto",
                 channels_last: bool = True, backend: str = "eager", probe: torch.Tensor | None = None,
                 compile_budget_s: float = 0.0, name: str = "model", pad_batches: bool | None = None):
        if backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(backends.BACKENDS)}, not {backend!r}")
        if backend == "script" and probe is None:
            raise ValueError("the script backend traces the model on a probe batch: give one")
        self.device = device
        self.name = name
        self.dtype = autocast_dtype(amp, device)
        self.requested_backend = backend
        self.compile_job: backends.CompileJob | None = None
        self._lock = threading.Lock()  # held for one forward pass; swaps happen between batches
        self._pending: dict[str, torch.Tensor] | None = None
        self.channels_last = (channels_last and device.type == "cuda") if backend == "eager" else backend != "eager"
        self.fold_norms = backend in ("fused", "script")
        self._probe = None if probe is None else probe.to(device)
        # On an accelerator (`pad_batches` None) every batch is padded to the probe's size, the one
        # shape the module was checked, timed and warmed at: a smaller batch costs a GPU about as much
        # (a scripted 256 px lraspp on an H200: 2.5 ms at batch 1, 3.0 at 8), while each new shape
        # made TorchScript's profiling executor specialise the graph again in a live server.
        pad = device.type != "cpu" if pad_batches is None else pad_batches
        self.pad_to = len(self._probe) if pad and self._probe is not None else 0
        measured = backend in ("auto", "compile", "script") and self._probe is not None
        pristine = copy.deepcopy(module).eval().to(device) if measured else None  # eager, contiguous
        self.layout_module = self.prepare(module)  # the nn.Module in this runner's layout
        self.module: nn.Module = self.layout_module  # what runs: it, its frozen trace, or its compiled copy
        self.backend = self._layout()
        if measured:
            references = self._references(pristine)
            if backend == "auto":
                self._pick_layout(pristine, references)
            elif backend == "script":
                self._use_script(self._script(self.layout_module, references))
            if compile_budget_s > 0 and backend != "script":
                self.compile_job = backends.CompileJob(
                    backends.compile_copy(self.layout_module), self._probe, references[0], self._run,
                    budget_s=compile_budget_s, rival=(lambda: self.module) if backend == "auto" else None,
                    on_ready=self._install_compiled, name=name).start()

    @property
    def scripted(self) -> bool:
        """Serving the frozen trace of `layout_module` (a swap traces the new module too)."""
        return isinstance(self.module, torch.jit.ScriptModule)

    def _layout(self) -> str:
        if self.scripted:
            return "script"
        return "fused" if self.fold_norms else "channels_last" if self.channels_last else "eager"

    def prepare(self, module: nn.Module) -> nn.Module:
        module = module.eval().to(self.device)
        if self.fold_norms:
            module = backends.fold_batch_norms(module)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        return module

    def _references(self, eager: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager masks of the probe batch and of its first image alone (a trace may keep a batch size)."""
        return self._eager_masks(eager, self._probe), self._eager_masks(eager, self._probe[:1].clone())

    def _script(self, module: nn.Module, references: tuple[torch.Tensor, torch.Tensor]) -> nn.Module | None:
        """The frozen trace of `module` (in this runner's layout) if its masks equal the eager ones
        (`_references`) on the probe and on its first image alone; None otherwise."""
        probe = self._probe.contiguous(memory_format=torch.channels_last) if self.channels_last else self._probe
        try:
            scripted = backends.script_module(module, probe)
            exact = (torch.equal(self._run(scripted, self._probe), references[0])
                     and torch.equal(self._run(scripted, self._probe[:1].clone()), references[1]))
        except Exception as exc:  # noqa: BLE001 - an untraceable model is served as it is
            log.warning("model %s: cannot be traced (%s); served as a module", self.name, exc)
            return None
        if not exact:
            log.warning("model %s: the traced graph's masks differ from eager on the probe; not used", self.name)
            return None
        return scripted

    def _use_script(self, scripted: nn.Module | None) -> None:
        self.module = scripted if scripted is not None else self.layout_module
        self.backend = self._layout()

    def _eager_masks(self, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """The masks every faster backend must reproduce: the module as trained, contiguous memory."""
        with torch.inference_mode():
            if self.dtype is not None:
                with torch.autocast(self.device.type, dtype=self.dtype):
                    return module(batch.contiguous()).argmax(dim=1)
            return module(batch.contiguous()).argmax(dim=1)

    def _run(self, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Argmax masks of `batch` through `module` with this runner's layout and precision."""
        with torch.inference_mode():
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            if self.dtype is not None:
                with torch.autocast(self.device.type, dtype=self.dtype):
                    return module(batch).argmax(dim=1)
            return module(batch).argmax(dim=1)

    def _pick_layout(self, eager: nn.Module, references: tuple[torch.Tensor, torch.Tensor]) -> None:
        """auto: the fastest of eager, channels_last and fused (channels_last with the BatchNorms
        folded) on the probe, among those whose masks equal eager's, timed in interleaved rounds;
        then that module traced and frozen (script), taken if exact and within `SCRIPT_PREFERENCE`
        of it: a quiet probe does not see what the GIL costs a module in a busy server."""
        if not self.channels_last:
            return
        self.fold_norms = True
        fused = self.prepare(copy.deepcopy(eager))
        self.fold_norms = False
        modules = {"channels_last": self.layout_module, "fused": fused}
        exact = {"eager": True, **{name: torch.equal(self._run(module, self._probe), references[0])
                                   for name, module in modules.items()}}
        runs = {"eager": lambda: self._eager_masks(eager, self._probe),
                **{name: (lambda m=module: self._run(m, self._probe)) for name, module in modules.items()}}
        clock = backends.forward_clock(self.device)
        times = backends.interleaved_seconds(runs, clock)
        best = min((name for name in runs if exact[name]), key=times.__getitem__)
        if best == "eager":
            self.channels_last = False
            self.layout_module = self.prepare(copy.deepcopy(eager))
        else:
            self.fold_norms = best == "fused"
            self.layout_module = modules[best]
        scripted = self._script(self.layout_module, references)
        chosen = best
        if scripted is not None:
            layout = self.layout_module
            for _ in range(2):  # not timed: TorchScript's first runs on a shape profile and optimise,
                self._run(scripted, self._probe)  # and a fresh copy's first runs fault its memory in
                self._run(layout, self._probe)
            duel = backends.interleaved_seconds({"script": lambda: self._run(scripted, self._probe),
                                                 best: lambda: self._run(layout, self._probe)}, clock, rounds=5)
            if duel["script"] <= backends.SCRIPT_PREFERENCE * duel[best]:
                chosen = f"script of {best}"
            log.info("model %s: script of %s %.1f ms vs %.1f ms per probe batch, timed again after the first "
                     "choice", self.name, best, duel["script"] * 1e3, duel[best] * 1e3)
        self._use_script(scripted if chosen != best else None)
        log.info("model %s: %s (per probe batch: %s)", self.name, chosen,
                 ", ".join(f"{name} {seconds * 1e3:.1f} ms" + ("" if exact[name] else " (changed a mask)")
                           for name, seconds in times.items()))

    def _install_compiled(self, compiled: nn.Module, seconds: float) -> None:
        with self._lock:
            self._apply_pending()
            try:  # the weights may have been rotated while it compiled
                compiled._orig_mod.load_state_dict(self.layout_module.state_dict())
            except RuntimeError:  # the module was replaced by another architecture meanwhile
                log.info("model %s: the compiled module no longer fits the served one; dropped", self.name)
                return
            self.module, self.backend = compiled, "compile"
        log.info("model %s: serving the compiled module (compiled in %.1f s)", self.name, seconds)

    def swap(self, module: nn.Module) -> None:
        """Replace the weights between two batches: a batch already running finishes on the old ones.
        A compiled module and a module of the same architecture (a key rotation): the new weights are
        copied into the compiled one, which stays compiled. A scripted runner traces the new module
        (its weights are constants of the graph). Otherwise the new module replaces it."""
        module = module.eval().to(self.device)
        references = self._references(module) if self.scripted else None  # before the folding
        prepared = self.prepare(module)  # BatchNorms folded as the served module's are
        compiled = getattr(self.module, "_orig_mod", None)
        if compiled is not None and _same_architecture(compiled, prepared):
            state = {k: v.detach() for k, v in prepared.state_dict().items()}
            with self._lock:
                self._pending = state
                self.layout_module = prepared
            return
        running = self._script(prepared, references) if references is not None else None
        with self._lock:
            self._pending = None
            self.layout_module = prepared
            self._use_script(running)

    def _apply_pending(self) -> None:
        """Under `_lock`: copy rotated weights into the serving module."""
        if self._pending is None:
            return
        with torch.no_grad():
            self.module._orig_mod.load_state_dict(self._pending)
        self._pending = None

    def cheapest_batch(self, max_batch: int) -> tuple[int, dict[int, float]]:
        """(the batch to serve with, the seconds per image of each size timed). On CPU: the largest
        of 1, 2, 4, ... and `max_batch` whose forward costs at most `BATCH_TOLERANCE` times the
        cheapest size per image, timed on the probe in interleaved rounds: on a core of its own a
        256 px lraspp_mobilenet_v3_large costs 13-20 % more per image at batch 8 than at 2-4, its
        activations leaving the cache. Elsewhere (an accelerator) and without a probe: `max_batch`."""
        if self.device.type != "cpu" or self._probe is None or max_batch < 2:
            return max_batch, {}
        sizes = backends.batch_sizes(min(max_batch, len(self._probe)))
        runs = {size: functools.partial(self._run, self.module, self._probe[:size].clone()) for size in sizes}
        for run in runs.values():  # a frozen trace optimises on its first runs of a shape
            run()
            run()
        seconds = backends.interleaved_seconds(runs, backends.forward_clock(self.device))
        per_image = {size: seconds[size] / size for size in sizes}
        cheapest = min(per_image.values())
        chosen = max(size for size in sizes if per_image[size] <= backends.BATCH_TOLERANCE * cheapest)
        log.info("model %s: batches of at most %d (per image: %s)", self.name, chosen,
                 ", ".join(f"batch {size} {value * 1e3:.1f} ms" for size, value in per_image.items()))
        return chosen, per_image

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> np.ndarray:
        return self.predict_scored(batch, score=False)[0]

    @torch.inference_mode()
    def predict_scored(self, batch: torch.Tensor, *, score: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(N×H×W uint8 class indices, and with `score` the N×H×W float32 softmax probability of
        each pixel's class). The mask is the argmax of the logits whether or not scores are asked
        for, so asking for them never changes a mask. A batch smaller than `pad_to` runs padded with
        zero images, whose answers are dropped."""
        count = len(batch)
        if count < self.pad_to:
            batch = torch.cat([batch, batch.new_zeros((self.pad_to - count, *batch.shape[1:]))])
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._lock:  # one module and one set of weights per batch
            self._apply_pending()
            if self.dtype is not None:
                with torch.autocast(self.device.type, dtype=self.dtype):
                    logits = self.module(batch)
            else:
                logits = self.module(batch)
        logits = logits[:count]
        mask = logits.argmax(dim=1)
        scores = None
        if score:
            probabilities = logits.float().softmax(dim=1)
            scores = probabilities.gather(1, mask[:, None])[:, 0].cpu().numpy()
        return mask.to(torch.uint8).cpu().numpy(), scores


def _same_architecture(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return (type(a) is type(b) and sa.keys() == sb.keys()
            and all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype for k in sa))


class Arrival:
    """A request on its way to the batcher (its upload being read and decoded): a batch being
    collected waits for it. Closed when its job is queued, or when the request fails first."""

    def __init__(self, batcher: DynamicBatcher):
        self._batcher = batcher
        self._open = True
        batcher._arriving += 1

    def close(self) -> None:
        if self._open:
            self._open = False
            self._batcher._arriving -= 1


class DynamicBatcher:
    """Groups concurrent requests for one model into batches run on a worker thread.

    A batch takes every request already queued and then waits (at most `max_wait_ms` after its first)
    only while requests are arriving (`arriving()`: already in the server, being decoded). It never
    waits for requests that may come: under a steady load the forward pass would stand idle for
    them (at concurrency 16 on 2 CPU cores a fixed 10 ms wait cost a fifth of the throughput).
    """

    def __init__(self, runner: ModelRunner, *, name: str, max_batch: int = 8,
                 max_wait_ms: float = 5.0, queue_size: int = 64,
                 on_batch: Callable[[str, int, float], None] | None = None, core: int | None = None):
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be >= 1 and max_wait_ms >= 0")
        self.runner = runner
        self.name = name
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._on_batch = on_batch
        self._core = core  # the worker thread runs on this core only (`seglock.app.affinity`)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._arriving = 0  # open Arrivals; changed on the event loop, read by the worker thread
        self._accepting = True
        # taken to queue a job and to stop accepting: no job lands behind the stop marker, unanswered
        self._intake = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"seglock-batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @contextlib.contextmanager
    def arriving(self):
        """Around a request's way in (reading, decoding): batches being collected wait for it. Pass
        the Arrival to `submit`, which closes it once the job is queued; leaving closes it anyway."""
        arrival = Arrival(self)
        try:
            yield arrival
        finally:
            arrival.close()

    async def submit(self, tensor: torch.Tensor, arrival: Arrival | None = None) -> np.ndarray:
        """Queue one CHW tensor; returns its H×W uint8 class-index mask."""
        return (await self.submit_scored(tensor, score=False, arrival=arrival))[0]

    async def submit_scored(self, tensor: torch.Tensor, *, score: bool,
                            arrival: Arrival | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Queue one CHW tensor; returns (H×W uint8 mask, H×W float32 class probability or None)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._enqueue(_Job(tensor, future, loop, score))
        if arrival is not None:
            arrival.close()  # after the put: the worker never sees it neither arriving nor queued
        return await future

    def run_sync(self, tensors: list[torch.Tensor]) -> np.ndarray:
        """The masks of CHW tensors, from a thread without an event loop (warm-up, tests): queued and
        run on the worker thread like any request, so a warm-up warms the thread that serves. On a
        GPU a thread's first forward is slow: 1.3-1.6 s for each new thread on an H200, whatever the
        backend, 4-12 ms after it."""
        futures = []
        for tensor in tensors:
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._enqueue(_Job(tensor, future, None))
            futures.append(future)
        return np.stack([future.result()[0] for future in futures])

    def _enqueue(self, job: _Job) -> None:
        with self._intake:
            if not self._accepting:
                raise EngineStopped(f"model {self.name} is shutting down")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise Overloaded(f"model {self.name} has {self._queue.maxsize} requests queued") from None

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking work, finish what is queued, and stop the worker."""
        with self._intake:
            if not self._accepting:
                return
            self._accepting = False
        self._queue.put(_STOP)  # behind every job accepted; blocks while the queue is full
        self._thread.join(timeout)

    def _collect(self) -> tuple[list[_Job], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        jobs = [first]
        deadline = time.monotonic() + self.max_wait
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                if self._arriving > 0 and remaining > 0:
                    job = self._queue.get(timeout=min(remaining, ARRIVAL_POLL_S))
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                if self._arriving > 0 and deadline > time.monotonic():
                    continue  # still decoding: look again
                break
            if job is _STOP:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _run(self) -> None:
        backends.adopt_threads()
        if self._core is not None:
            affinity.pin_this_thread(self._core)
        stopping = False
        while not stopping:
            jobs, stopping = self._collect()
            jobs = [job for job in jobs if not job.future.cancelled()]
            if not jobs:
                continue
            started = time.perf_counter()
            try:
                masks, scores = self.runner.predict_scored(torch.stack([job.tensor for job in jobs]),
                                                           score=any(job.score for job in jobs))
            except Exception as exc:  # a failed batch fails its requests, never the worker
                log.exception("inference failed for model %s", self.name)
                for job in jobs:
                    _resolve(job, exception=exc)
                continue
            elapsed = time.perf_counter() - started
            self._record(len(jobs), elapsed, served=any(job.loop is not None for job in jobs))
            for index, job in enumerate(jobs):
                score = scores[index] if job.score else None
                _resolve(job, result=(masks[index], score))
        # nothing is queued behind the stop marker: `_intake` refuses jobs once it is on its way

    def _record(self, size: int, elapsed: float, *, served: bool) -> None:
        """Every batch counts in `stats`; only those with a request in them (not a warm-up's) reach
        `on_batch`, the served metrics."""
        self.stats.batches += 1
        self.stats.items += size
        self.stats.last_batch_size = size
        self.stats.inference_seconds += elapsed
        if served and self._on_batch is not None:
            with contextlib.suppress(Exception):
                self._on_batch(self.name, size, elapsed)


def _resolve(job: _Job, *, result=None, exception: BaseException | None = None) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if exception is not None:
            job.future.set_exception(exception)
        else:
            job.future.set_result(result)

    if job.loop is None:  # a concurrent future: settled from this thread
        settle()
        return
    with contextlib.suppress(RuntimeError):  # the loop may already be closed at shutdown
        job.loop.call_soon_threadsafe(settle)
