"""Per-token rate limits: a burst, then a steady rate; 429 with Retry-After beyond it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from seglock.app.home import Home
from seglock.app.main import create_app
from seglock.app.ratelimit import RateLimiter, retry_after_header
from seglock.app.settings import Settings
from tests.server_fixtures import MASTER_KEY, make_artifacts, open_keystore, png_bytes, scene


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_token_gets_its_burst_then_waits_for_the_rate():
    clock = Clock()
    limiter = RateLimiter(2.0, 3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0  # buckets are per token
    clock.now += 0.5
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(0.5)
    clock.now += 100
    assert [limiter.acquire("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refilled to the burst, no more


def test_retry_after_is_whole_seconds_at_least_one():
    assert [retry_after_header(w) for w in (0.01, 1.0, 1.2)] == [1, 1, 2]


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError):
        RateLimiter(0, 1)
    with pytest.raises(ValueError):
        RateLimiter(1, 0)


def test_server_answers_429_with_retry_after_past_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGLOCK_MASTER_KEY", MASTER_KEY)
    home = tmp_path / "home"
    keystore = open_keystore(home)
    path, _ = make_artifacts(tmp_path / "artifacts")["plain"]
    Home(home, keystore).import_artifact(path)
    _, token = keystore.create_token("c", ["segment"], ["plain"])
    settings = Settings(home=home, import_demo=False, rate_limit_rps=0.01, rate_limit_burst=2, warmup=False)
    with TestClient(create_app(settings)) as http:
        headers = {"Authorization": f"Bearer {token}"}
        image = {"image": ("x.png", png_bytes(scene(0, 32, 32)))}
        codes = [http.post("/v1/models/plain/segment", files=image, headers=headers).status_code for _ in range(2)]
        limited = http.post("/v1/models/plain/segment", files=image, headers=headers)
    assert codes == [200, 200]
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 99
