"""The HTTP API in process: every route of DESIGN's table and every error status."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from seglock.app.home import Home
from seglock.app.imageio import resize_mask, resize_rgb
from seglock.app.main import create_app
from seglock.app.settings import Settings
from seglock.client.transforms import BlockKey, encrypt_blocks, encrypt_per_image
from seglock.models import load_artifact
from seglock.models.inputs import model_input
from tests.server_fixtures import MASTER_KEY, make_artifacts, npy_bytes, open_keystore, png_bytes, scene


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    home = root / "home"
    artifacts = make_artifacts(root / "artifacts")
    keystore = open_keystore(home)
    for _name, (path, key) in artifacts.items():
        Home(home, keystore).import_artifact(path, key=key)
    tokens = {
        "admin": keystore.create_token("admin", ["admin", "segment"], ["*"])[1],
        "client": keystore.create_token("client", ["segment"], ["*"])[1],
        "plain-only": keystore.create_token("limited", ["segment"], ["plain"])[1],
        "admin-only": keystore.create_token("ops", ["admin"], [])[1],
    }
    previous = os.environ.get("SEGLOCK_MASTER_KEY")
    os.environ["SEGLOCK_MASTER_KEY"] = MASTER_KEY
    settings = Settings(home=home, import_demo=False, max_batch=4, max_wait_ms=2,
                        max_body_bytes=300_000, max_pixels=1_000_000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield {"client": client, "tokens": tokens, "home": home, "artifacts": artifacts}
    if previous is None:
        os.environ.pop("SEGLOCK_MASTER_KEY", None)
    else:
        os.environ["SEGLOCK_MASTER_KEY"] = previous


def auth(server, who="client") -> dict:
    return {"Authorization": f"Bearer {server['tokens'][who]}"}


def segment(server, model, data, *, who="client", headers=None, filename="x.png"):
    return server["client"].post(f"/v1/models/{model}/segment", files={"image": (filename, data)},
                                 headers={**auth(server, who), **(headers or {})})


def mask_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def local_mask(artifact_dir, image: np.ndarray, *, already_model_input=False) -> np.ndarray:
    """What the plain model computes for `image`, the way the server prepares it."""
    model, manifest = load_artifact(artifact_dir)
    resized = image if already_model_input else resize_rgb(image, tuple(manifest.input_size))
    with torch.no_grad():
        logits = model(model_input(torch.from_numpy(resized.copy())[None], manifest))
    mask = logits.argmax(1)[0].to(torch.uint8).numpy()
    return resize_mask(mask, image.shape[:2])


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]["code"]


def test_health_and_readiness(server):
    client = server["client"]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == 4  # a count: names are for granted tokens


def test_metrics_are_prometheus_text(server):
    segment(server, "plain", png_bytes(scene()))
    text = server["client"].get("/metrics", headers=auth(server, "admin")).text
    assert "seglock_requests_total" in text and 'route="/v1/models/{name}/segment"' in text
    assert "seglock_batch_size_bucket" in text and "seglock_queue_depth" in text


def test_models_list_needs_a_token(server):
    assert error_of(server["client"].get("/v1/models"), 401) == "unauthorized"
    bad = {"Authorization": "Bearer slk_000000000000_" + "0" * 64}
    assert error_of(server["client"].get("/v1/models", headers=bad), 401) == "unauthorized"
    assert error_of(server["client"].get("/v1/models", headers={"Authorization": "Basic abc"}), 401)


def test_models_list_shows_only_granted_models_with_public_parameters(server):
    every = server["client"].get("/v1/models", headers=auth(server)).json()["models"]
    assert sorted(m["name"] for m in every) == ["cp", "per-image", "plain", "shf"]
    shf = next(m for m in every if m["name"] == "shf")
    assert shf["protection"] == {"mode": "shf", "block_size": 4} and shf["key_version"] == 1
    assert "permutation" not in json.dumps(every)
    limited = server["client"].get("/v1/models", headers=auth(server, "plain-only")).json()["models"]
    assert [m["name"] for m in limited] == ["plain"]


def test_token_without_segment_scope_is_403(server):
    assert error_of(server["client"].get("/v1/models", headers=auth(server, "admin-only")), 403) == "forbidden"


def test_plain_model_mask_matches_the_model_at_the_original_size(server):
    image = scene(1, 48, 40)
    mask = mask_of(segment(server, "plain", png_bytes(image)))
    assert mask.shape == (48, 40)
    np.testing.assert_array_equal(mask, local_mask(server["artifacts"]["plain"][0], image))


def test_cp_model_served_with_its_key_folded_in_equals_the_plain_model(server):
    # the cp fixture is the plain model protected post hoc: with the key it is the same function
    for seed in range(3):
        image = scene(seed, 40, 56)
        np.testing.assert_array_equal(mask_of(segment(server, "cp", png_bytes(image))),
                                      mask_of(segment(server, "plain", png_bytes(image))))


def test_response_headers_name_model_and_key_versions(server):
    response = segment(server, "cp", png_bytes(scene()))
    assert response.headers["x-seglock-model"] == "cp"
    assert int(response.headers["x-seglock-key-version"]) >= 1
    assert response.headers["x-request-id"]


def test_json_answer_has_mask_size_classes_and_counts(server):
    image = scene(2, 20, 30)
    response = segment(server, "plain", png_bytes(image), headers={"Accept": "application/json"})
    body = response.json()
    mask = np.array(body["mask"], dtype=np.uint8)
    assert (body["height"], body["width"]) == (20, 30) and mask.shape == (20, 30)
    assert body["class_names"] == ["background", "disc", "square"]
    assert sum(body["counts"].values()) == 600
    np.testing.assert_array_equal(mask, local_mask(server["artifacts"]["plain"][0], image))


def test_grant_missing_is_403_and_unknown_model_is_404(server):
    assert error_of(segment(server, "cp", png_bytes(scene()), who="plain-only"), 403) == "forbidden"
    assert error_of(segment(server, "nope", png_bytes(scene())), 404) == "not_found"
    assert server["client"].post("/v1/models/..%2F..%2Fetc/segment", headers=auth(server),
                                 files={"image": ("x.png", png_bytes(scene()))}).status_code == 404


@pytest.mark.parametrize("data,status", [
    (b"not an image", 415),
    (b"", 400),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, 400),
])
def test_bad_images_get_their_4xx(server, data, status):
    error_of(segment(server, "plain", data), status)


def test_non_multipart_body_is_415_and_missing_field_is_400(server):
    client = server["client"]
    error_of(client.post("/v1/models/plain/segment", content=png_bytes(scene()),
                         headers={**auth(server), "Content-Type": "image/png"}), 415)
    error_of(client.post("/v1/models/plain/segment", files={"other": ("x.png", b"x")}, headers=auth(server)), 400)


def test_too_large_body_and_too_many_pixels_are_413(server):
    error_of(segment(server, "plain", b"\x00" * 400_000), 413)
    big = png_bytes(np.zeros((1100, 1000, 3), np.uint8))  # compresses well below the body limit
    error_of(segment(server, "plain", big), 413)


def test_block_model_client_key_and_client_side_encryption_match_the_server_side_path(server):
    client = server["client"]
    answer = client.get("/v1/models/shf/client-key", headers=auth(server)).json()
    key = BlockKey.from_dict(answer["key"])
    image = scene(3, 32, 32)
    encrypted = encrypt_blocks(image, key)
    by_client = mask_of(segment(server, "shf", png_bytes(encrypted),
                                headers={"X-Seglock-Key-Version": str(answer["key_version"])}))
    by_server = mask_of(segment(server, "shf", png_bytes(image)))
    np.testing.assert_array_equal(by_client, by_server)
    as_npy = mask_of(segment(server, "shf", npy_bytes(encrypted), filename="x.npy",
                             headers={"X-Seglock-Key-Version": str(answer["key_version"])}))
    np.testing.assert_array_equal(as_npy, by_server)


def test_block_model_encrypted_input_errors(server):
    version = {"X-Seglock-Key-Version": "1"}
    assert error_of(segment(server, "shf", png_bytes(scene(0, 32, 32)),
                            headers={"X-Seglock-Key-Version": "999"}), 409) == "conflict"
    error_of(segment(server, "shf", png_bytes(scene(0, 40, 32)), headers=version), 422)
    jpeg = io.BytesIO()
    Image.fromarray(scene(0, 32, 32)).save(jpeg, format="JPEG")
    error_of(segment(server, "shf", jpeg.getvalue(), headers=version), 415)
    error_of(server["client"].get("/v1/models/cp/client-key", headers=auth(server)), 400)
    error_of(segment(server, "plain", png_bytes(scene(0, 32, 32)), headers=version), 400)


def test_per_image_model_takes_client_encrypted_input(server):
    encrypted = encrypt_per_image(scene(4, 32, 32), block_size=16, sub_block=4)
    mask = mask_of(segment(server, "per-image", png_bytes(encrypted), headers={"X-Seglock-Encrypted": "1"}))
    assert mask.shape == (32, 32) and mask.max() < 3
    assert mask_of(segment(server, "per-image", png_bytes(scene(4, 50, 60)))).shape == (50, 60)


def test_admin_token_lifecycle_takes_effect_on_the_next_request(server):
    client = server["client"]
    made = client.post("/admin/tokens", json={"name": "ci", "scopes": ["segment"], "models": ["plain"]},
                       headers=auth(server, "admin"))
    assert made.status_code == 201
    token = made.json()["token"]
    assert token.startswith(f"slk_{made.json()['id']}_")
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/v1/models", headers=headers).status_code == 200
    listed = client.get("/admin/tokens", headers=auth(server, "admin")).text
    assert made.json()["id"] in listed and token.split("_")[2] not in listed and '"hash"' not in listed
    assert client.delete(f"/admin/tokens/{made.json()['id']}", headers=auth(server, "admin")).status_code == 204
    assert error_of(client.get("/v1/models", headers=headers), 401) == "unauthorized"
    error_of(client.delete("/admin/tokens/000000000000", headers=auth(server, "admin")), 404)


def test_admin_routes_refuse_segment_tokens_and_bad_bodies(server):
    client = server["client"]
    error_of(client.get("/admin/tokens", headers=auth(server, "client")), 403)
    error_of(client.post("/admin/tokens", json={"name": ""}, headers=auth(server, "admin")), 422)
    error_of(client.post("/admin/tokens", json={"name": "x", "scopes": ["root"]}, headers=auth(server, "admin")), 422)
    error_of(client.post("/admin/tokens", content=b"{not json", headers={**auth(server, "admin"),
                                                                          "Content-Type": "application/json"}), 422)


def test_rotate_key_keeps_masks_identical_and_destroys_the_old_key(server):
    client, home = server["client"], server["home"]
    images = [png_bytes(scene(s, 36, 44)) for s in range(3)]
    before = [mask_of(segment(server, "cp", data)) for data in images]
    answer = client.post("/admin/models/cp/rotate-key", headers=auth(server, "admin"))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == "cp" and body["key_version"] == body["previous_key_version"] + 1
    assert body["seconds"] >= 0
    after = [mask_of(segment(server, "cp", data)) for data in images]
    for old, new in zip(before, after, strict=False):
        np.testing.assert_array_equal(old, new)
    assert list(Home(home).revisions("cp")) == [2]
    keystore = open_keystore(home)
    states = {v.version: v.state for v in keystore.model_key_versions("cp")}
    assert states == {body["previous_key_version"]: "destroyed", body["key_version"]: "active"}
    actions = [entry.action for entry in keystore.audit_log()]
    assert "rotate-key" in actions


def test_rotate_key_is_refused_for_block_keyless_and_unknown_models(server):
    client = server["client"]
    assert error_of(client.post("/admin/models/shf/rotate-key", headers=auth(server, "admin")), 409) == "conflict"
    error_of(client.post("/admin/models/per-image/rotate-key", headers=auth(server, "admin")), 400)
    error_of(client.post("/admin/models/plain/rotate-key", headers=auth(server, "admin")), 400)
    error_of(client.post("/admin/models/nope/rotate-key", headers=auth(server, "admin")), 404)
    error_of(client.post("/admin/models/cp/rotate-key", headers=auth(server, "client")), 403)


def test_unknown_routes_and_methods_answer_json_errors(server):
    assert error_of(server["client"].get("/nope"), 404) == "not_found"
    assert server["client"].get("/v1/models/plain/segment", headers=auth(server)).status_code == 405
