"""Issue 13's findings, one named test each: no request can exhaust the server or the keystore,
admins are bounded, secrets and logs stay clean. (Live-server cases: test_hardening_live.py.)"""

from __future__ import annotations

import io
import json
import logging
import tracemalloc

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from seglock.app.imageio import decode_upload
from seglock.app.main import create_app
from seglock.app.settings import Settings
from seglock.client.imaging import pil_to_rgb
from seglock.keystore import Keystore
from tests.server_fixtures import (
    MASTER_KEY,
    imported_home,
    in_process_servers,
    make_artifacts,
    npy_bytes,
    open_keystore,
    png_bytes,
    scene,
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture
def server(tmp_path, artifacts, monkeypatch):
    """A fresh home with the four test models and tokens, served in process; `make(**settings)`."""
    monkeypatch.setenv("SEGLOCK_MASTER_KEY", MASTER_KEY)
    home, keystore = imported_home(tmp_path, artifacts)
    tokens = {
        "admin": keystore.create_token("admin", ["admin", "segment"], ["*"])[1],
        "client": keystore.create_token("client", ["segment"], ["*"])[1],
        "plain-only": keystore.create_token("limited", ["segment"], ["plain"])[1],
        "cp-admin": keystore.create_token("cp admin", ["admin", "segment"], ["cp"])[1],
    }
    with in_process_servers(home) as make:
        yield {"make": make, "tokens": tokens, "home": home, "keystore": keystore}


def auth(server, who="client") -> dict:
    return {"Authorization": f"Bearer {server['tokens'][who]}"}


def audit_entries(home):
    return Keystore.open(home, env={"SEGLOCK_MASTER_KEY": MASTER_KEY}).audit_log()


def png16(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width), dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- 1. keystore write amplification ---------------------------------------------------------


def test_client_key_calls_do_not_grow_the_keystore_and_are_audited_once_per_window(server):
    client = server["make"]()
    path = server["home"] / "keystore.json"
    before = path.stat().st_size
    for _ in range(300):
        assert client.get("/v1/models/shf/client-key", headers=auth(server)).status_code == 200
    assert path.stat().st_size - before < 10_000
    releases = [e for e in audit_entries(server["home"]) if e.action == "client-key"]
    assert len(releases) == 1 and releases[0].target == "shf" and releases[0].outcome == "ok"


def test_a_key_is_not_released_when_its_audit_record_cannot_be_written(server):
    client = server["make"]()
    # The newest audit segment is a folder now: no entry can be appended.
    (server["home"] / "keystore.audit-999999.jsonl").mkdir()
    answer = client.get("/v1/models/shf/client-key", headers=auth(server))
    assert answer.status_code == 503 and "Retry-After" in answer.headers
    assert "permutation" not in answer.text and "key" not in answer.json()


# -- 4. credentials and admin bounds ------------------------------------------------------------


def test_an_admin_token_can_only_grant_what_it_holds(server):
    client = server["make"]()
    for body in ({"name": "x", "scopes": ["segment"], "models": ["*"]},
                 {"name": "x", "scopes": ["segment"], "models": ["plain"]},
                 {"name": "x", "scopes": ["admin"], "models": ["cp", "plain"]}):
        answer = client.post("/admin/tokens", json=body, headers=auth(server, "cp-admin"))
        assert answer.status_code == 403, (body, answer.text)
    made = client.post("/admin/tokens", json={"name": "x", "scopes": ["segment"], "models": ["cp"]},
                       headers=auth(server, "cp-admin"))
    assert made.status_code == 201
    denied = [e for e in audit_entries(server["home"]) if e.action == "token.create" and e.outcome == "denied"]
    assert len(denied) == 3


def test_an_admin_token_can_only_rotate_models_it_is_granted(server):
    client = server["make"]()
    other = client.post("/admin/models/plain/rotate-key", headers=auth(server, "cp-admin"))
    assert other.status_code == 403
    assert client.post("/admin/models/cp/rotate-key", headers=auth(server, "cp-admin")).status_code == 200


def test_the_home_is_made_private(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGLOCK_MASTER_KEY", MASTER_KEY)
    home = tmp_path / "new-home"
    with TestClient(create_app(Settings(home=home, import_demo=False, warmup=False))):
        pass
    assert oct(home.stat().st_mode & 0o777) == "0o700"


# -- 5. audit gaps and keystore errors ---------------------------------------------------------


def test_a_failed_rotation_is_audited(server):
    client = server["make"]()
    assert client.post("/admin/models/plain/rotate-key", headers=auth(server, "admin")).status_code == 400
    entries = [(e.action, e.target, e.outcome) for e in audit_entries(server["home"])]
    assert ("rotate-key", "plain", "error") in entries


def test_a_denied_admin_attempt_is_audited(server):
    client = server["make"]()
    assert client.get("/admin/tokens", headers=auth(server, "client")).status_code == 403
    assert client.get("/admin/tokens").status_code == 401
    denied = [e for e in audit_entries(server["home"]) if e.action == "admin.denied"]
    assert {e.outcome for e in denied} == {"denied"} and len(denied) == 2
    assert denied[0].actor == server["tokens"]["client"].split("_")[1] and denied[1].actor == "anonymous"


def test_a_keystore_failure_during_authentication_is_a_generic_503(server):
    client = server["make"]()
    (server["home"] / "keystore.json").rename(server["home"] / "moved.json")
    for headers in ({"Authorization": "Bearer slk_000000000000_" + "0" * 64}, auth(server)):
        answer = client.get("/v1/models", headers=headers)
        assert answer.status_code == 503 and answer.headers["Retry-After"]
        assert str(server["home"]) not in answer.text and "SEGLOCK_MASTER" not in answer.text
        assert answer.json()["error"]["code"] == "keystore_unavailable"


# -- 2. memory per request -------------------------------------------------------------------


def test_sixteen_bit_conversion_is_exact_without_64_bit_temporaries():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    grey = pil_to_rgb(Image.fromarray(values))[:, :, 0]
    expected = np.clip(np.rint(values.astype(np.int64) * (255.0 / 65535)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(grey, expected)
    big = Image.fromarray(np.full((1000, 2000), 40000, dtype=np.uint16))
    tracemalloc.start()
    pil_to_rgb(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2_000_000  # bytes per pixel: 2 in, 3 out, a few uint16/bool temporaries


def test_sixteen_bit_and_alpha_images_count_more_against_the_pixel_limit():
    limit = 1_000_000
    decode_upload(png_bytes(np.zeros((900, 1000, 3), dtype=np.uint8)), max_pixels=limit)  # 0.9 M: fine
    for data in (png16(1000, 900), png_bytes(np.zeros((900, 1000, 4), dtype=np.uint8))):
        with pytest.raises(Exception) as info:
            decode_upload(data, max_pixels=limit)
        assert getattr(info.value, "status", None) == 413


def test_the_default_pixel_limit_refuses_the_worst_case_sixteen_bit_png(server):
    client = server["make"]()
    answer = client.post("/v1/models/plain/segment", files={"image": ("x.png", png16(6300, 6300))},
                         headers=auth(server))
    assert answer.status_code == 413


def test_large_jpegs_are_draft_decoded_and_answered_at_their_own_size(server):
    buffer = io.BytesIO()
    Image.fromarray(scene(3, 1600, 2400)).save(buffer, format="JPEG", quality=80)
    upload = decode_upload(buffer.getvalue(), max_pixels=10**8, draft_size=(32, 32))
    assert upload.size == (1600, 2400) and upload.array.shape[0] <= 1600 // 4
    client = server["make"]()
    answer = client.post("/v1/models/plain/segment", files={"image": ("x.jpg", buffer.getvalue())},
                         headers=auth(server))
    assert answer.status_code == 200 and Image.open(io.BytesIO(answer.content)).size == (2400, 1600)


def test_large_json_masks_are_refused(server):
    client = server["make"](max_json_mask_pixels=1000)
    answer = client.post("/v1/models/plain/segment", files={"image": ("x.png", png_bytes(scene(1, 48, 40)))},
                         headers={**auth(server), "Accept": "application/json"})
    assert answer.status_code == 413 and "image/png" in answer.json()["error"]["message"]


def test_npy_headers_are_checked_before_anything_is_allocated():
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (200_000, 200_000, 3)})
    data = header.getvalue() + b"\0" * 64
    tracemalloc.start()
    with pytest.raises(Exception) as info:
        decode_upload(data, max_pixels=10**6)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert getattr(info.value, "status", None) == 413 and peak < 1_000_000


def test_npy_whose_data_is_short_of_its_header_is_400():
    data = npy_bytes(np.zeros((8, 8, 3), dtype=np.uint8))[:-10]
    with pytest.raises(Exception) as info:
        decode_upload(data, max_pixels=10**6)
    assert getattr(info.value, "status", None) == 400


def test_only_the_png_jpeg_and_webp_decoders_see_an_upload(monkeypatch):
    from PIL import BmpImagePlugin

    probed = []
    real = BmpImagePlugin._accept
    monkeypatch.setattr(BmpImagePlugin, "_accept", lambda prefix: probed.append(1) or real(prefix))
    Image.init()
    Image.OPEN["BMP"] = (BmpImagePlugin.BmpImageFile, BmpImagePlugin._accept)
    buffer = io.BytesIO()
    Image.fromarray(scene(1, 8, 8)).save(buffer, format="BMP")
    with pytest.raises(Exception) as info:
        decode_upload(buffer.getvalue(), max_pixels=10**6)
    assert getattr(info.value, "status", None) == 415 and probed == []


# -- smaller ones ----------------------------------------------------------------------------


def test_an_infinite_expiry_is_422_not_500(server):
    client = server["make"]()
    for raw in ('{"name":"x","models":["plain"],"expires_in_s":1e309}',
                '{"name":"x","models":["plain"],"expires_in_s":1e12}'):
        answer = client.post("/admin/tokens", content=raw,
                             headers={**auth(server, "admin"), "Content-Type": "application/json"})
        assert answer.status_code == 422, answer.text


def test_a_large_json_body_is_refused_before_it_is_parsed_or_authenticated(server):
    client = server["make"]()
    body = json.dumps({"name": "x" * 300_000})
    answer = client.post("/admin/tokens", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413


def test_key_and_token_answers_are_not_cached(server):
    client = server["make"]()
    answers = [client.get("/v1/models/shf/client-key", headers=auth(server)),
               client.post("/admin/tokens", json={"name": "x", "models": ["plain"]}, headers=auth(server, "admin")),
               client.get("/admin/tokens", headers=auth(server, "admin"))]
    for answer in answers:
        assert answer.status_code in (200, 201) and answer.headers["Cache-Control"] == "no-store"


def test_a_token_in_a_path_and_a_newline_never_reach_the_access_log(server, caplog):
    client = server["make"]()
    token = server["tokens"]["admin"]
    with caplog.at_level(logging.INFO, logger="seglock.access"):
        client.delete(f"/admin/tokens/{token}", headers=auth(server, "admin"))
        client.get("/x%0a127.0.0.1 GET /admin/tokens 200")
    lines = [r.getMessage() for r in caplog.records if r.name == "seglock.access"]
    assert len(lines) == 2
    assert token.split("_")[2] not in "".join(lines) and all("\n" not in line for line in lines)
    assert "\\n" in lines[1]


def test_readiness_and_metrics_do_not_name_models_to_anyone(server):
    client = server["make"]()
    ready = client.get("/readyz")
    assert ready.status_code == 200 and "plain" not in ready.text
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth(server, "client")).status_code == 403
    assert "seglock_requests_total" in client.get("/metrics", headers=auth(server, "admin")).text


def test_a_token_cannot_tell_an_ungranted_model_from_an_unknown_one(server):
    client = server["make"]()
    for path in ("/v1/models/{}/client-key", "/v1/models/{}/segment"):
        known = client.post(path.format("shf"), headers=auth(server, "plain-only")) if "segment" in path \
            else client.get(path.format("shf"), headers=auth(server, "plain-only"))
        unknown = client.post(path.format("nope"), headers=auth(server, "plain-only")) if "segment" in path \
            else client.get(path.format("nope"), headers=auth(server, "plain-only"))
        assert known.status_code == unknown.status_code == 403
        assert known.json()["error"]["message"].replace("shf", "M") == unknown.json()["error"]["message"].replace(
            "nope", "M")


# -- 8. the schema the fuzzer reads ----------------------------------------------------------------


def test_the_openapi_schema_declares_the_bearer_scheme_and_every_error_status(server):
    schema = server["make"]().get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "an API token: slk_<id>_<secret>"}
    paths = schema["paths"]
    expected = {("/v1/models/{name}/segment", "post"): {"400", "401", "403", "404", "409", "413", "415", "422"},
                ("/v1/models/{name}/client-key", "get"): {"400", "401", "403", "404"},
                ("/admin/models/{name}/rotate-key", "post"): {"400", "401", "403", "404", "409"},
                ("/admin/tokens", "post"): {"400", "401", "403", "422"},
                ("/admin/tokens/{token_id}", "delete"): {"401", "403", "404"}}
    for (path, method), statuses in expected.items():
        operation = paths[path][method]
        assert statuses <= set(operation["responses"]), (path, method)
        assert operation["security"] == [{"HTTPBearer": []}]


def test_a_segment_token_body_valid_by_the_schema_is_accepted(server):
    client = server["make"]()
    made = client.post("/admin/tokens", json={"name": "0", "scopes": ["admin"], "models": ["plain"],
                                              "expires_in_s": 1}, headers=auth(server, "admin"))
    assert made.status_code == 201


def test_a_wrong_method_names_every_method_of_the_path_in_allow(server):
    answer = server["make"]().options("/admin/tokens")
    assert answer.status_code == 405 and answer.headers["Allow"] == "GET, POST"


def test_a_worker_starting_during_rotations_loads_the_model(server, monkeypatch):
    import threading

    import torch

    from seglock.app.home import Home
    from seglock.app.observability import Metrics
    from seglock.app.registry import Registry

    home = server["home"]
    settings = Settings(home=home, import_demo=False, warmup=False)
    real = Home.serving_module

    def slow_disk(self, name, path):  # a large model on a slow disk: the load takes a while
        import time

        time.sleep(0.4)
        return real(self, name, path)

    stop = threading.Event()

    def rotate_continuously():
        rotator = Home(home, open_keystore(home))
        while not stop.is_set():
            rotator.rotate_key("cp")

    rotating = threading.Thread(target=rotate_continuously)
    rotating.start()
    failures = []
    try:
        monkeypatch.setattr(Home, "serving_module", slow_disk)
        for _ in range(3):
            starting = Registry(settings, open_keystore(home), Metrics(), torch.device("cpu"))
            try:
                starting.load("cp")
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                failures.append(repr(exc))
            finally:
                starting.close()
    finally:
        stop.set()
        rotating.join()
    assert failures == []
