"""The HTTP client: `SegLockClient` and `AsyncSegLockClient`, one httpx connection pool each.

What a `segment` call sends depends on the model's protection mode (from `GET /v1/models`):
    none, cp        the image, losslessly (files the server reads go as they are, the rest as .npy);
    shf, np, ffx    the image resized to the model input and encrypted here with the block key from
                    `GET /v1/models/{name}/client-key` (fetched once, cached with its version), sent
                    as `.npy` (or PNG on request, uint8 modes); a 409 (stale key) re-fetches the key once;
    per-image       the image resized and encrypted here with fresh keys that never leave this call.
Either way the answer is an HxW uint8 mask of class indices at the image's own size.

Both clients share everything but the I/O: the preparation of a request and the reading of an
answer are plain functions below, and the retry policy is one small value object.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import random
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import httpx
import numpy as np

from seglock.client import imaging
from seglock.client.errors import (
    RETRYABLE_STATUSES,
    AuthenticationError,
    ConnectionFailed,
    InvalidInput,
    KeyVersionConflict,
    ModelNotFound,
    SegLockError,
    ServerError,
    error_for_status,
)
from seglock.client.imaging import ImageInput
from seglock.client.modes import Mode
from seglock.client.transforms import BlockKey, TransformError, encrypt_blocks, encrypt_per_image

TOKEN_ENV = "SEGLOCK_TOKEN"
DEFAULT_TIMEOUT = 30.0
DEFAULT_CONCURRENCY = 4
NPY_MAX_BYTES = 8 * 1024 * 1024  # decoded none/cp images up to this many pixel bytes go as .npy (2.8 MP RGB)
KEY_VERSION_HEADER = "X-Seglock-Key-Version"
ENCRYPTED_HEADER = "X-Seglock-Encrypted"

# Connection failures worth another try; sending an image twice is harmless (segment is idempotent).
# Read and write timeouts are not among them: a server that is slow to answer is not helped by more work.
_RETRYABLE_TRANSPORT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout,
                        httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


@functools.lru_cache(maxsize=1)
def _user_agent() -> str:
    try:
        from importlib.metadata import version

        return f"seglock-client/{version('seglock')}"
    except Exception:  # not installed as a distribution (a source checkout)
        return "seglock-client"


# -- public value types -------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    """One entry of `GET /v1/models`: a model this token may use and its public parameters."""

    name: str
    mode: str
    input_size: tuple[int, int]  # (height, width) of the model input
    num_classes: int
    class_names: tuple[str, ...]
    key_version: int | None = None
    model_version: int | None = None
    architecture: Any = None
    protection: Mapping[str, Any] = field(default_factory=dict)
    normalization: Mapping[str, Any] = field(default_factory=dict)

    @property
    def encrypts_input(self) -> bool:
        """True where the SDK encrypts before sending (shf, np, ffx, per-image)."""
        mode = Mode.parse(self.mode)
        return mode is not None and mode.encrypts_input

    @classmethod
    def from_dict(cls, data: Any) -> ModelInfo:
        try:
            protection = dict(data["protection"])
            height, width = (int(v) for v in data["input_size"])
            return cls(
                name=str(data["name"]),
                mode=str(protection["mode"]),
                input_size=(height, width),
                num_classes=int(data["num_classes"]),
                class_names=tuple(str(n) for n in data.get("class_names", ())),
                key_version=None if data.get("key_version") is None else int(data["key_version"]),
                model_version=None if data.get("model_version") is None else int(data["model_version"]),
                architecture=data.get("architecture"),
                protection=protection,
                normalization=dict(data.get("normalization") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ServerError(f"the server's model list is malformed ({type(exc).__name__}: {exc})",
                              code="bad_answer") from None


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for 503, 429 and connection failures: exponential backoff with jitter.

    Wait before retry n (0-based): d = min(max_backoff, backoff * 2**n), then a uniform draw in
    [d/2, d] ("equal jitter"), or the server's Retry-After (at most max_retry_after) if longer.
    """

    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 30.0
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be a non-negative integer, got {self.retries!r}")
        if self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError("backoff times must not be negative")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        ceiling = min(self.max_backoff, self.backoff * 2.0**retry)
        wait = ceiling / 2 + self.random() * ceiling / 2
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait


