"""Small real models and homes for the server tests: tiny CNNs saved as real artifacts."""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from seglock.client.transforms import BlockKey
from seglock.keystore import Keystore
from seglock.models import build_model, protect, save_artifact

INPUT = 32
CLASSES = ["background", "disc", "square"]
MASTER_KEY = base64.b64encode(bytes(range(32))).decode()


def _trained_looking(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with non-trivial BatchNorm statistics, so masks vary with the input."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)
    return model.eval()


def make_artifacts(root: Path) -> dict[str, tuple[Path, object]]:
    """{name: (artifact dir, key or None)} for a plain, a CP, an SHF and a per-image model."""
    torch.manual_seed(0)
    out = {}
    common = dict(class_names=CLASSES, input_size=[INPUT, INPUT])
    plain = _trained_looking(build_model("tiny", 3, width=8), 1)
    out["plain"] = (root / "plain", None)
    save_artifact(plain, root / "plain", name="plain", **common)

    cp = copy.deepcopy(plain)  # the plain model, protected post hoc
    cp_key = protect(cp, "dec2")
    save_artifact(cp, root / "cp", name="cp", protection={"mode": "cp", "tap": "dec2"},
                  key={"id": "kbundled", "version": 1}, **common)
    out["cp"] = (root / "cp", cp_key)

    shf = _trained_looking(build_model("tiny", 3, width=8), 2)
    shf_key = BlockKey.generate("shf", block_size=4)
    save_artifact(shf, root / "shf", name="shf", protection={"mode": "shf", "block_size": 4},
                  key={"id": "kbundled", "version": 1}, **common)
    out["shf"] = (root / "shf", shf_key)

    per_image = _trained_looking(build_model("tiny", 3, width=8), 3)
    save_artifact(per_image, root / "per-image", name="per-image",
                  protection={"mode": "per-image", "block_size": 16, "sub_block": 4}, **common)
    out["per-image"] = (root / "per-image", None)
    return out


def scene(seed: int = 0, height: int = 48, width: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def open_keystore(home: Path) -> Keystore:
    return Keystore.open(home, create=True, env={"SEGLOCK_MASTER_KEY": MASTER_KEY})


def imported_home(root: Path, artifacts: dict[str, tuple[Path, object]]) -> tuple[Path, Keystore]:
    """ROOT/home with every artifact of `make_artifacts` imported (and its key stored)."""
    from seglock.app.home import Home

    home = root / "home"
    keystore = open_keystore(home)
    for path, key in artifacts.values():
        Home(home, keystore).import_artifact(path, key=key)
    return home, keystore


@contextlib.contextmanager
def in_process_servers(home: Path):
    """`make(**settings)`: a TestClient of the app over `home` (small batches, no demo, no warm-up);
    every client made is closed on exit."""
    from fastapi.testclient import TestClient

    from seglock.app.main import create_app
    from seglock.app.settings import Settings

    clients = []

    def make(**overrides):
        options = dict(home=home, import_demo=False, max_batch=4, max_wait_ms=2, warmup=False)
        client = TestClient(create_app(Settings(**{**options, **overrides})), raise_server_exceptions=False)
        clients.append(client.__enter__())
        return client

    try:
        yield make
    finally:
        for client in clients:
            client.__exit__(None, None, None)


def master_env() -> dict[str, str]:
    return {**os.environ, "SEGLOCK_MASTER_KEY": MASTER_KEY}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(home: Path, *args: str, ready_s: float = 180, threads: str | None = "1"):
    """A real `seglock serve` process on loopback with `home`, yielded once /readyz answers 200:
    {"base", "home", "process", "log"}. Stopped (terminate, then kill) on exit. On the device
    `SEGLOCK_TEST_DEVICE` names (default cpu; `args` may name another). `threads`: its
    OMP_NUM_THREADS (None: unset, the server chooses)."""
    port = free_port()
    env = {**os.environ, "SEGLOCK_MASTER_KEY": MASTER_KEY, "OMP_NUM_THREADS": threads}
    if threads is None:
        del env["OMP_NUM_THREADS"]
    home.parent.mkdir(parents=True, exist_ok=True)
    log_path = home.parent / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "seglock.app.cli", "serve", "--home", str(home), "--port", str(port),
             "--device", os.environ.get("SEGLOCK_TEST_DEVICE", "cpu"),
             *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + ready_s
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("server did not become ready:\n" + log_path.read_text()[-3000:])
                time.sleep(0.3)
            yield {"base": base, "home": home, "process": process, "log": log_path}
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
