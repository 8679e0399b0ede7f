"""A real `seglock serve` process on loopback, from an empty home to a revoked token."""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from seglock.models.data import generate_scene
from tests.server_fixtures import MASTER_KEY, live_server, png_bytes


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("live") / "home") as server:
        yield server


def tokens(live) -> dict:
    return json.loads((live["home"] / "initial-tokens.json").read_text())


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def demo_scene(index: int) -> bytes:
    image, _ = generate_scene(seed=7, index=index, size=128)
    return png_bytes(image)


def post_mask(base, model, data, token) -> np.ndarray:
    response = httpx.post(f"{base}/v1/models/{model}/segment", files={"image": ("s.png", data)},
                          headers=bearer(token), timeout=60)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_first_start_writes_private_initial_tokens_and_imports_demos(live):
    path = live["home"] / "initial-tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(tokens(live)) == {"admin", "client"}
    models = httpx.get(f"{live['base']}/v1/models", headers=bearer(tokens(live)["client"])).json()["models"]
    assert {"demo-cp", "demo-plain", "demo-shf", "demo-per-image"} <= {m["name"] for m in models}


def test_segment_rotate_revoke_cycle(live):
    base, client, admin = live["base"], tokens(live)["client"], tokens(live)["admin"]
    scenes = [demo_scene(i) for i in range(3)]
    before = [post_mask(base, "demo-cp", data, client) for data in scenes]
    assert httpx.post(f"{base}/v1/models/demo-cp/segment", files={"image": ("s.png", scenes[0])}).status_code == 401
    rotated = httpx.post(f"{base}/admin/models/demo-cp/rotate-key", headers=bearer(admin), timeout=60)
    assert rotated.status_code == 200, rotated.text
    after = [post_mask(base, "demo-cp", data, client) for data in scenes]
    for old, new in zip(before, after, strict=False):
        np.testing.assert_array_equal(old, new)
    made = httpx.post(f"{base}/admin/tokens", json={"name": "e2e", "models": ["demo-plain"]},
                      headers=bearer(admin)).json()
    post_mask(base, "demo-plain", scenes[0], made["token"])
    assert httpx.delete(f"{base}/admin/tokens/{made['id']}", headers=bearer(admin)).status_code == 204
    again = httpx.post(f"{base}/v1/models/demo-plain/segment", files={"image": ("s.png", scenes[0])},
                       headers=bearer(made["token"]))
    assert again.status_code == 401


def test_token_revoked_by_the_cli_in_another_process_stops_working(live):
    base, admin = live["base"], tokens(live)["admin"]
    made = httpx.post(f"{base}/admin/tokens", json={"name": "cli-revoke", "models": ["*"]},
                      headers=bearer(admin)).json()
    assert httpx.get(f"{base}/v1/models", headers=bearer(made["token"])).status_code == 200
    env = {**os.environ, "SEGLOCK_MASTER_KEY": MASTER_KEY}
    done = subprocess.run([sys.executable, "-m", "seglock.app.cli", "tokens", "revoke", made["id"], "--home",
                           str(live["home"])], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert httpx.get(f"{base}/v1/models", headers=bearer(made["token"])).status_code == 401


def test_32_concurrent_requests_are_all_answered_correctly(live):
    base, client = live["base"], tokens(live)["client"]
    scenes = [demo_scene(10 + i % 4) for i in range(32)]
    expected = {i: post_mask(base, "demo-plain", scenes[i], client) for i in range(4)}

    async def run():
        async with httpx.AsyncClient(base_url=base, headers=bearer(client), timeout=120) as http:
            return await asyncio.gather(*(
                http.post("/v1/models/demo-plain/segment", files={"image": ("s.png", data)}) for data in scenes))

    responses = asyncio.run(run())
    for i, response in enumerate(responses):
        assert response.status_code == 200
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(response.content))), expected[i % 4])


def test_broken_upload_is_a_4xx_and_the_server_keeps_serving(live):
    base, client = live["base"], tokens(live)["client"]
    truncated = png_bytes(generate_scene(3, 0, 64)[0])[:120]
    response = httpx.post(f"{base}/v1/models/demo-plain/segment", files={"image": ("s.png", truncated)},
                          headers=bearer(client))
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert live["process"].poll() is None


def test_access_log_never_holds_a_token(live):
    text = live["log"].read_text(errors="replace")
    assert "/v1/models" in text
    for token in tokens(live).values():
        assert token not in text and token.split("_")[2] not in text
