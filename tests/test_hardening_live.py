"""Issue 13 against a real `seglock serve` (uvicorn): the event loop never blocks on the keystore,
the upload gate is taken before a body is read, and the image needs a master key."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import filelock
import httpx
import pytest

from seglock.app.home import Home
from tests.server_fixtures import live_server, make_artifacts, open_keystore, png_bytes, scene


@pytest.fixture(scope="module")
def home_with_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    artifacts = make_artifacts(root / "artifacts")
    home = root / "home"
    keystore = open_keystore(home)
    for name in ("plain", "shf"):
        path, key = artifacts[name]
        Home(home, keystore).import_artifact(path, key=key)
    return home, keystore


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_healthz_answers_within_100ms_while_keystore_calls_block(home_with_models, monkeypatch):
    home, keystore = home_with_models
    client = keystore.create_token("slow", ["segment"], ["shf"])[1]
    admin = keystore.create_token("admin", ["admin", "segment"], ["*"])[1]
    monkeypatch.setenv("SEGLOCK_KEYSTORE_LOCK_TIMEOUT_S", "4")
    with live_server(home) as live:
        base = live["base"]
        assert httpx.get(f"{base}/healthz").status_code == 200
        answers = {}
        # A hot backup holds the keystore's and the audit log's locks; keystore calls now wait.
        with filelock.FileLock(str(home / "keystore.json.lock")), filelock.FileLock(str(home / "keystore.audit.lock")):
            calls = [
                threading.Thread(target=lambda: answers.__setitem__(
                    "key", httpx.get(f"{base}/v1/models/shf/client-key", headers=bearer(client), timeout=30))),
                threading.Thread(target=lambda: answers.__setitem__(
                    "token", httpx.post(f"{base}/admin/tokens", json={"name": "t", "models": ["shf"]},
                                        headers=bearer(admin), timeout=30))),
            ]
            for call in calls:
                call.start()
            time.sleep(0.5)
            latencies = []
            with httpx.Client() as probe:
                for _ in range(20):
                    started = time.perf_counter()
                    assert probe.get(f"{base}/healthz", timeout=5).status_code == 200
                    latencies.append(time.perf_counter() - started)
                    time.sleep(0.1)
            for call in calls:
                call.join()
        assert max(latencies) < 0.1, latencies
        assert answers["key"].status_code == 503 and "key" not in answers["key"].json()  # unaudited: not released
        assert answers["token"].status_code == 503 and answers["token"].headers["Retry-After"]


def test_the_upload_gate_is_taken_before_the_body_is_read(home_with_models, monkeypatch):
    home, keystore = home_with_models
    client = keystore.create_token("gate", ["segment"], ["plain"])[1]
    monkeypatch.setenv("SEGLOCK_DECODE_CONCURRENCY", "1")
    monkeypatch.setenv("SEGLOCK_DECODE_QUEUE", "0")
    with live_server(home) as live:
        port = int(live["base"].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow:
            boundary = "b0undary"
            slow.sendall((f"POST /v1/models/plain/segment HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {client}\r\n"
                          f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 1000000\r\n\r\n"
                          f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n"
                          ).encode() + b"\0" * 1000)
            time.sleep(0.5)  # the slow upload now holds the only slot, its body still coming
            second = httpx.post(f"{live['base']}/v1/models/plain/segment", headers=bearer(client),
                                files={"image": ("x.png", png_bytes(scene(1, 32, 32)))}, timeout=10)
        assert second.status_code == 503 and second.headers["Retry-After"]


def test_the_image_refuses_to_start_without_a_master_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGLOCK_")}
    env["SEGLOCK_REQUIRE_MASTER_KEY"] = "1"  # what the Dockerfile sets
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-m", "seglock.app.cli", "serve", "--home", str(home), "--port", "0",
                           "--no-demo", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no master key given" in done.stderr + done.stdout
    assert not (home / "master.key").exists() and not (home / "keystore.json").exists()
    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    assert "SEGLOCK_REQUIRE_MASTER_KEY=1" in dockerfile


def test_the_upload_gate_covers_v2_infer_and_the_thief_view(home_with_models, monkeypatch):
    home, keystore = home_with_models
    client = keystore.create_token("gate2", ["segment", "admin"], ["plain", "shf"])[1]
    monkeypatch.setenv("SEGLOCK_DECODE_CONCURRENCY", "1")
    monkeypatch.setenv("SEGLOCK_DECODE_QUEUE", "0")
    with live_server(home) as live:
        port = int(live["base"].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow:
            # a /v2 infer whose body is still coming holds the only slot
            slow.sendall((f"POST /v2/models/plain/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {client}\r\n"
                          f"Content-Length: 1000000\r\n\r\n").encode() + b"{" + b" " * 1000)
            time.sleep(0.5)
            infer = httpx.post(f"{live['base']}/v2/models/plain/infer", headers=bearer(client), timeout=10,
                               content=b'{"inputs": [{"name": "image", "shape": [1, 1, 1, 3], "datatype": "UINT8", '
                                       b'"data": [0, 0, 0]}]}')
            view = httpx.post(f"{live['base']}/admin/models/shf/thief-view", headers=bearer(client), timeout=10,
                              files={"image": ("x.png", png_bytes(scene(1, 32, 32)))})
        assert infer.status_code == 503 and infer.headers["Retry-After"] and set(infer.json()) == {"error"}
        assert view.status_code == 503 and view.headers["Retry-After"]
