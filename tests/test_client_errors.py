"""Error statuses become typed exceptions; retries follow the policy and stop at its limit.

A scripted httpx.MockTransport plays the server, so every status and failure is exact and fast
(and no torch is imported).
"""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import numpy as np
import pytest

from seglock.client import (
    AsyncSegLockClient,
    AuthenticationError,
    ConnectionFailed,
    InvalidInput,
    KeyVersionConflict,
    ModelNotFound,
    Overloaded,
    PermissionDenied,
    RateLimited,
    RetryPolicy,
    SegLockClient,
    SegLockError,
    ServerError,
)
from seglock.client.errors import error_for_status, parse_retry_after
from seglock.client.imaging import mask_image
from seglock.client.transforms import BlockKey

TOKEN = "slk_abcdefabcdef_" + "5" * 64
URL = "http://seglock.test"
SHF_KEY = BlockKey.generate("shf", 2, randbytes=np.random.default_rng(0).bytes)
MODELS = {"models": [
    {"name": "plain", "model_version": 1, "key_version": None, "num_classes": 2, "class_names": ["bg", "fg"],
     "input_size": [8, 8], "protection": {"mode": "none"}},
    {"name": "shf", "model_version": 1, "key_version": 3, "num_classes": 2, "class_names": ["bg", "fg"],
     "input_size": [8, 8], "protection": {"mode": "shf", "block_size": 2}},
]}


def mask_png(height: int = 8, width: int = 8) -> bytes:
    """What the server answers: a palette PNG of class indices (all 1 here)."""
    buffer = io.BytesIO()
    mask_image(np.ones((height, width), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def error(status: int, code: str, message: str, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}}, headers=headers)


class Script:
    """A fake server: routes answer from a list of responses (the last one repeats); records calls."""

    def __init__(self, segment: list, key_version: int = 3) -> None:
        self.segment = list(segment)
        self.key_version = key_version
        self.calls: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if path.endswith("/client-key"):
            return httpx.Response(200, json={"model": "shf", "key_version": self.key_version,
                                             "key": SHF_KEY.to_dict()})
        answer = self.segment.pop(0) if len(self.segment) > 1 else self.segment[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def paths(self) -> list[str]:
        return [request.url.path.rsplit("/", 1)[1] for request in self.calls]


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client_for(script: Script, retries: int = 3, sleeps: Sleeps | None = None) -> SegLockClient:
    policy = RetryPolicy(retries=retries, backoff=0.5, max_backoff=4.0, random=lambda: 0.5)
    return SegLockClient(URL, TOKEN, retries=policy, transport=httpx.MockTransport(script),
                         sleep=sleeps if sleeps is not None else Sleeps())


IMAGE = np.full((8, 8, 3), 120, np.uint8)


@pytest.mark.parametrize("status,code,kind", [
    (400, "bad_request", InvalidInput),
    (401, "unauthorized", AuthenticationError),
    (403, "forbidden", PermissionDenied),
    (404, "not_found", ModelNotFound),
    (409, "conflict", KeyVersionConflict),
    (413, "too_large", InvalidInput),
    (415, "unsupported_media_type", InvalidInput),
    (422, "unprocessable", InvalidInput),
    (429, "rate_limited", RateLimited),
    (500, "internal", ServerError),
    (503, "overloaded", Overloaded),
])
def test_every_error_status_maps_to_its_exception_with_the_servers_code_and_message(status, code, kind):
    script = Script([error(status, code, f"the message for {status}", {"X-Request-Id": "req-1"})])
    with client_for(script, retries=0) as sdk, pytest.raises(kind) as raised:
        sdk.segment(IMAGE, "plain")
    assert type(raised.value) is kind
    assert (raised.value.status, raised.value.code, raised.value.message) == (status, code, f"the message for {status}")
    assert raised.value.request_id == "req-1"
    assert str(raised.value) == f"{status} {code}: the message for {status}"


def test_overloaded_and_rate_limited_carry_retry_after():
    assert error_for_status(503, b"{}", {"retry-after": "7"}).retry_after == 7.0
    assert error_for_status(429, b"{}", {"retry-after": "0.5"}).retry_after == 0.5
    assert error_for_status(503, b"{}", {}).retry_after is None
    assert isinstance(error_for_status(429, b"{}", {}), Overloaded)


def test_retry_after_reads_seconds_and_http_dates():
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_an_error_body_that_is_not_json_keeps_its_first_line():
    raised = error_for_status(502, b"<html>Bad gateway</html>\nmore", {})
    assert type(raised) is ServerError and raised.code == "server_error"
    assert raised.message == "<html>Bad gateway</html>"


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_retries_on_503_stop_at_the_limit_with_exponential_backoff(retries):
    script, sleeps = Script([error(503, "overloaded", "busy")]), Sleeps()
    with client_for(script, retries, sleeps) as sdk, pytest.raises(Overloaded):
        sdk.segment(IMAGE, "plain")
    assert script.paths().count("segment") == retries + 1
    # backoff 0.5 doubling, capped at 4, jitter draw 0.5 -> three quarters of each ceiling
    assert sleeps == [0.375, 0.75, 1.5][:retries]


def test_429_then_success_returns_the_mask_after_one_wait():
    script = Script([error(429, "rate_limited", "slow down"), httpx.Response(200, content=mask_png())])
    sleeps = Sleeps()
    with client_for(script, 3, sleeps) as sdk:
        mask = sdk.segment(IMAGE, "plain")
    np.testing.assert_array_equal(mask, np.ones((8, 8), np.uint8))
    assert script.paths().count("segment") == 2 and sleeps == [0.375]


def test_the_servers_retry_after_is_waited_but_capped():
    script, sleeps = Script([error(503, "overloaded", "busy", {"Retry-After": "3"}),
                             error(503, "overloaded", "busy", {"Retry-After": "600"}),
                             httpx.Response(200, content=mask_png())]), Sleeps()
    with client_for(script, 3, sleeps) as sdk:
        sdk.segment(IMAGE, "plain")
    assert sleeps == [3.0, 30.0]  # RetryPolicy.max_retry_after defaults to 30 s


def test_connection_failures_are_retried_then_raised_without_the_token():
    script, sleeps = Script([httpx.ConnectError("connection refused")]), Sleeps()
    with client_for(script, 2, sleeps) as sdk, pytest.raises(ConnectionFailed) as raised:
        sdk.segment(IMAGE, "plain")
    assert script.paths().count("segment") == 3 and len(sleeps) == 2
    assert raised.value.status is None and "ConnectError" in str(raised.value)
    assert TOKEN not in str(raised.value) and TOKEN not in repr(raised.value)


def test_read_timeouts_are_not_retried():
    script = Script([httpx.ReadTimeout("too slow")])
    with client_for(script, 3) as sdk, pytest.raises(ConnectionFailed, match="timed out"):
        sdk.segment(IMAGE, "plain")
    assert script.paths().count("segment") == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 500])
