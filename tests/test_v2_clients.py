"""Open Inference Protocol conformance with the real clients: tritonclient[http] (sync and aio,
binary and JSON tensors) and kserve's InferenceRESTClient against a live `seglock serve`, for a
plain, a CP, a block (demo-shf) and a per-image model; every mask byte-identical to /v1's."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from seglock.client.transforms import BlockKey, encrypt_blocks, encrypt_per_image
from seglock.models.data import generate_scene
from tests.server_fixtures import live_server, npy_bytes, png_bytes

tritonhttp = pytest.importorskip("tritonclient.http")
tritonaio = pytest.importorskip("tritonclient.http.aio")
kserve = pytest.importorskip("kserve")
from tritonclient.utils import InferenceServerException  # noqa: E402 - after the importorskip

DEMOS = ["demo-plain", "demo-cp", "demo-shf", "demo-per-image"]
INPUT = 128  # the demo models' input size


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("v2") / "home") as server:
        server["tokens"] = json.loads((server["home"] / "initial-tokens.json").read_text())
        server["url"] = server["base"].removeprefix("http://")
        yield server


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def photo(index: int, height: int = 100, width: int = 90) -> np.ndarray:
    """A demo-like scene at a size the model does not take, so the server resizes both ways."""
    image, _ = generate_scene(seed=11, index=index, size=INPUT)
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def v1_mask(live, model: str, upload: bytes, *, filename="x.png", headers=None) -> np.ndarray:
    response = httpx.post(f"{live['base']}/v1/models/{model}/segment", files={"image": (filename, upload)},
                          headers={**bearer(live["tokens"]["client"]), **(headers or {})}, timeout=60)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def client_key(live, model: str) -> tuple[BlockKey, int]:
    response = httpx.get(f"{live['base']}/v1/models/{model}/client-key", headers=bearer(live["tokens"]["client"]))
    assert response.status_code == 200, response.text
    body = response.json()
    return BlockKey.from_dict(body["key"]), body["key_version"]


def cases(live, model: str):
    """(NHWC uint8 batch, request parameters, the /v1 masks of the same images) for `model`:
    plain photos (which the server encrypts for demo-shf), client-encrypted tensors for block and
    per-image models. (A plain photo sent to a per-image model gets a fresh random key on every call,
    so its masks are not comparable between two calls.)"""
    out = []
    if model != "demo-per-image":
        plain = np.stack([photo(0), photo(1)])
        expected = np.stack([v1_mask(live, model, png_bytes(image)) for image in plain])
        out.append((plain, {}, expected))
    if model == "demo-shf":
        key, version = client_key(live, model)
        images = np.stack([np.asarray(Image.fromarray(photo(i)).resize((INPUT, INPUT))) for i in (2, 3)])
        encrypted = encrypt_blocks(images, key)
        expected = np.stack([v1_mask(live, model, npy_bytes(e), filename="x.npy",
                                     headers={"X-Seglock-Key-Version": str(version)}) for e in encrypted])
        out.append((encrypted, {"key_version": version}, expected))
    if model == "demo-per-image":
        images = np.stack([np.asarray(Image.fromarray(photo(i)).resize((INPUT, INPUT))) for i in (4, 5)])
        encrypted = encrypt_per_image(images, block_size=16, sub_block=4)
        expected = np.stack([v1_mask(live, model, npy_bytes(e), filename="x.npy",
                                     headers={"X-Seglock-Encrypted": "per-image"}) for e in encrypted])
        out.append((encrypted, {"encrypted": True}, expected))
    return out


def triton_inputs(batch: np.ndarray, binary: bool):
    tensor = tritonhttp.InferInput("image", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return [tensor], [tritonhttp.InferRequestedOutput("mask", binary_data=binary)]


@pytest.mark.parametrize("model", DEMOS)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_sync_masks_equal_v1(live, model, binary):
    client = tritonhttp.InferenceServerClient(live["url"])
    headers = bearer(live["tokens"]["client"])
    for batch, parameters, expected in cases(live, model):
        inputs, outputs = triton_inputs(batch, binary)
        result = client.infer(model, inputs, outputs=outputs, headers=headers, parameters=parameters or None)
        mask = result.as_numpy("mask")
        assert mask.dtype == np.uint8 and mask.shape == expected.shape
        assert np.array_equal(mask, expected)
        assert result.get_response()["model_name"] == model


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_aio_masks_equal_v1(live, binary):
    expected_cases = {model: cases(live, model) for model in DEMOS}

    async def run():
        client = tritonaio.InferenceServerClient(live["url"])
        headers = bearer(live["tokens"]["client"])
        try:
            assert await client.is_server_live() and await client.is_server_ready()
            calls, wanted = [], []
            for model, model_cases in expected_cases.items():
                assert await client.is_model_ready(model, headers=headers)
                for batch, parameters, expected in model_cases:
                    inputs, outputs = triton_inputs(batch, binary)
                    calls.append(client.infer(model, inputs, outputs=outputs, headers=headers,
                                              parameters=parameters or None))
                    wanted.append(expected)
            results = await asyncio.gather(*calls)  # concurrent: they share the batchers
            return [r.as_numpy("mask") for r in results], wanted
        finally:
            await client.close()

    masks, wanted = asyncio.run(run())
    for mask, expected in zip(masks, wanted, strict=True):
        assert np.array_equal(mask, expected)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_kserve_rest_client_masks_equal_v1(live, binary):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    expected_cases = {model: cases(live, model) for model in DEMOS}

    async def run():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        headers = bearer(live["tokens"]["client"])
        masks, wanted = [], []
        try:
            assert await client.is_server_live(live["base"]) and await client.is_server_ready(live["base"])
            for model, model_cases in expected_cases.items():
                assert await client.is_model_ready(live["base"], model, headers=headers)
                for batch, parameters, expected in model_cases:
                    tensor = InferInput("image", list(batch.shape), "UINT8")
                    tensor.set_data_from_numpy(batch, binary_data=binary)
                    wanted_output = RequestedOutput("mask", parameters={"binary_data": binary})
                    request = InferRequest(model_name=model, infer_inputs=[tensor], parameters=parameters or None,
                                           request_outputs=[wanted_output])
                    response = await client.infer(live["base"], request, model_name=model, headers=dict(headers))
                    masks.append(response.outputs[0].as_numpy())
                    wanted.append(expected)
        finally:
            await client.close()
        return masks, wanted

    masks, wanted = asyncio.run(run())
    for mask, expected in zip(masks, wanted, strict=True):
        assert mask.shape == expected.shape and np.array_equal(mask.astype(np.uint8), expected)


def test_server_and_model_metadata(live):
    client = tritonhttp.InferenceServerClient(live["url"])
    headers = bearer(live["tokens"]["client"])
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "seglock" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("demo-shf", headers=headers)
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
    assert [o["name"] for o in meta["outputs"]] == ["mask", "score"]
    assert meta["parameters"]["protection"] == "shf" and meta["parameters"]["input_size"] == [INPUT, INPUT]
    version = meta["versions"][0]
    assert client.get_model_metadata("demo-shf", version, headers=headers)["name"] == "demo-shf"
    assert client.is_model_ready("demo-shf", version, headers=headers)
    assert not client.is_model_ready("demo-shf", "999", headers=headers)


def test_score_output_comes_with_an_unchanged_mask(live):
    client = tritonhttp.InferenceServerClient(live["url"])
    headers = bearer(live["tokens"]["client"])
    batch = np.stack([photo(6)])
    tensor = tritonhttp.InferInput("image", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    result = client.infer("demo-plain", [tensor], headers=headers, outputs=[
        tritonhttp.InferRequestedOutput("mask"), tritonhttp.InferRequestedOutput("score")])
    mask, score = result.as_numpy("mask"), result.as_numpy("score")
    assert np.array_equal(mask[0], v1_mask(live, "demo-plain", png_bytes(batch[0])))
    assert score.dtype == np.float32 and score.shape == mask.shape
    assert score.min() >= 1 / 6 - 1e-6 and score.max() <= 1.0  # the argmax class of 6 has at least 1/6


def test_errors_reach_tritonclient_as_protocol_errors(live):
    client = tritonhttp.InferenceServerClient(live["url"])
    batch = np.stack([photo(7)])
    inputs, outputs = triton_inputs(batch, True)
    with pytest.raises(InferenceServerException) as no_token:
        client.infer("demo-plain", inputs, outputs=outputs)
    assert no_token.value.status() == "401" and "Authorization" in no_token.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", inputs, outputs=outputs, headers=bearer(live["tokens"]["client"]))
    # the initial client token is granted the demo models only: an unknown name is refused as an
    # ungranted one is (403), so it learns nothing of which models exist
    assert unknown.value.status() == "403"
    _, version = client_key(live, "demo-shf")
    encrypted = np.zeros((1, INPUT, INPUT, 3), np.uint8)
    inputs, outputs = triton_inputs(encrypted, True)
    with pytest.raises(InferenceServerException) as stale:
        client.infer("demo-shf", inputs, outputs=outputs, headers=bearer(live["tokens"]["client"]),
                     parameters={"key_version": version + 1})
    assert stale.value.status() == "409" and "stale" in stale.value.message()
