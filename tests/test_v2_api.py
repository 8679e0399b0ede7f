"""The /v2 Open Inference Protocol routes in process: wire format, auth, grants, limits, metrics, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient

from seglock.app import oip
from seglock.app.errors import APIError
from seglock.app.home import Home
from seglock.app.main import create_app
from seglock.app.settings import Settings
from tests.server_fixtures import INPUT, MASTER_KEY, make_artifacts, open_keystore, png_bytes, scene


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2api")
    home = root / "home"
    keystore = open_keystore(home)
    for path, key in make_artifacts(root / "artifacts").values():
        Home(home, keystore).import_artifact(path, key=key)
    tokens = {
        "client": keystore.create_token("client", ["segment"], ["*"])[1],
        "plain-only": keystore.create_token("limited", ["segment"], ["plain"])[1],
        "admin-only": keystore.create_token("ops", ["admin"], ["*"])[1],
    }
    previous = os.environ.get("SEGLOCK_MASTER_KEY")
    os.environ["SEGLOCK_MASTER_KEY"] = MASTER_KEY
    settings = Settings(home=home, import_demo=False, max_batch=4, max_wait_ms=2, max_body_bytes=300_000,
                        max_pixels=1_000_000, queue_size=8, rate_limit_rps=0.5, rate_limit_burst=40)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield {"client": client, "tokens": tokens}
    if previous is None:
        os.environ.pop("SEGLOCK_MASTER_KEY", None)
    else:
        os.environ["SEGLOCK_MASTER_KEY"] = previous


def auth(server, who="client") -> dict:
    return {"Authorization": f"Bearer {server['tokens'][who]}"}


def binary_request(images: np.ndarray, *, outputs=None, parameters=None, datatype="UINT8") -> tuple[bytes, dict]:
    header = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": datatype,
                          "parameters": {"binary_data_size": images.nbytes}}]}
    if outputs is not None:
        header["outputs"] = outputs
    if parameters is not None:
        header["parameters"] = parameters
    text = json.dumps(header).encode()
    return text + images.tobytes(), {oip.HEADER_LENGTH: str(len(text))}


def infer(server, model, body: bytes, headers=None, who="client"):
    return server["client"].post(f"/v2/models/{model}/infer", content=body,
                                 headers={**auth(server, who), **(headers or {})})


def protocol_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


def v1_mask(server, model, image) -> np.ndarray:
    import io

    from PIL import Image

    response = server["client"].post(f"/v1/models/{model}/segment", files={"image": ("x.png", png_bytes(image))},
                                      headers=auth(server))
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


# -- the codec, as pure functions ---------------------------------------------------------------

def parse(body: bytes, header_length=None):
    return oip.parse_request(body, header_length, max_pixels=10_000, max_images=4)


def test_parse_binary_input_reads_the_bytes_after_the_header():
    images = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
    body, headers = binary_request(images)
    parsed = parse(body, headers[oip.HEADER_LENGTH])
    assert parsed.image.dtype == np.uint8 and np.array_equal(parsed.image, images)
    assert parsed.outputs == [oip.RequestedOutput("mask", False)]


def test_parse_json_input_accepts_flat_and_nested_data():
    images = np.arange(1 * 2 * 2 * 3, dtype=np.uint16).reshape(1, 2, 2, 3) * 1000
    for data in (images.reshape(-1).tolist(), images.tolist()):
        body = json.dumps({"inputs": [{"name": "image", "shape": [1, 2, 2, 3], "datatype": "UINT16",
                                       "data": data}]}).encode()
        parsed = parse(body)
        assert parsed.image.dtype == np.uint16 and np.array_equal(parsed.image, images)


def one_input(**fields) -> dict:
    return {"inputs": [{"name": "image", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [1, 2, 3], **fields}]}


@pytest.mark.parametrize("header, status, words", [
    (one_input(name="pixels"), 400, "unknown input"),
    (one_input(datatype="FP32"), 422, "UINT8"),
    (one_input(shape=[1, 1, 3]), 422, "NHWC"),
    (one_input(data=[1, 2]), 422, "needs 3 values"),
    (one_input(data=[1, 2, 256]), 422, "0..255"),
    (one_input(data=[1, 2.5, 3]), 400, "integers"),
    (one_input(data=[[1], [2, 3]]), 400, "regular"),
    ({"inputs": [{"name": "image", "shape": [9, 1, 1, 3], "datatype": "UINT8", "data": [0] * 27}]}, 413, "at most 4"),
    ({"inputs": [{"name": "image", "shape": [1, 101, 100, 3], "datatype": "UINT8", "data": [0]}]}, 413, "pixels"),
    ({"inputs": [{"name": "image", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [1, 2, 3]}],
      "outputs": [{"name": "logits"}]}, 400, "unknown output"),
    ({"inputs": []}, 400, "non-empty"),
    ([1, 2], 400, "JSON object"),
])
def test_parse_rejects_malformed_requests_with_a_clear_4xx(header, status, words):
    with pytest.raises(APIError) as error:
        parse(json.dumps(header).encode())
    assert error.value.status == status and words in error.value.message


def test_parse_rejects_binary_sizes_that_do_not_add_up():
    images = np.zeros((1, 2, 2, 3), np.uint8)
    body, headers = binary_request(images)
    with pytest.raises(APIError, match="no input declares"):
        parse(body + b"\0", headers[oip.HEADER_LENGTH])
    with pytest.raises(APIError, match="left"):
        parse(body[:-1], headers[oip.HEADER_LENGTH])
    for bad in ("abc", "0", str(len(body) + 1)):
        with pytest.raises(APIError, match="Inference-Header-Content-Length"):
            parse(body, bad)


def test_encode_response_puts_binary_outputs_after_the_header_in_order():
    mask = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    score = np.full((1, 2, 3), 0.5, np.float32)
    body, length = oip.encode_response(
        model_name="m", model_version="2", request_id="r1",
        outputs=[(oip.RequestedOutput("mask", True), mask), (oip.RequestedOutput("score", False), score)])
    header = json.loads(body[:length])
    assert header["id"] == "r1" and header["model_version"] == "2"
    assert header["outputs"][0] == {"name": "mask", "datatype": "UINT8", "shape": [1, 2, 3],
                                    "parameters": {"binary_data_size": 6}}
    assert header["outputs"][1]["data"] == [0.5] * 6
    assert body[length:] == mask.tobytes()


# -- the routes ----------------------------------------------------------------------------------

def test_health_and_server_metadata_need_no_token(server):
    client = server["client"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]


def test_model_metadata_names_the_batch_the_cpu_forward_was_tuned_to(server):
    meta = server["client"].get("/v2/models/plain", headers=auth(server)).json()
    batcher = server["client"].app.state.registry.current("plain").batcher
    assert meta["parameters"]["max_batch"] == batcher.max_batch
    assert 1 <= batcher.max_batch <= 4  # --max-batch 4 bounds the tuned batch


def test_infer_without_a_token_is_401_in_protocol_form(server):
    body, headers = binary_request(scene(0)[None])
    response = server["client"].post("/v2/models/plain/infer", content=body, headers=headers)
    assert "Authorization" in protocol_error(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


def test_scope_and_grant_are_checked_like_v1(server):
    body, headers = binary_request(scene(0)[None])
    assert "segment" in protocol_error(infer(server, "plain", body, headers, who="admin-only"), 403)
    assert "not granted" in protocol_error(infer(server, "cp", body, headers, who="plain-only"), 403)
    assert "not granted" in protocol_error(
        server["client"].get("/v2/models/cp", headers=auth(server, "plain-only")), 403)
    assert infer(server, "plain", body, headers, who="plain-only").status_code == 200


def test_unknown_model_and_unknown_version_are_404(server):
    body, headers = binary_request(scene(0)[None])
    assert "unknown model" in protocol_error(infer(server, "nope", body, headers), 404)
    response = server["client"].post("/v2/models/plain/versions/7/infer", content=body,
                                     headers={**auth(server), **headers})
    assert "serves version 1" in protocol_error(response, 404)
    response = server["client"].post("/v2/models/plain/versions/1/infer", content=body,
                                     headers={**auth(server), **headers})
    assert response.status_code == 200


def test_binary_answer_matches_v1_for_each_image_of_a_batch(server):
    images = np.stack([scene(1), scene(2), scene(3)])
    body, headers = binary_request(images, outputs=[{"name": "mask", "parameters": {"binary_data": True}}])
    response = infer(server, "cp", body, headers)
    assert response.status_code == 200, response.text
    length = int(response.headers[oip.HEADER_LENGTH])
    assert response.headers["content-type"] == "application/octet-stream"
    header = json.loads(response.content[:length])
    assert header["outputs"][0]["shape"] == [3, 48, 40]
    masks = np.frombuffer(response.content[length:], np.uint8).reshape(3, 48, 40)
    for image, mask in zip(images, masks, strict=True):
        assert np.array_equal(mask, v1_mask(server, "cp", image))


def test_encrypted_input_is_refused_for_a_plain_model_and_needs_the_key_version_for_block(server):
    images = np.zeros((1, INPUT, INPUT, 3), np.uint8)
    body, headers = binary_request(images, parameters={"encrypted": True})
    assert "send a plain image" in protocol_error(infer(server, "plain", body, headers), 400)
    assert "key_version" in protocol_error(infer(server, "shf", body, headers), 409)
    body, headers = binary_request(images, parameters={"key_version": 2})
    assert "stale" in protocol_error(infer(server, "shf", body, headers), 409)
    body, headers = binary_request(images, parameters={"key_version": 1})
    assert infer(server, "shf", body, headers).status_code == 200
    body, headers = binary_request(np.zeros((1, 8, 8, 3), np.uint8), parameters={"encrypted": True})
    assert "exactly 32x32" in protocol_error(infer(server, "per-image", body, headers), 422)


def test_too_large_body_is_413_in_protocol_form(server):
    images = np.zeros((1, 200, 200, 3), np.uint8)  # 120 kB, then padded past the 300 kB limit
    body, headers = binary_request(images)
    response = server["client"].post("/v2/models/plain/infer", content=iter([body, b"\0" * 300_000]),
                                     headers={**auth(server), **headers})
    assert "limit" in protocol_error(response, 413)


def test_infer_is_counted_under_its_route_template(server):
    body, headers = binary_request(scene(4)[None])
    assert infer(server, "plain", body, headers).status_code == 200
    text = server["client"].get("/metrics", headers=auth(server, "admin-only")).text  # admin tokens only
    assert 'route="/v2/models/{name}/infer",status="200"' in text


def test_rate_limit_applies_to_v2_as_to_v1(server):
    body, headers = binary_request(scene(5)[None])
    statuses = [infer(server, "plain", body, headers, who="plain-only").status_code for _ in range(45)]
    assert 429 in statuses
    response = infer(server, "plain", body, headers, who="plain-only")
    assert "limit" in protocol_error(response, 429) and int(response.headers["retry-after"]) >= 1