def test_other_statuses_are_never_retried(status):
    script, sleeps = Script([error(status, "x", "no")]), Sleeps()
    with client_for(script, 3, sleeps) as sdk, pytest.raises(SegLockError):
        sdk.segment(IMAGE, "plain")
    assert script.paths().count("segment") == 1 and sleeps == []


def test_a_key_conflict_refetches_the_key_and_retries_exactly_once():
    script = Script([error(409, "conflict", "stale key")])
    with client_for(script) as sdk, pytest.raises(KeyVersionConflict):
        sdk.segment(IMAGE, "shf")
    assert script.paths() == ["models", "client-key", "segment", "client-key", "segment"]
    segments = [r for r in script.calls if r.url.path.endswith("segment")]
    assert [r.headers.get("x-seglock-key-version") for r in segments] == ["3", "3"]


def test_every_request_carries_the_token_and_the_client_repr_does_not():
    script = Script([httpx.Response(200, content=mask_png())])
    with client_for(script) as sdk:
        sdk.segment(IMAGE, "plain")
        assert TOKEN not in repr(sdk) and "5" * 64 not in repr(sdk.__dict__)
    assert {r.headers["authorization"] for r in script.calls} == {f"Bearer {TOKEN}"}


def test_an_unlisted_model_is_asked_about_so_the_server_names_the_reason():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        return error(403, "forbidden", "this token is not granted model secret")

    with SegLockClient(URL, TOKEN, transport=httpx.MockTransport(handler)) as sdk, \
            pytest.raises(PermissionDenied, match="not granted"):
        sdk.segment(IMAGE, "secret")


def test_a_malformed_answer_is_a_server_error():
    for body in (b"[]", b"not json", json.dumps({"models": [{"name": "x"}]}).encode()):
        transport = httpx.MockTransport(lambda request, body=body: httpx.Response(200, content=body))
        with SegLockClient(URL, TOKEN, transport=transport) as sdk, pytest.raises(ServerError):
            sdk.models()


def test_a_mask_of_the_wrong_size_for_an_encrypted_input_is_a_server_error():
    script = Script([httpx.Response(200, content=mask_png(4, 4))])
    with client_for(script) as sdk, pytest.raises(ServerError, match="mask"):
        sdk.segment(IMAGE, "shf")


def test_retry_policy_delays_are_exact_for_a_given_jitter_draw():
    low = RetryPolicy(backoff=1.0, max_backoff=5.0, random=lambda: 0.0)
    high = RetryPolicy(backoff=1.0, max_backoff=5.0, random=lambda: 1.0)
    assert [low.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 2.5, 2.5]
    assert [high.delay(n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert low.delay(0, retry_after=2.0) == 2.0 and high.delay(2, retry_after=2.0) == 4.0
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)


def test_async_retries_stop_at_the_limit_too():
    script, sleeps = Script([error(503, "overloaded", "busy")]), []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    async def go():
        policy = RetryPolicy(retries=2, random=lambda: 0.5)
        async with AsyncSegLockClient(URL, TOKEN, retries=policy, transport=httpx.MockTransport(script),
                                      sleep=record) as sdk:
            await sdk.segment(IMAGE, "plain")

    with pytest.raises(Overloaded):
        asyncio.run(go())
    assert script.paths().count("segment") == 3 and sleeps == [0.375, 0.75]


def test_bad_construction_arguments_are_refused():
    with pytest.raises(InvalidInput):
        SegLockClient("ftp://host", TOKEN)
    with pytest.raises(InvalidInput):
        SegLockClient(URL, "slk_a b")
    with pytest.raises(ValueError):
        SegLockClient(URL, TOKEN, encrypted_format="jpeg")
    with SegLockClient(URL, TOKEN, transport=httpx.MockTransport(Script([]))) as sdk, pytest.raises(ValueError):
        sdk.segment_many([IMAGE], "plain", concurrency=0)
