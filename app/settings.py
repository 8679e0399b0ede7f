"""Server settings: one pydantic-settings class, read from `SEGLOCK_*` environment variables.

`seglock serve` has one flag per field, made from it (`--max-batch` for `max_batch`, with the
field's type, default and description); flags override the environment, and `--workers N` passes
the settings to each worker through the same variables.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs' worth of time per period this process's cgroup may use (cgroup v2 `cpu.max`, or v1
    `cfs_quota_us` / `cfs_period_us`), or None where no quota is set: a container's CPU limit."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota, period = (int((root / "cpu" / name).read_text()) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The CPU cores this process may use: those of its affinity set where the OS has one, and no more
    than its cgroup's CPU quota, rounded up (a container limited to 2 CPUs on a 64-core host: 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def threads_per_worker(threads: int, workers: int, cores: int, environ: Mapping[str, str]) -> int:
    """The torch threads each of `workers` server processes gets: `threads` where set; for 0 (the
    default) with several workers, the cores shared among them (`cores // workers`, at least 1), so
    that N workers on N cores run a thread each rather than N teams of N threads on N cores (each
    team stalls at every barrier whenever another runs; `auto` pins a one-thread worker to a core of
    its own). 0, torch's own default of a thread per core, for one worker or where the operator set
    OMP_NUM_THREADS, which then rules."""
    if threads or workers < 2 or "OMP_NUM_THREADS" in environ:
        return threads
    return max(1, cores // workers)


def thread_environment(threads: int) -> dict[str, str]:
    """The variables that give every thread of a process started with them `threads` OpenMP threads
    (read once, when torch loads; {} for 0 = torch's default)."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} if threads > 0 else {}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEGLOCK_", extra="ignore")

    home: Path = Field(Path("seglock-home"), description="home folder (keystore.json, models/)")
    models_root: Path | None = Field(
        None, description="model artifacts on storage every replica reads (default HOME/models)")
    # None: the file keystore in the home (or SEGLOCK_KEYSTORE_URL_FILE, read by the keystore).
    keystore_url: SecretStr | None = Field(
        None, description="postgresql://... : a keystore shared by many hosts; prefer SEGLOCK_KEYSTORE_URL_FILE")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    workers: int = Field(1, ge=1, le=64, description="server processes (each loads every model)")
    threads: int = Field(0, ge=0, le=1024,
                         description="torch (OpenMP) threads per server process; 0 = the cores shared among the "
                                     "workers (one worker: one per core), unless OMP_NUM_THREADS is set")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    amp: Literal["auto", "fp16", "bf16", "off"] = Field("auto", description="mixed precision on CUDA")
    channels_last: bool = Field(True, description="channels-last memory layout on CUDA")
    backend: Literal["auto", "eager", "channels_last", "fused", "script", "compile"] = Field(
        "auto", description="how the forward pass runs; auto = the fastest exact one, measured at load")
    pin_forward: Literal["auto", "on", "off"] = Field(
        "auto", description="each worker's forward thread on a core of its own (the whole worker, with a worker "
                            "per core); auto = on CPU with one thread per worker, a worker per core and no CPU quota")
    compile_budget_s: float = Field(300.0, ge=0, description="seconds a background torch.compile may take; 0 = never")
    compile_cache: str = Field("", description="inductor's kernel cache folder; empty = HOME/cache/compile")
    max_batch: int = Field(8, ge=1, le=1024, description="largest batch per forward pass")
    tune_batch: bool = Field(True, description="on CPU, batch each model at most at the size its forward costs "
                                               "least per image, measured at load (up to max_batch)")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000,
                              description="most milliseconds a batch waits for requests still being decoded")
    queue_size: int = Field(64, ge=1, le=100_000, description="requests queued per model before 503")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="largest image upload in bytes (413 above)")
    max_json_body_bytes: int = Field(64 * 1024, ge=1024, description="largest body on every other route")
    max_pixels: int = Field(16_000_000, ge=1,
                            description="decode budget in 8-bit RGB pixels; 16-bit and alpha count double")
    max_json_mask_pixels: int = Field(
        1_048_576, ge=1, description="larger masks are answered as PNG (or /v2 binary tensors) only")
    max_json_tensor_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="largest JSON part of a /v2 infer request; send binary tensors above")
    decode_concurrency: int = Field(4, ge=1, le=1024, description="uploads read and decoded at once per worker")
    decode_queue: int = Field(64, ge=0, description="uploads waiting for a decode slot before 503")
    audit_window_s: float = Field(3600.0, ge=0, description="a key release is audited once per token, model and window")
    keystore_lock_timeout_s: float = Field(10.0, gt=0, le=300,
                                           description="seconds a keystore write waits for its lock")
    initial_token_ttl_s: float = Field(86_400.0, gt=0, description="lifetime of the first start's tokens")
    metrics_public: bool = Field(False, description="serve /metrics to anyone; else to admin tokens only")
    rate_limit_rps: float = Field(0.0, ge=0, description="segment requests per second per token; 0 = no limit")
    rate_limit_burst: int = Field(20, ge=1, description="requests a token may make at once before the limit applies")
    import_demo: bool = Field(True, description="import the bundled demo models into an empty home")
    warmup: bool = Field(True, description="run each model once before answering ready")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @field_validator("device")
    @classmethod
    def _device_spec(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")
