"""Inference engine: one dynamic batcher per model, on one device.

Requests are preprocessed off the event loop into CHW float tensors of the model's input
size; a worker thread per model gathers up to `max_batch` of them (waiting at most
`max_wait_ms` after the first), runs one forward pass under `torch.inference_mode()` and
hands each request its class-index mask. The queue is bounded: a full queue is an
`Overloaded` error at once, so a burst never grows memory or latency without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

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
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


_STOP = object()


class ModelRunner:
    """The forward pass of one model on one device, with its serving options."""

    def __init__(self, module: nn.Module, device: torch.device, *, amp: str = "auto",
                 channels_last: bool = True):
        self.device = device
        self.dtype = autocast_dtype(amp, device)
        self.channels_last = channels_last and device.type == "cuda"
        self.module = self.prepare(module)

    def prepare(self, module: nn.Module) -> nn.Module:
        module = module.eval().to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        return module

    def swap(self, module: nn.Module) -> None:
        """Replace the weights; a batch already running finishes on the old module."""
        self.module = self.prepare(module)

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> np.ndarray:
        module = self.module  # one module per batch: a swap never mixes weights within it
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self.dtype is not None:
            with torch.autocast(self.device.type, dtype=self.dtype):
                logits = module(batch)
        else:
            logits = module(batch)
        return logits.argmax(dim=1).to(torch.uint8).cpu().numpy()


class DynamicBatcher:
    """Groups concurrent requests for one model into batches run on a worker thread."""

    def __init__(self, runner: ModelRunner, *, name: str, max_batch: int = 8,
                 max_wait_ms: float = 5.0, queue_size: int = 64,
                 on_batch: Callable[[str, int, float], None] | None = None):
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be >= 1 and max_wait_ms >= 0")
        self.runner = runner
        self.name = name
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._on_batch = on_batch
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name=f"seglock-batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def submit(self, tensor: torch.Tensor) -> np.ndarray:
        """Queue one CHW tensor; returns its H×W uint8 class-index mask."""
        if not self._accepting:
            raise EngineStopped(f"model {self.name} is shutting down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            self._queue.put_nowait(_Job(tensor, future, loop))
        except queue.Full:
            raise Overloaded(f"model {self.name} has {self._queue.maxsize} requests queued") from None
        return await future

    def run_sync(self, tensors: list[torch.Tensor]) -> np.ndarray:
        """A forward pass outside the queue (warm-up, benchmarks)."""
        return self.runner.predict(torch.stack(tensors))

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking work, finish what is queued, and stop the worker."""
        if not self._accepting:
            return
        self._accepting = False
        self._queue.put(_STOP)
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
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            jobs, stopping = self._collect()
            jobs = [job for job in jobs if not job.future.cancelled()]
            if not jobs:
                continue
            started = time.perf_counter()
            try:
                masks = self.runner.predict(torch.stack([job.tensor for job in jobs]))
            except Exception as exc:  # a failed batch fails its requests, never the worker
                log.exception("inference failed for model %s", self.name)
                for job in jobs:
                    _resolve(job, exception=exc)
                continue
            elapsed = time.perf_counter() - started
            self._record(len(jobs), elapsed)
            for job, mask in zip(jobs, masks):
                _resolve(job, result=mask)
        # drain anything that raced past the stop marker
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                _resolve(job, exception=EngineStopped(f"model {self.name} is shutting down"))

    def _record(self, size: int, elapsed: float) -> None:
        self.stats.batches += 1
        self.stats.items += size
        self.stats.last_batch_size = size
        self.stats.inference_seconds += elapsed
        if self._on_batch is not None:
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

    with contextlib.suppress(RuntimeError):  # the loop may already be closed at shutdown
        job.loop.call_soon_threadsafe(settle)
