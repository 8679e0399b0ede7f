"""Issue 13's protections on the routes that came after it: the Open Inference Protocol (/v2) and the
console's admin API (/admin/models, /admin/models/{name}/thief-view, /admin/audit). One named test
per protection; the live-server cases (the upload gate) are in test_hardening_live.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from seglock.app import oip
from seglock.keystore import Keystore
from tests.server_fixtures import MASTER_KEY, imported_home, in_process_servers, make_artifacts, png_bytes, scene


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture
def server(tmp_path, artifacts, monkeypatch):
    """A fresh home with the four test models and tokens, served in process; `make(**settings)`."""
    monkeypatch.setenv("SEGLOCK_MASTER_KEY", MASTER_KEY)
    home, keystore = imported_home(tmp_path, artifacts)
    made = {
        "admin": keystore.create_token("admin", ["admin", "segment"], ["*"]),
        "client": keystore.create_token("client", ["segment"], ["*"]),
        "plain-only": keystore.create_token("limited", ["segment"], ["plain"]),
        "cp-admin": keystore.create_token("cp admin", ["admin"], ["cp"]),
    }
    with in_process_servers(home) as make:
        yield {"make": make, "home": home, "tokens": {who: token for who, (_, token) in made.items()},
               "ids": {who: record.id for who, (record, _) in made.items()}}


def auth(server, who="client") -> dict:
    return {"Authorization": f"Bearer {server['tokens'][who]}"}


def audit_entries(home):
    return Keystore.open(home, env={"SEGLOCK_MASTER_KEY": MASTER_KEY}).audit_log()


def binary_request(images: np.ndarray, *, outputs=None, datatype="UINT8") -> tuple[bytes, dict]:
    header = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": datatype,
                          "parameters": {"binary_data_size": images.nbytes}}]}
    if outputs is not None:
        header["outputs"] = outputs
    text = json.dumps(header).encode()
    return text + images.tobytes(), {oip.HEADER_LENGTH: str(len(text))}


def json_request(images: np.ndarray, datatype="UINT8") -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": list(images.shape), "datatype": datatype,
                                   "data": images.reshape(-1).tolist()}]}).encode()


def protocol_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


# -- /v2 -------------------------------------------------------------------------------------------


def test_v2_keystore_failure_is_a_generic_503_with_retry_after(server):
    client = server["make"]()
    (server["home"] / "keystore.json").rename(server["home"] / "moved.json")
    body, headers = binary_request(scene(1)[None])
    for token in ("slk_000000000000_" + "0" * 64, server["tokens"]["client"]):
        for answer in (client.get("/v2/models/plain", headers={"Authorization": f"Bearer {token}"}),
                       client.post("/v2/models/plain/infer", content=body,
                                   headers={"Authorization": f"Bearer {token}", **headers})):
            message = protocol_error(answer, 503)
            assert answer.headers["Retry-After"]
            assert message == "the keystore cannot be used right now"
            assert str(server["home"]) not in answer.text and "SEGLOCK_MASTER" not in answer.text


def test_v2_a_token_cannot_tell_an_ungranted_model_from_an_unknown_one(server):
    client = server["make"]()
    body, headers = binary_request(scene(1)[None])
    for path in ("/v2/models/{}", "/v2/models/{}/ready", "/v2/models/{}/versions/1", "/v2/models/{}/infer"):
        def call(name, path=path):
            if path.endswith("/infer"):
                return client.post(path.format(name), content=body, headers={**auth(server, "plain-only"), **headers})
            return client.get(path.format(name), headers=auth(server, "plain-only"))

        known, unknown = protocol_error(call("shf"), 403), protocol_error(call("nope"), 403)
        assert known.replace("shf", "M") == unknown.replace("nope", "M")
    # a token granted every model may learn which exist
    protocol_error(client.get("/v2/models/nope", headers=auth(server, "client")), 404)


def test_v2_sixteen_bit_tensors_count_double_against_the_pixel_limit(server):
    client = server["make"](max_pixels=1000)
    images = np.zeros((1, 25, 25, 3), dtype=np.uint8)  # 625 pixels: within 1000 at 8 bits, 1250 at 16
    body, headers = binary_request(images)
    assert client.post("/v2/models/plain/infer", content=body, headers={**auth(server), **headers}).status_code == 200
    body, headers = binary_request(images.astype(np.uint16), datatype="UINT16")
    answer = client.post("/v2/models/plain/infer", content=body, headers={**auth(server), **headers})
    assert "limit is 500" in protocol_error(answer, 413)


def test_v2_a_json_part_above_its_limit_is_413_before_it_is_parsed(server, monkeypatch):
    client = server["make"](max_json_tensor_bytes=4096)
    parsed = []
    monkeypatch.setattr(oip, "json", SimpleNamespace(
        loads=lambda *a, **k: parsed.append(1) or json.loads(*a, **k), dumps=json.dumps))
    big = json_request(scene(1, 24, 24)[None])  # 1728 values: about 6 KB of JSON
    assert len(big) > 4096
    answer = client.post("/v2/models/plain/infer", content=big, headers=auth(server))
    assert "binary tensor data" in protocol_error(answer, 413) and parsed == []
    monkeypatch.undo()
    small = json_request(scene(1, 8, 8)[None])
    assert client.post("/v2/models/plain/infer", content=small, headers=auth(server)).status_code == 200
    # the same image as binary tensor data: only its short JSON header counts
    body, headers = binary_request(scene(1, 24, 24)[None])
    assert client.post("/v2/models/plain/infer", content=body, headers={**auth(server), **headers}).status_code == 200


def test_v2_large_json_outputs_are_refused_and_binary_ones_answered(server):
    client = server["make"](max_json_mask_pixels=1000)
    images = scene(2, 24, 48)[None]  # 1152 output pixels
    body, headers = binary_request(images, outputs=[{"name": "mask", "parameters": {"binary_data": False}}])
    answer = client.post("/v2/models/plain/infer", content=body, headers={**auth(server), **headers})
    assert "binary_data" in protocol_error(answer, 413)
    body, headers = binary_request(images, outputs=[{"name": "mask", "parameters": {"binary_data": True}}])
    answer = client.post("/v2/models/plain/infer", content=body, headers={**auth(server), **headers})
    assert answer.status_code == 200 and int(answer.headers[oip.HEADER_LENGTH]) + 24 * 48 == len(answer.content)


def test_v2_ready_and_health_name_no_model(server):
    client = server["make"]()
    for path in ("/v2", "/v2/health/ready", "/v2/health/live"):
        answer = client.get(path)
        assert answer.status_code == 200
        assert not any(name in answer.text for name in ("plain", "shf", "per-image", '"cp"'))


# -- the console's admin API -----------------------------------------------------------------------


def test_admin_models_lists_only_the_models_the_token_administers(server):
    client = server["make"]()
    mine = client.get("/admin/models", headers=auth(server, "cp-admin"))
    assert mine.status_code == 200 and mine.headers["Cache-Control"] == "no-store"
    assert [m["name"] for m in mine.json()["models"]] == ["cp"]
    every = client.get("/admin/models", headers=auth(server, "admin")).json()["models"]
    assert sorted(m["name"] for m in every) == ["cp", "per-image", "plain", "shf"]


def test_the_thief_view_is_bounded_by_the_tokens_grants_and_denials_are_audited(server):
    client = server["make"]()
    image = {"image": ("x.png", png_bytes(scene(3)))}
    known = client.post("/admin/models/shf/thief-view", files=image, headers=auth(server, "cp-admin"))
    unknown = client.post("/admin/models/nope/thief-view", files=image, headers=auth(server, "cp-admin"))
    assert known.status_code == unknown.status_code == 403
    assert known.json()["error"]["message"].replace("shf", "M") == unknown.json()["error"]["message"].replace(
        "nope", "M")
    assert client.post("/admin/models/cp/thief-view", files=image, headers=auth(server, "cp-admin")).status_code == 200
    entries = [(e.actor, e.target, e.outcome) for e in audit_entries(server["home"]) if e.action == "thief-view"]
    cp_admin = server["ids"]["cp-admin"]
    assert entries == [(cp_admin, "shf", "denied"), (cp_admin, "nope", "denied"), (cp_admin, "cp", "ok")]


def test_the_thief_view_takes_an_upload_sized_body(server):
    client = server["make"](max_json_body_bytes=64 * 1024)
    noisy = png_bytes(np.random.default_rng(5).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    assert len(noisy) > 64 * 1024  # above the small-body limit every non-upload route has
    answer = client.post("/admin/models/cp/thief-view", files={"image": ("x.png", noisy)},
                         headers=auth(server, "admin"))
    assert answer.status_code == 200, answer.text
    assert (answer.json()["height"], answer.json()["width"]) == (200, 200)


def test_the_thief_view_refuses_images_whose_masks_are_too_large_to_answer(server):
    client = server["make"](max_json_mask_pixels=1000)
    answer = client.post("/admin/models/cp/thief-view", files={"image": ("x.png", png_bytes(scene(1, 40, 40)))},
                         headers=auth(server, "admin"))
    assert answer.status_code == 413 and "too large for the thief view" in answer.json()["error"]["message"]


def test_a_thief_view_is_not_answered_when_its_audit_record_cannot_be_written(server):
    client = server["make"]()
    (server["home"] / "keystore.audit-999999.jsonl").mkdir()  # the newest segment is a folder: no append
    answer = client.post("/admin/models/cp/thief-view", files={"image": ("x.png", png_bytes(scene(1)))},
                         headers=auth(server, "admin"))
    assert answer.status_code == 503 and answer.headers["Retry-After"]
    assert "with_key" not in answer.text


def test_the_audit_log_is_for_admins_of_every_model(server):
    client = server["make"]()
    denied = client.get("/admin/audit", headers=auth(server, "cp-admin"))
    assert denied.status_code == 403
    page = client.get("/admin/audit", params={"action": "audit.read"}, headers=auth(server, "admin"))
    assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store"
    assert [(e["actor"], e["outcome"]) for e in page.json()["entries"]] == [(server["ids"]["cp-admin"], "denied")]


def test_the_console_admin_routes_answer_a_keystore_failure_with_a_generic_503(server):
    client = server["make"]()
    (server["home"] / "keystore.json").rename(server["home"] / "moved.json")
    for answer in (client.get("/admin/models", headers=auth(server, "admin")),
                   client.get("/admin/audit", headers=auth(server, "admin")),
                   client.post("/admin/models/cp/thief-view", files={"image": ("x.png", png_bytes(scene(1)))},
                               headers=auth(server, "admin"))):
        assert answer.status_code == 503 and answer.headers["Retry-After"]
        assert answer.json()["error"]["code"] == "keystore_unavailable"
        assert str(server["home"]) not in answer.text


def test_v2_a_datatype_or_output_name_that_is_not_a_string_is_4xx_not_500(server):
    """Found by the fuzzer: `"datatype": {}` reached a dict lookup and raised TypeError (500)."""
    client = server["make"]()
    for header in ({"inputs": [{"name": "image", "shape": [1, 1, 1, 3], "datatype": {}, "data": [0, 0, 0]}]},
                   {"inputs": [{"name": "image", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [0, 0, 0]}],
                    "outputs": [{"name": ["mask"]}]},
                   {"inputs": [{"name": "image", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [[0, 0], 0]}]}):
        answer = client.post("/v2/models/plain/infer", content=json.dumps(header).encode(), headers=auth(server))
        assert answer.status_code in (400, 422), answer.text
        protocol_error(answer, answer.status_code)