# -- request preparation and answers (no I/O on the network) ------------------------------

@dataclass(frozen=True)
class _Upload:
    """A segment request ready to send, and the size its mask must end up at (None: as answered)."""

    content: bytes
    filename: str
    content_type: str
    headers: Mapping[str, str]
    model_size: tuple[int, int] | None = None  # the answer's expected size (encrypted inputs)
    image_size: tuple[int, int] | None = None  # the size to resize the mask back to


def _plain_upload(image: ImageInput, lossless: bool) -> _Upload:
    """none/cp: encoded files the server reads go unchanged; decoded images go as `.npy` (lossless)
    or JPEG. Not PNG: for a 256 px photo a PNG costs this side 6.4 ms and the server 1.1 ms (at
    512 px 26 and 4.0 ms) to save 27 % of the bytes; `.npy` costs both a few hundredths. Above
    `NPY_MAX_BYTES` of pixels a PNG again: it may fit under the server's body limit (20 MiB by
    default) where the pixels would not."""
    data = imaging.read_bytes(image)
    if data is not None:
        fmt = imaging.open_encoded(data).format
        if fmt in imaging.SERVER_FORMATS:
            return _Upload(data, f"image.{fmt.lower()}", f"image/{fmt.lower()}", {})
    rgb = imaging.load_rgb(image if data is None else data)
    if lossless and rgb.nbytes <= NPY_MAX_BYTES:
        return _Upload(imaging.encode_npy(rgb), "image.npy", "application/octet-stream", {})
    if lossless:
        return _Upload(imaging.encode_png(rgb), "image.png", "image/png", {})
    return _Upload(imaging.encode_jpeg(rgb), "image.jpg", "image/jpeg", {})


def _model_array(image: ImageInput, info: ModelInfo) -> tuple[np.ndarray, tuple[int, int]]:
    """(the image as the model input, uint8 HWC; the image's own size)."""
    rgb = imaging.load_rgb(image)
    return imaging.resize_rgb(rgb, info.input_size), rgb.shape[:2]


def _encrypted_upload(model_array: np.ndarray, image_size: tuple[int, int], info: ModelInfo,
                      key: tuple[int, BlockKey] | None, encoding: str) -> _Upload:
    """shf/np/ffx with the cached (version, key); per-image with fresh keys made and dropped here."""
    try:
        if _is_block(info):
            if key is None:
                raise TransformError("no client key was fetched")
            version, block_key = key
            encrypted = encrypt_blocks(model_array, block_key)
            headers = {KEY_VERSION_HEADER: str(version)}
        else:
            encrypted = encrypt_per_image(model_array, block_size=int(info.protection["block_size"]),
                                          sub_block=int(info.protection["sub_block"]))
            headers = {ENCRYPTED_HEADER: Mode.PER_IMAGE.value}
    except (TransformError, KeyError, TypeError, ValueError) as exc:
        # the model's own parameters do not fit: nothing the caller's image can fix
        raise ServerError(f"model {info.name} cannot be used with its published parameters: {exc}",
                          code="bad_model_parameters") from None
    if encrypted.dtype == np.uint8 and encoding == "png":
        return _Upload(imaging.encode_png(encrypted), "image.png", "image/png", headers,
                       info.input_size, image_size)
    return _Upload(imaging.encode_npy(encrypted), "image.npy", "application/octet-stream", headers,
                   info.input_size, image_size)


def _mask_from(response: httpx.Response, upload: _Upload) -> np.ndarray:
    mask = imaging.decode_mask_png(response.content)
    if upload.model_size is not None and upload.image_size is not None:  # set together
        if mask.shape != tuple(upload.model_size):
            raise ServerError(f"the server answered a {mask.shape} mask for a {upload.model_size} input",
                              code="bad_mask")
        mask = imaging.resize_mask(mask, upload.image_size)
    return mask


