"""The SDK against a real seglock app on loopback: masks, modes, privacy, key cache, async twin."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from seglock.client import (
    AsyncSegLockClient,
    AuthenticationError,
    InvalidInput,
    ModelNotFound,
    PermissionDenied,
    RetryPolicy,
    SegLockClient,
)
from seglock.client import sdk as sdk_module
from seglock.client.imaging import resize_rgb
from seglock.client.transforms import encrypt_blocks
from tests.client_fixtures import hosted, png, run  # noqa: F401 - hosted is a fixture
from tests.server_fixtures import INPUT
from tests.server_fixtures import scene as noise

ALL_MODELS = ["cp", "ffx", "np", "per-image", "plain", "shf"]
DETERMINISTIC = ["plain", "cp", "shf", "np", "ffx"]
BLOCK = ["shf", "np", "ffx"]


@pytest.fixture
def client(hosted):
    with SegLockClient(hosted["url"], hosted["tokens"]["client"]) as sdk:
        yield sdk


def server_side_mask(hosted, model: str, image: np.ndarray) -> np.ndarray:
    """The server-side path: the plain image uploaded as is; the server resizes and encrypts."""
    response = httpx.post(f"{hosted['url']}/v1/models/{model}/segment", files={"image": ("x.png", png(image))},
                          headers={"Authorization": f"Bearer {hosted['tokens']['client']}"})
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_models_lists_every_granted_model_with_its_mode_and_input_size(client):
    infos = {info.name: info for info in client.models()}
    assert sorted(infos) == ALL_MODELS
    assert {name: info.mode for name, info in infos.items()} == {
        "cp": "cp", "ffx": "ffx", "np": "np", "per-image": "per-image", "plain": "none", "shf": "shf"}
    shf = infos["shf"]
    assert shf.input_size == (INPUT, INPUT) and shf.key_version == 1 and shf.protection["block_size"] == 4
    assert shf.class_names == ("background", "disc", "square") and shf.num_classes == 3
    assert infos["per-image"].protection == {"mode": "per-image", "block_size": 16, "sub_block": 4}
    assert [name for name, info in infos.items() if info.encrypts_input] == ["ffx", "np", "per-image", "shf"]


def test_a_limited_token_sees_only_its_models(hosted):
    with SegLockClient(hosted["url"], hosted["tokens"]["plain-only"]) as sdk:
        assert [info.name for info in sdk.models()] == ["plain"]


@pytest.mark.parametrize("model", DETERMINISTIC)
def test_mask_equals_the_server_side_path_at_the_images_own_size(client, hosted, model):
    for seed in range(3):
        image = noise(seed, 48, 40)
        mask = client.segment(image, model)
        assert mask.shape == (48, 40) and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, server_side_mask(hosted, model, image))
    assert len(np.unique(mask)) > 1  # the fixture models answer more than one class


def test_per_image_mask_has_the_images_size_and_valid_classes(client):
    mask = client.segment(noise(3, 50, 60), "per-image")
    assert mask.shape == (50, 60) and mask.dtype == np.uint8 and int(mask.max()) < 3


@pytest.mark.parametrize("model", ["plain", "shf"])
def test_path_bytes_pil_and_array_inputs_give_the_same_mask(client, tmp_path, model):
    image = noise(5, 40, 56)
    path = tmp_path / "image.png"
    path.write_bytes(png(image))
    expected = client.segment(image, model)
    for source in (path, str(path), png(image), Image.fromarray(image), io.BytesIO(png(image))):
        np.testing.assert_array_equal(client.segment(source, model), expected)


def test_greyscale_and_rgba_arrays_are_read_as_the_server_reads_them(client):
    grey = noise(6, 32, 32)[:, :, 0]
    np.testing.assert_array_equal(client.segment(grey, "shf"), client.segment(np.dstack([grey] * 3), "shf"))
    opaque = np.dstack([noise(7, 32, 32), np.full((32, 32), 255, np.uint8)])
    np.testing.assert_array_equal(client.segment(opaque, "shf"), client.segment(opaque[:, :, :3], "shf"))


def test_unreadable_images_are_invalid_input_before_any_request(client, hosted, tmp_path):
    hosted["recorder"].clear()
    for bad in (b"not an image", tmp_path / "missing.png", np.zeros((4, 4, 3), np.float32), 42):
        with pytest.raises(InvalidInput):
            client.segment(bad, "shf")
    assert hosted["recorder"].segment_requests("shf") == []


# -- what leaves the machine ------------------------------------------------------------------

@pytest.mark.parametrize("model", BLOCK)
def test_block_models_receive_exactly_the_locally_encrypted_image(client, hosted, model):
    image = noise(8, 48, 40)
    hosted["recorder"].clear()
    client.segment(image, model)
    [received] = hosted["recorder"].segment_requests(model)
    upload = received.upload_array()
    plain_input = resize_rgb(image, (INPUT, INPUT))
    np.testing.assert_array_equal(upload, encrypt_blocks(plain_input, hosted["keys"][model]))
    assert received.headers["x-seglock-key-version"] == "1"
    assert upload.dtype == (np.uint16 if model == "ffx" else np.uint8)
    assert received.upload().startswith(b"\x93NUMPY")
    assert not np.array_equal(upload.astype(np.int64), plain_input.astype(np.int64))
    assert png(image) not in received.body and png(plain_input) not in received.body


@pytest.mark.parametrize("model", ["shf", "per-image"])
def test_encrypted_uint8_inputs_can_travel_as_png_with_the_same_mask(hosted, model):
    image = noise(13, 32, 32)
    with SegLockClient(hosted["url"], hosted["tokens"]["client"], encrypted_format="png") as sdk:
        hosted["recorder"].clear()
        mask = sdk.segment(image, model)
    [received] = hosted["recorder"].segment_requests(model)
    assert received.upload().startswith(b"\x89PNG") and mask.shape == (32, 32)
    if model == "shf":
        np.testing.assert_array_equal(received.upload_array(), encrypt_blocks(image, hosted["keys"]["shf"]))
        np.testing.assert_array_equal(mask, server_side_mask(hosted, "shf", image))


def test_per_image_model_receives_a_block_wise_scramble_with_a_new_key_each_time(client, hosted):
    image = noise(9, 32, 32)
    hosted["recorder"].clear()
    client.segment(image, "per-image")
    client.segment(image, "per-image")
    first, second = hosted["recorder"].segment_requests("per-image")
    a, b = first.upload_array(), second.upload_array()
    assert not np.array_equal(a, image) and not np.array_equal(a, b)
    for upload in (a, b):  # every 16x16 block holds exactly its own pixel values, rearranged
        for y in (0, 16):
            for x in (0, 16):
                np.testing.assert_array_equal(np.sort(upload[y:y + 16, x:x + 16].reshape(-1)),
                                              np.sort(image[y:y + 16, x:x + 16].reshape(-1)))
    assert first.headers["x-seglock-encrypted"] == "per-image" and "x-seglock-key-version" not in first.headers
    assert not [r for r in hosted["recorder"].received if r.path.endswith("/client-key")]


def test_plain_models_receive_the_file_unchanged_or_the_arrays_pixels(client, hosted, tmp_path):
    image = noise(10, 30, 20)
    jpeg = io.BytesIO()
    Image.fromarray(image).save(jpeg, format="JPEG", quality=80)
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg.getvalue())
    png = tmp_path / "same.png"
    Image.fromarray(image).save(png, format="PNG")
    hosted["recorder"].clear()
    client.segment(path, "cp")
    from_array_mask = client.segment(image, "cp")
    from_png_mask = client.segment(png, "cp")
    from_file, from_array, from_png = hosted["recorder"].segment_requests("cp")
    assert from_file.upload() == jpeg.getvalue() and from_png.upload() == png.read_bytes()
    # a decoded image goes as its pixels (.npy: no PNG to compress here and decompress there)
    assert from_array.upload().startswith(b"\x93NUMPY")
    np.testing.assert_array_equal(from_array.upload_array(), image)
    np.testing.assert_array_equal(from_array_mask, from_png_mask)


def test_a_decoded_image_above_the_npy_limit_goes_as_a_png(client, hosted, monkeypatch):
    image = noise(12, 30, 20)
    monkeypatch.setattr(sdk_module, "NPY_MAX_BYTES", image.nbytes - 1)
    hosted["recorder"].clear()
    mask = client.segment(image, "cp")
    (upload,) = hosted["recorder"].segment_requests("cp")
    assert upload.upload().startswith(b"\x89PNG")
    np.testing.assert_array_equal(upload.upload_array(), image)
    monkeypatch.setattr(sdk_module, "NPY_MAX_BYTES", image.nbytes)
    hosted["recorder"].clear()
    np.testing.assert_array_equal(client.segment(image, "cp"), mask)
    (upload,) = hosted["recorder"].segment_requests("cp")
    assert upload.upload().startswith(b"\x93NUMPY")


# -- the block key cache ----------------------------------------------------------------------

def test_the_block_key_is_fetched_once_and_reused(hosted):
    hosted["recorder"].clear()
    with SegLockClient(hosted["url"], hosted["tokens"]["client"]) as sdk:
        for seed in range(3):
            sdk.segment(noise(seed), "shf")
        sdk.segment_many([noise(seed) for seed in range(6)], "shf", concurrency=3)
    fetches = [r for r in hosted["recorder"].received if r.path == "/v1/models/shf/client-key"]
    assert len(fetches) == 1 and len(hosted["recorder"].segment_requests("shf")) == 9


def test_a_stale_cached_key_version_is_refetched_and_the_request_retried_once(client, hosted):
    image = noise(11)
    expected = client.segment(image, "shf")
    version, key = client._keys["shf"]
    client._keys["shf"] = (version + 7, key)  # as if the server had moved on since the key was cached
    hosted["recorder"].clear()
    np.testing.assert_array_equal(client.segment(image, "shf"), expected)
    sent = [(r.path.rsplit("/", 1)[1], r.headers.get("x-seglock-key-version")) for r in hosted["recorder"].received]
    assert sent == [("segment", str(version + 7)), ("client-key", None), ("segment", str(version))]
    assert client._keys["shf"][0] == version


# -- many images, errors, tokens ----------------------------------------------------------------

def test_segment_many_keeps_the_order_of_the_images(client):
    images = [noise(seed, 24 + 8 * (seed % 3), 32) for seed in range(7)]
    masks = client.segment_many(images, "np", concurrency=3)
    assert [m.shape for m in masks] == [i.shape[:2] for i in images]
    for image, mask in zip(images, masks, strict=False):
        np.testing.assert_array_equal(mask, client.segment(image, "np"))


def test_segment_many_returns_or_raises_the_errors_of_single_images(client):
    images = [noise(0), b"broken", noise(1)]
    results = client.segment_many(images, "plain", return_exceptions=True)
    assert isinstance(results[1], InvalidInput) and results[0].shape == results[2].shape == (48, 40)
    with pytest.raises(InvalidInput):
        client.segment_many(images, "plain")


def test_a_rate_limited_client_waits_as_the_server_says_and_gets_every_mask(hosted):
    from seglock.app.ratelimit import RateLimiter

    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(0.21)  # the bucket below refills one request in 0.2 s; the server asks for 1 s

    app = hosted["recorder"].app
    with SegLockClient(hosted["url"], hosted["tokens"]["client"], sleep=sleep,
                       retries=RetryPolicy(retries=5, random=lambda: 0.5)) as sdk:
        sdk.models()
        app.state.rate_limiter = RateLimiter(rate=5, burst=1)
        try:
            masks = sdk.segment_many([noise(seed) for seed in range(3)], "plain", concurrency=1)
        finally:
            app.state.rate_limiter = None
    assert [mask.shape for mask in masks] == [(48, 40)] * 3
    assert waits and set(waits) == {1.0}


def test_server_errors_arrive_as_typed_exceptions(hosted):
    with SegLockClient(hosted["url"], hosted["tokens"]["plain-only"]) as sdk:
        with pytest.raises(PermissionDenied) as denied:
            sdk.segment(noise(0), "cp")
        assert denied.value.status == 403 and denied.value.code == "forbidden"
    # a token granted every model learns that a name is unknown; a limited one gets 403 for any
    # model it is not granted, so it cannot probe which models exist (issue 13)
    with SegLockClient(hosted["url"], hosted["tokens"]["client"]) as sdk:
        with pytest.raises(ModelNotFound) as missing:
            sdk.segment(noise(0), "no-such-model")
        assert missing.value.status == 404 and missing.value.code == "not_found"
    bad_token = "slk_000000000000_" + "7" * 64
    with SegLockClient(hosted["url"], bad_token) as sdk:
        with pytest.raises(AuthenticationError) as refused:
            sdk.models()
    assert refused.value.status == 401 and refused.value.request_id
    assert bad_token not in str(refused.value) and bad_token not in repr(refused.value)
    assert "7" * 64 not in repr(sdk) and "7" * 64 not in repr(sdk._http.auth)


def test_the_token_can_come_from_the_environment(hosted, monkeypatch):
    monkeypatch.setenv("SEGLOCK_TOKEN", hosted["tokens"]["client"])
    with SegLockClient(hosted["url"]) as sdk:
        assert "plain" in [info.name for info in sdk.models()]
    monkeypatch.delenv("SEGLOCK_TOKEN")
    with pytest.raises(AuthenticationError, match="SEGLOCK_TOKEN"):
        SegLockClient(hosted["url"])


# -- the async twin ----------------------------------------------------------------------------

def test_async_client_gives_the_sync_clients_masks(client, hosted):
    images = [noise(seed, 40, 36) for seed in range(4)]

    async def go():
        async with AsyncSegLockClient(hosted["url"], hosted["tokens"]["client"]) as sdk:
            names = [info.name for info in await sdk.models()]
            single = {model: await sdk.segment(images[0], model) for model in DETERMINISTIC}
            many = await sdk.segment_many(images, "shf", concurrency=2)
            per_image = await sdk.segment(images[1], "per-image")
            return names, single, many, per_image

    names, single, many, per_image = run(go())
    assert sorted(names) == ALL_MODELS
    for model, mask in single.items():
        np.testing.assert_array_equal(mask, client.segment(images[0], model))
    for image, mask in zip(images, many, strict=False):
        np.testing.assert_array_equal(mask, client.segment(image, "shf"))
    assert per_image.shape == (40, 36)


def test_async_client_refetches_a_stale_key_once(hosted):
    async def go():
        async with AsyncSegLockClient(hosted["url"], hosted["tokens"]["client"]) as sdk:
            first = await sdk.segment(noise(12), "ffx")
            version, key = sdk._keys["ffx"]
            sdk._keys["ffx"] = (version + 1, key)
            hosted["recorder"].clear()
            second = await sdk.segment(noise(12), "ffx")
            return first, second, version, sdk._keys["ffx"][0]

    first, second, version, now = run(go())
    np.testing.assert_array_equal(first, second)
    assert now == version and len(hosted["recorder"].segment_requests("ffx")) == 2
