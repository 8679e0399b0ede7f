"""How a folded model's forward pass runs: the fastest exact way on this device, measured.

Backends (`--backend`, `SEGLOCK_BACKEND`):
    eager          the module as loaded (channels_last only on CUDA, as before)
    channels_last  weights and inputs in NHWC memory: oneDNN's fast path on CPU (1.67x on
                   lraspp_mobilenet_v3_large, masks identical)
    compile        channels_last, then `torch.compile` (inductor) built on a background thread while
                   the channels_last module serves; swapped in between two batches once its masks on
                   a probe batch equal the eager ones
    auto           channels_last or eager, whichever is faster on a probe batch with masks identical to
                   eager; then the compiled module too, if it is faster still and exact
"Exact" means the argmax masks equal eager's on the probe batch, pixel for pixel. bf16/fp16 on CPU
are not candidates: they change masks (see docs/serving.md).

Compiling is bounded: after `compile_budget_s` the attempt is abandoned (the thread cannot be
killed, so a compile still running finishes and its result is dropped). Inductor's cache
(`TORCHINDUCTOR_CACHE_DIR`, set to HOME/cache/compile by the server) keeps the generated kernels, so
a restart pays only the trace, not the code generation. The compiled module reads its weights as
inputs (no freezing), so a key rotation copies the new folded weights into it between two batches
and never compiles again.
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("seglock.engine")

BACKENDS = ("auto", "eager", "channels_last", "compile")
PROBE_SEED = 20261130


def use_compile_cache(folder: Path) -> None:
    """Point inductor's on-disk cache at `folder` unless the operator set one already."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def probe_batch(input_size: tuple[int, int], batch: int) -> torch.Tensor:
    """A fixed, normalised-looking NCHW batch to compare backends on (same every start)."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    height, width = input_size
    return torch.randn((batch, 3, height, width), generator=generator)


def to_channels_last(module: nn.Module) -> nn.Module:
    return module.to(memory_format=torch.channels_last)


def median_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


class CompileJob:
    """Compiles a copy of a module on a daemon thread; `on_ready(compiled)` runs if it is exact,
    within budget, and (when `must_be_faster`) faster than the module it would replace."""

    def __init__(self, module: nn.Module, probe: torch.Tensor, reference: torch.Tensor,
                 run: Callable[[nn.Module, torch.Tensor], torch.Tensor], *, budget_s: float,
                 must_be_faster: bool, on_ready: Callable[[nn.Module, float], None], name: str = "model"):
        self.name = name
        self.budget_s = budget_s
        self.state = "compiling"  # -> "ready" | "rejected" | "abandoned" | "failed"
        self.seconds: float | None = None
        self.done = threading.Event()
        self._module, self._probe, self._reference, self._run = module, probe, reference, run
        self._must_be_faster, self._on_ready = must_be_faster, on_ready
        self._lock = threading.Lock()
        self._timer = threading.Timer(budget_s, self._abandon)
        self._timer.daemon = True
        self._thread = threading.Thread(target=self._compile, name=f"seglock-compile-{name}", daemon=True)

    def start(self) -> CompileJob:
        self._timer.start()
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> str:
        self.done.wait(timeout)
        return self.state

    def _abandon(self) -> None:
        with self._lock:
            if self.state == "compiling":
                self.state = "abandoned"
                log.warning("model %s: torch.compile overran its %.0f s budget; serving without it",
                            self.name, self.budget_s)
                self.done.set()

    def _finish(self, state: str, compiled: nn.Module | None = None) -> None:
        with self._lock:
            if self.state != "compiling":
                return  # abandoned meanwhile: the result is dropped
            self._timer.cancel()
            if state == "ready":
                self._on_ready(compiled, self.seconds)
            self.state = state
            self.done.set()

    def _compile(self) -> None:
        started = time.perf_counter()
        try:
            eager = self._module
            compiled = torch.compile(eager)
            probe = self._probe.clone()
            if probe.shape[0] > 1:
                torch._dynamo.mark_dynamic(probe, 0)  # one graph for every batch size 2..max_batch
            exact = (torch.equal(self._run(compiled, probe), self._reference)
                     and torch.equal(self._run(compiled, probe[:1].clone()), self._reference[:1]))
            self.seconds = time.perf_counter() - started
            if not exact:
                log.warning("model %s: the compiled module's masks differ from eager on the probe; not used",
                            self.name)
                return self._finish("rejected")
            if self._must_be_faster:
                t_compiled = median_seconds(lambda: self._run(compiled, probe))
                t_eager = median_seconds(lambda: self._run(eager, probe))
                if t_compiled >= t_eager:
                    log.info("model %s: compiled %.1f ms vs %.1f ms per probe batch; not faster, not used",
                             self.name, t_compiled * 1e3, t_eager * 1e3)
                    return self._finish("rejected")
            self._finish("ready", compiled)
        except Exception as exc:  # noqa: BLE001 - no C++ compiler, an unsupported op...: serving goes on
            self.seconds = time.perf_counter() - started
            log.warning("model %s: torch.compile failed (%s); serving without it", self.name, exc)
            self._finish("failed")


def compile_copy(module: nn.Module) -> nn.Module:
    """A private copy to compile, so the serving module is never touched by the compile thread."""
    clone = copy.deepcopy(module)
    for parameter in clone.parameters():
        parameter.requires_grad_(False)
    return clone