def _key_from(answer: Any, info: ModelInfo) -> tuple[int, BlockKey]:
    try:
        version, key = int(answer["key_version"]), BlockKey.from_dict(answer["key"])
    except (KeyError, TypeError, ValueError) as exc:  # TransformError is a ValueError
        raise ServerError(f"the client key of {info.name} is malformed ({type(exc).__name__})",
                          code="bad_answer") from None
    if key.method != info.mode:
        raise ServerError(f"the client key of {info.name} is for {key.method}, the model is {info.mode}",
                          code="bad_answer")
    return version, key


def _is_block(info: ModelInfo) -> bool:
    mode = Mode.parse(info.mode)
    return mode is not None and mode.is_block


def _check_mode(info: ModelInfo) -> None:
    if Mode.parse(info.mode) is None:
        raise ServerError(f"model {info.name} uses protection mode {info.mode!r}, which this SDK "
                          "does not know: upgrade seglock", code="unknown_mode")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ServerError("the server's answer is not JSON", code="bad_answer") from None


def _request_failed(exc: httpx.HTTPError, base_url: str) -> ConnectionFailed:
    """What went wrong and where, from the exception's type and first line (never its request)."""
    what = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    detail = str(exc).splitlines()[0][:200] if str(exc) else ""
    return ConnectionFailed(f"request to {base_url} {what} ({type(exc).__name__}{': ' + detail if detail else ''})")


class _BearerToken(httpx.Auth):
    """Adds `Authorization: Bearer <token>` to every request; its repr never shows the token."""

    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request

    def __repr__(self) -> str:
        return "<bearer token>"


def _resolve_token(token: str | None) -> str:
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    if not isinstance(token, str) or not token.strip():
        raise AuthenticationError(f"no API token: pass token=... or set {TOKEN_ENV}", code="no_token")
    token = token.strip()
    if any(c.isspace() or not c.isprintable() for c in token):
        raise InvalidInput("the API token holds whitespace or control characters", code="bad_token")
    return token


def _check_base_url(base_url: str) -> str:
    url = httpx.URL(str(base_url))
    if url.scheme not in ("http", "https") or not url.host:
        raise InvalidInput(f"base_url must be an http:// or https:// URL, got {str(base_url)!r}", code="bad_url")
    return str(url).rstrip("/")


def _check_concurrency(concurrency: int) -> int:
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    return concurrency


def _model_path(name: str, tail: str) -> str:
    return f"/v1/models/{quote(str(name), safe='')}/{tail}"


class _ClientBase:
    """Configuration, caches and repr shared by the sync and async clients."""

    def __init__(self, base_url: str, token: str | None, *, timeout: float | httpx.Timeout,
                 retries: int | RetryPolicy, lossless: bool, encrypted_format: Literal["npy", "png"]) -> None:
        self.base_url = _check_base_url(base_url)
        self._auth = _BearerToken(_resolve_token(token))
        self.retry_policy = retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries=retries)
        self.timeout = timeout
        if encrypted_format not in ("npy", "png"):
            raise ValueError(f"encrypted_format must be 'npy' or 'png', got {encrypted_format!r}")
        self.lossless = bool(lossless)
        self.encrypted_format = encrypted_format
        self._catalog: dict[str, ModelInfo] | None = None
        self._keys: dict[str, tuple[int, BlockKey]] = {}  # model -> (key version, block key)

    def _http_kwargs(self) -> dict[str, Any]:
        return dict(base_url=self.base_url, auth=self._auth, timeout=self.timeout,
                    headers={"User-Agent": _user_agent()}, follow_redirects=False)

    def _known(self, name: str) -> ModelInfo | None:
        return None if self._catalog is None else self._catalog.get(name)

    def _remember(self, answer: Any) -> list[ModelInfo]:
        try:
            entries = answer["models"]
            infos = [ModelInfo.from_dict(entry) for entry in entries]
        except (KeyError, TypeError):
            raise ServerError("the server's model list is malformed", code="bad_answer") from None
        self._catalog = {info.name: info for info in infos}
        return infos

    def _not_available(self, name: str) -> ModelNotFound:
        names = ", ".join(sorted(self._catalog or {})) or "none"
        return ModelNotFound(f"model {name!r} is not available to this token (it may use: {names})")

    def _outcome(self, result: httpx.Response | httpx.HTTPError) -> tuple[httpx.Response | None,
                                                                           SegLockError | None, bool, float | None]:
        """(response if it succeeded, else the error; whether to retry; the server's Retry-After)."""
        if isinstance(result, httpx.HTTPError):
            return None, _request_failed(result, self.base_url), isinstance(result, _RETRYABLE_TRANSPORT), None
        if result.is_success:
            return result, None, False, None
        error = error_for_status(result.status_code, result.content, result.headers)
        retry_after = getattr(error, "retry_after", None)
        return None, error, result.status_code in RETRYABLE_STATUSES, retry_after

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_url={self.base_url!r}, "
                f"retries={self.retry_policy.retries}, timeout={self.timeout!r})")


