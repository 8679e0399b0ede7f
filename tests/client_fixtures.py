"""Shared setup for the client tests (this module holds no tests itself).

A real seglock app on loopback, served by uvicorn in a thread, wrapped in an ASGI recorder that
keeps every request body exactly as the server received it: the privacy tests read what left the
client from there. Models: the server tests' tiny plain / cp / shf / per-image artifacts plus np
and ffx ones, so every protection mode is hosted.
"""

from __future__ import annotations

import asyncio
import copy
import io
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglock.client.transforms import BlockKey
from seglock.models import build_model, protect, save_artifact
from seglock.models.artifact import IMAGENET_NORMALIZATION
from seglock.models.inputs import encrypt_for_mode, scaled_input
from tests.server_fixtures import CLASSES, INPUT, MASTER_KEY, open_keystore
from tests.server_fixtures import scene as noise


@dataclass
class Received:
    """One HTTP request as the app received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def upload(self) -> bytes:
        """The bytes of the multipart field `image`."""
        boundary = self.headers["content-type"].split("boundary=", 1)[1].strip('"').encode()
        for part in self.body.split(b"--" + boundary)[1:-1]:
            head, _, content = part.partition(b"\r\n\r\n")
            if b'name="image"' in head:
                return content[:-2]  # the CRLF before the next boundary
        raise AssertionError("no image field in the request")

    def upload_array(self) -> np.ndarray:
        data = self.upload()
        if data.startswith(b"\x93NUMPY"):
            return np.load(io.BytesIO(data), allow_pickle=False)
        return np.asarray(Image.open(io.BytesIO(data)))


@dataclass
class Recorder:
    """ASGI middleware that records each HTTP request body; the app itself is untouched."""

    app: object
    received: list[Received] = field(default_factory=list)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
            return message

        try:
            await self.app(scope, recording_receive, send)
        finally:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            self.received.append(Received(scope["method"], scope["path"], headers, b"".join(chunks)))

    def segment_requests(self, model: str) -> list[Received]:
        return [r for r in self.received if r.path == f"/v1/models/{model}/segment"]

    def clear(self) -> None:
        self.received.clear()


class LoopbackServer:
    """uvicorn serving an ASGI app on 127.0.0.1 in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the loopback server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


def _calibrated(seed: int, protection: dict, key: BlockKey | None) -> torch.nn.Module:
    """A random tiny model whose BatchNorm statistics come from inputs of its own protection mode,
    so that its masks vary with the image (a model left at its initial statistics answers one class)."""
    torch.manual_seed(seed)
    model = build_model("tiny", len(CLASSES), width=8)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batch
    images = [noise(1000 + i, INPUT, INPUT) for i in range(8)]
    images += [np.asarray(Image.fromarray(noise(2000 + i, 48, 40)).resize((INPUT, INPUT), Image.BILINEAR))
               for i in range(8)]  # the tests' images reach the model resized, so smoother
    batch = torch.from_numpy(np.stack(images))
    inputs = scaled_input(encrypt_for_mode(batch, protection, key), protection["mode"], IMAGENET_NORMALIZATION)
    model.train()
    with torch.no_grad():
        model(inputs)
    return model.eval()


def make_client_artifacts(root: Path) -> dict[str, tuple[Path, object]]:
    """{name: (artifact dir, key or None)}: one tiny model for each protection mode."""
    common = dict(class_names=CLASSES, input_size=[INPUT, INPUT])
    keyed = dict(key={"id": "kbundled", "version": 1})
    out = {}
    plain = _calibrated(1, {"mode": "none"}, None)
    save_artifact(plain, root / "plain", name="plain", **common)
    out["plain"] = (root / "plain", None)
    cp = copy.deepcopy(plain)  # the plain model protected post hoc: the same function with its key
    cp_key = protect(cp, "dec2")
    save_artifact(cp, root / "cp", name="cp", protection={"mode": "cp", "tap": "dec2"}, **keyed, **common)
    out["cp"] = (root / "cp", cp_key)
    for seed, mode in ((2, "shf"), (7, "np"), (4, "ffx")):  # seeds whose models answer every class
        protection = {"mode": mode, "block_size": 4}
        key = BlockKey.generate(mode, block_size=4, randbytes=np.random.default_rng(seed).bytes)
        save_artifact(_calibrated(seed, protection, key), root / mode, name=mode, protection=protection,
                      **keyed, **common)
        out[mode] = (root / mode, key)
    protection = {"mode": "per-image", "block_size": 16, "sub_block": 4}
    save_artifact(_calibrated(9, protection, None), root / "per-image", name="per-image",
                  protection=protection, **common)
    out["per-image"] = (root / "per-image", None)
    return out


@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    """A loopback server hosting every mode: {"url", "tokens", "recorder", "home", "keys"}."""
    from seglock.app.home import Home
    from seglock.app.main import create_app
    from seglock.app.settings import Settings

    root = tmp_path_factory.mktemp("client-server")
    home = root / "home"
    artifacts = make_client_artifacts(root / "artifacts")
    keystore = open_keystore(home)
    for path, key in artifacts.values():
        Home(home, keystore).import_artifact(path, key=key)
    tokens = {
        "client": keystore.create_token("client", ["segment"], ["*"])[1],
        "admin": keystore.create_token("admin", ["admin", "segment"], ["*"])[1],
        "plain-only": keystore.create_token("limited", ["segment"], ["plain"])[1],
    }
    previous = os.environ.get("SEGLOCK_MASTER_KEY")
    os.environ["SEGLOCK_MASTER_KEY"] = MASTER_KEY
    settings = Settings(home=home, import_demo=False, device="cpu", max_batch=4, max_wait_ms=2, warmup=False)
    recorder = Recorder(create_app(settings))
    try:
        with LoopbackServer(recorder) as server:
            yield {"url": server.url, "tokens": tokens, "recorder": recorder, "home": home,
                   "keys": {name: key for name, (_, key) in artifacts.items()}}
    finally:
        if previous is None:
            os.environ.pop("SEGLOCK_MASTER_KEY", None)
        else:
            os.environ["SEGLOCK_MASTER_KEY"] = previous


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def run(coroutine):
    return asyncio.run(coroutine)
