"""How a folded model's forward pass runs: the fastest exact way on this device, measured.

Backends (`--backend`, `SEGLOCK_BACKEND`):
    eager          the module as loaded (channels_last only on CUDA, as before)
    channels_last  weights and inputs in NHWC memory: oneDNN's fast path on CPU (1.67x on
                   lraspp_mobilenet_v3_large, masks identical)
    fused          channels_last, and every BatchNorm that follows a convolution folded into that
                   convolution's weights (one pass over the activations less per pair)
    script         fused, traced and frozen into one TorchScript graph: the whole forward is one C++
                   call that releases the GIL. An eager forward takes the GIL back between two ops
                   (hundreds per batch) and waits for it while the event loop parses requests: with
                   one Python thread busy beside it, a fused lraspp forward ran 9x slower, the
                   scripted one 1.2x. Weights are constants of the frozen graph: a rotation traces again
    compile        channels_last, then `torch.compile` (inductor) built on a background thread while
                   the channels_last module serves; swapped in between two batches once its masks on
                   a probe batch equal the eager ones
    auto           the fastest of eager, channels_last and fused on a probe batch among those whose
                   masks equal eager's (timed in interleaved rounds; by the thread's CPU time on a
                   one-thread CPU); then that module traced and frozen, taken if exact and within 15 %
                   of it (what the GIL costs the untraced module in a busy server is not seen on a
                   quiet probe); then the compiled module too, if it is faster still and exact
"Exact" means the argmax masks equal eager's on the probe batch, pixel for pixel (and, for script, on
one image of it: a trace must not have kept the probe's batch size). bf16/fp16 on CPU
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
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger("seglock.engine")

BACKENDS = ("auto", "eager", "channels_last", "fused", "script", "compile")
# auto takes the traced module unless the untraced one beats it on the probe by more than this: with
# 5 %, a probe timed while other servers started on the same cores once kept fused, which then waits
# for the GIL between ops in the busy server (docs/serving.md)
SCRIPT_PREFERENCE = 1.15
# on CPU a batch is capped at the largest size whose forward costs at most this much per image more
# than the cheapest size's: a larger batch whose activations leave the core's cache costs more per image
BATCH_TOLERANCE = 1.03
PROBE_SEED = 20261130


def set_threads(threads: int) -> None:
    """`threads` intra-op threads for this process from now on (0: leave torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def adopt_threads() -> None:
    """In a thread torch did not start: take the process's thread count. OpenMP keeps the count per
    thread, and a new thread starts with the cores' count until torch's first parallel call, which a
    oneDNN convolution does not make: two teams of that size on a shared machine stall each other."""
    torch.set_num_threads(torch.get_num_threads())


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


def batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes a CPU forward is timed at to choose its batch: 1, 2, 4, ... and `max_batch`."""
    return sorted({min(2 ** k, max_batch) for k in range(max_batch.bit_length() + 1)})


def to_channels_last(module: nn.Module) -> nn.Module:
    return module.to(memory_format=torch.channels_last)


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm2d that directly follows a Conv2d in a Sequential (torchvision's
    Conv2dNormActivation, LR-ASPP's head) into the convolution: y = (W*x + b - mean) * g / s + beta
    is one convolution with weights W * g / s. In place; the BatchNorm becomes an Identity."""
    for parent in list(module.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, norm = parent._modules[first], parent._modules[second]
            if (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and not conv.training
                    and not norm.training and norm.running_mean is not None
                    and conv.out_channels == norm.num_features):
                parent._modules[first] = fuse_conv_bn_eval(conv, norm)
                parent._modules[second] = nn.Identity()
    return module


def script_module(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """`module` traced on `example` and frozen (weights become constants, so the graph runs without
    touching Python). The caller checks its masks: a trace follows the example's path only."""
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.compile, whose Python wrapper takes the GIL per
        # kernel like eager does; tracing is still the one way to a GIL-free CPU forward with no compiler
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
        return torch.jit.freeze(traced)


def forward_clock(device: torch.device) -> Callable[[], float]:
    """What candidates are timed with. On CPU with one thread: the calling thread's CPU time, which
    a busy machine's preemption does not inflate (the forward runs entirely in that thread), so the
    choice made at load is the one an idle machine would make. Otherwise wall time."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def interleaved_seconds(runs: dict[str, Callable[[], object]], clock: Callable[[], float] = time.perf_counter,
                        rounds: int = 3) -> dict[str, float]:
    """Median time of each run over `rounds` rounds, each round timing every run once in turn, so
    drift in the machine's load falls on every candidate alike."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = clock()
            run()
            samples[name].append(clock() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


class CompileJob:
    """Compiles a copy of a module on a daemon thread; `on_ready(compiled)` runs if it is exact,
    within budget, and (given `rival`, which returns the module it would replace when it is ready)
    faster than that module: by `SCRIPT_PREFERENCE` if that is a frozen trace, whose forward needs no
    GIL while the compiled module's Python wrapper takes it per kernel."""

    def __init__(self, module: nn.Module, probe: torch.Tensor, reference: torch.Tensor,
                 run: Callable[[nn.Module, torch.Tensor], torch.Tensor], *, budget_s: float,
                 rival: Callable[[], nn.Module] | None, on_ready: Callable[[nn.Module, float], None],
                 name: str = "model"):
        self.name = name
        self.budget_s = budget_s
        self.state = "compiling"  # -> "ready" | "rejected" | "abandoned" | "failed"
        self.seconds: float | None = None
        self.done = threading.Event()
        self._module, self._probe, self._reference, self._run = module, probe, reference, run
        self._rival, self._on_ready = rival, on_ready
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
        adopt_threads()
        started = time.perf_counter()
        try:
            compiled = torch.compile(self._module)
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
            if self._rival is not None:
                rival = self._rival()
                times = interleaved_seconds({"compiled": lambda: self._run(compiled, probe),
                                             "served": lambda: self._run(rival, probe)},
                                            forward_clock(probe.device))
                margin = SCRIPT_PREFERENCE if isinstance(rival, torch.jit.ScriptModule) else 1.0
                if times["compiled"] * margin >= times["served"]:
                    log.info("model %s: compiled %.1f ms vs %.1f ms per probe batch for the module served; "
                             "not used", self.name, times["compiled"] * 1e3, times["served"] * 1e3)
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