class SegLockClient(_ClientBase):
    """Blocking client. Thread-safe: one connection pool, shared by `segment_many`'s threads.

        with SegLockClient("http://127.0.0.1:8000", token) as client:
            mask = client.segment("street.jpg", "demo-shf")   # HxW uint8 class indices

    token: an API token (`slk_...`); None reads SEGLOCK_TOKEN. timeout: seconds per request (or an
    httpx.Timeout). retries: how often 503/429/connection failures are retried (or a RetryPolicy).
    lossless: send decoded none/cp images as `.npy` pixels (False: JPEG, lossy, a sixth to a
    seventh of the bytes of a photo; a PNG is neither: see `_plain_upload`). encrypted_format: how
    encrypted inputs travel: "npy" (default; encrypted pixels barely compress, so PNG would cost
    milliseconds to save a few percent) or "png" for uint8 modes; ffx's uint16 always go as .npy.
    transport, verify: passed to httpx. sleep: how to wait between retries (tests pass a recorder).
    """

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retries: int | RetryPolicy = 3, lossless: bool = True,
                 encrypted_format: Literal["npy", "png"] = "npy", transport: httpx.BaseTransport | None = None,
                 verify: Any = True, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(base_url, token, timeout=timeout, retries=retries, lossless=lossless,
                         encrypted_format=encrypted_format)
        self._sleep = sleep
        self._lock = threading.Lock()  # one key fetch and one model-list fetch at a time
        self._http = httpx.Client(transport=transport, verify=verify, **self._http_kwargs())

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SegLockClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- API --------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """The models this token may use (always asks the server; refreshes the SDK's cache)."""
        answer = _json(self._request("GET", "/v1/models"))
        with self._lock:
            return self._remember(answer)

    def segment(self, image: ImageInput, model: str) -> np.ndarray:
        """The HxW uint8 class-index mask of `image` (path, bytes, PIL image or HWC uint8 array)."""
        info = self._model(model)
        if not info.encrypts_input:
            upload = _plain_upload(image, self.lossless)
            return _mask_from(self._post(info, upload), upload)
        model_array, image_size = _model_array(image, info)
        for attempt in range(2):
            key = self._block_key(info) if _is_block(info) else None
            upload = _encrypted_upload(model_array, image_size, info, key, self.encrypted_format)
            try:
                return _mask_from(self._post(info, upload), upload)
            except KeyVersionConflict:
                if attempt or key is None:
                    raise
                self._forget_key(info.name, key[0])  # the model moved to a new key: fetch it, once
        raise AssertionError("unreachable")

    def iter_segment(self, images: Iterable[ImageInput], model: str, *,
                     concurrency: int = DEFAULT_CONCURRENCY
                     ) -> Generator[tuple[int, np.ndarray | SegLockError], None, None]:
        """(index, mask or SegLockError) for each image, in the order they finish.

        At most `concurrency` requests are in flight; `images` is read lazily, so it may be a
        generator over many files. Errors of one image are yielded, not raised.
        """
        concurrency = _check_concurrency(concurrency)
        info = self._model(model)  # fail fast on a bad token or model, before any image is read
        if _is_block(info):
            self._block_key(info)

        def one(index: int, image: ImageInput) -> tuple[int, np.ndarray | SegLockError]:
            try:
                return index, self.segment(image, model)
            except SegLockError as exc:
                return index, exc

        source = enumerate(images)
        with concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="seglock") as pool:
            pending: set[concurrent.futures.Future[tuple[int, np.ndarray | SegLockError]]] = set()
            try:
                while True:
                    for index, image in source:
                        pending.add(pool.submit(one, index, image))
                        if len(pending) >= concurrency:
                            break
                    if not pending:
                        return
                    done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            finally:
                for future in pending:
                    future.cancel()

    def segment_many(self, images: Iterable[ImageInput], model: str, *, concurrency: int = DEFAULT_CONCURRENCY,
                     return_exceptions: bool = False) -> list[np.ndarray | SegLockError]:
        """Masks in the order of `images`, with at most `concurrency` requests in flight.

        The first error is raised (and no new request is started) unless `return_exceptions`,
        in which case failed images hold their exception in the list.
        """
        results: dict[int, np.ndarray | SegLockError] = {}
        with contextlib.closing(self.iter_segment(images, model, concurrency=concurrency)) as stream:
            for index, result in stream:
                if isinstance(result, SegLockError) and not return_exceptions:
                    raise result
                results[index] = result
        return [results[i] for i in range(len(results))]

    # -- internals --------------------------------------------------------------------------

    def _model(self, name: str) -> ModelInfo:
        info = self._known(name)
        if info is None:
            self.models()
            info = self._known(name)
            if info is None:
                # unlisted: ask about it directly, so the server says 404 (unknown) or 403 (not granted)
                with contextlib.suppress(InvalidInput):
                    self._request("GET", _model_path(name, "client-key"))
                raise self._not_available(name)
        _check_mode(info)
        return info

    def _block_key(self, info: ModelInfo) -> tuple[int, BlockKey]:
        with self._lock:
            cached = self._keys.get(info.name)
            if cached is None:
                cached = _key_from(_json(self._request("GET", _model_path(info.name, "client-key"))), info)
                self._keys[info.name] = cached
            return cached

    def _forget_key(self, name: str, version: int) -> None:
        with self._lock:
            if name in self._keys and self._keys[name][0] == version:
                del self._keys[name]

    def _post(self, info: ModelInfo, upload: _Upload) -> httpx.Response:
        return self._request("POST", _model_path(info.name, "segment"),
                             files={"image": (upload.filename, upload.content, upload.content_type)},
                             headers={"Accept": "image/png", **upload.headers})

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        retry = 0
        while True:
            try:
                result: httpx.Response | httpx.HTTPError = self._http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                result = exc
            response, error, retryable, retry_after = self._outcome(result)
            if response is not None:
                return response
            assert error is not None  # _outcome gives a response or an error
            if not retryable or retry >= self.retry_policy.retries:
                raise error
            self._sleep(self.retry_policy.delay(retry, retry_after))
            retry += 1


