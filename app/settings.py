"""Server settings: one pydantic-settings class, read from `SEGLOCK_*` environment variables.

Command-line flags of `seglock serve` override the environment; `--workers N` passes the
settings to each worker through the same variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEGLOCK_", extra="ignore")

    home: Path = Field(Path("seglock-home"), description="folder with keystore.json and models/")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    amp: Literal["auto", "fp16", "bf16", "off"] = "auto"
    channels_last: bool = True
    max_batch: int = Field(8, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    queue_size: int = Field(64, ge=1, le=100_000)
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1)
    metrics_public: bool = True
    rate_limit_rps: float = Field(0.0, ge=0, description="segment requests per second per token; 0 = no limit")
    rate_limit_burst: int = Field(20, ge=1, description="requests a token may make at once before the limit applies")
    import_demo: bool = Field(True, description="import the bundled demo models into an empty home")
    warmup: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("device")
    @classmethod
    def _device_spec(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")