class AsyncSegLockClient(_ClientBase):
    """The asyncio twin of `SegLockClient`: the same methods, awaited; CPU work runs in threads.

        async with AsyncSegLockClient("http://127.0.0.1:8000", token) as client:
            masks = await client.segment_many(paths, "demo-per-image", concurrency=8)
    """

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retries: int | RetryPolicy = 3, lossless: bool = True,
                 encrypted_format: Literal["npy", "png"] = "npy",
                 transport: httpx.AsyncBaseTransport | None = None, verify: Any = True,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        super().__init__(base_url, token, timeout=timeout, retries=retries, lossless=lossless,
                         encrypted_format=encrypted_format)
        self._sleep = sleep
        self._locks: dict[str, asyncio.Lock] = {}
        self._http = httpx.AsyncClient(transport=transport, verify=verify, **self._http_kwargs())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSegLockClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def models(self) -> list[ModelInfo]:
        return self._remember(_json(await self._request("GET", "/v1/models")))

    async def segment(self, image: ImageInput, model: str) -> np.ndarray:
        info = await self._model(model)
        if not info.encrypts_input:
            upload = await asyncio.to_thread(_plain_upload, image, self.lossless)
            response = await self._post(info, upload)
            return await asyncio.to_thread(_mask_from, response, upload)
        model_array, image_size = await asyncio.to_thread(_model_array, image, info)
        for attempt in range(2):
            key = await self._block_key(info) if _is_block(info) else None
            upload = await asyncio.to_thread(_encrypted_upload, model_array, image_size, info, key,
                                             self.encrypted_format)
            try:
                response = await self._post(info, upload)
            except KeyVersionConflict:
                if attempt or key is None:
                    raise
                self._forget_key(info.name, key[0])
                continue
            return await asyncio.to_thread(_mask_from, response, upload)
        raise AssertionError("unreachable")

    async def iter_segment(self, images: Iterable[ImageInput], model: str, *,
                           concurrency: int = DEFAULT_CONCURRENCY
                           ) -> AsyncGenerator[tuple[int, np.ndarray | SegLockError], None]:
        """(index, mask or SegLockError) as each image finishes; at most `concurrency` in flight."""
        concurrency = _check_concurrency(concurrency)
        info = await self._model(model)
        if _is_block(info):
            await self._block_key(info)

        async def one(index: int, image: ImageInput) -> tuple[int, np.ndarray | SegLockError]:
            try:
                return index, await self.segment(image, model)
            except SegLockError as exc:
                return index, exc

        source = enumerate(images)
        pending: set[asyncio.Task[tuple[int, np.ndarray | SegLockError]]] = set()
        try:
            while True:
                for index, image in source:
                    pending.add(asyncio.ensure_future(one(index, image)))
                    if len(pending) >= concurrency:
                        break
                if not pending:
                    return
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def segment_many(self, images: Iterable[ImageInput], model: str, *,
                           concurrency: int = DEFAULT_CONCURRENCY,
                           return_exceptions: bool = False) -> list[np.ndarray | SegLockError]:
        results: dict[int, np.ndarray | SegLockError] = {}
        async with contextlib.aclosing(self.iter_segment(images, model, concurrency=concurrency)) as stream:
            async for index, result in stream:
                if isinstance(result, SegLockError) and not return_exceptions:
                    raise result
                results[index] = result
        return [results[i] for i in range(len(results))]

    async def _model(self, name: str) -> ModelInfo:
        info = self._known(name)
        if info is None:
            await self.models()
            info = self._known(name)
            if info is None:
                with contextlib.suppress(InvalidInput):
                    await self._request("GET", _model_path(name, "client-key"))
                raise self._not_available(name)
        _check_mode(info)
        return info

    async def _block_key(self, info: ModelInfo) -> tuple[int, BlockKey]:
        lock = self._locks.setdefault(info.name, asyncio.Lock())
        async with lock:  # concurrent first calls fetch the key once
            cached = self._keys.get(info.name)
            if cached is None:
                cached = _key_from(_json(await self._request("GET", _model_path(info.name, "client-key"))), info)
                self._keys[info.name] = cached
            return cached

    def _forget_key(self, name: str, version: int) -> None:
        if name in self._keys and self._keys[name][0] == version:
            del self._keys[name]

    async def _post(self, info: ModelInfo, upload: _Upload) -> httpx.Response:
        return await self._request("POST", _model_path(info.name, "segment"),
                                   files={"image": (upload.filename, upload.content, upload.content_type)},
                                   headers={"Accept": "image/png", **upload.headers})

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        retry = 0
        while True:
            try:
                result: httpx.Response | httpx.HTTPError = await self._http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                result = exc
            response, error, retryable, retry_after = self._outcome(result)
            if response is not None:
                return response
            assert error is not None  # _outcome gives a response or an error
            if not retryable or retry >= self.retry_policy.retries:
                raise error
            await self._sleep(self.retry_policy.delay(retry, retry_after))
            retry += 1
