"""The console's server side: /ui under a strict CSP, /v1/whoami, and the admin models, thief view and audit."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from seglock.app.bootstrap import import_demo_models
from seglock.app.home import Home
from seglock.app.imageio import resize_mask, resize_rgb
from seglock.app.main import create_app
from seglock.app.routes.console import CONTENT_SECURITY_POLICY
from seglock.app.settings import Settings
from seglock.models import load_artifact, read_manifest
from seglock.models.data.synth import generate_scene
from seglock.models.inputs import model_input
from seglock.models.zoo import zoo_dir
from tests.server_fixtures import MASTER_KEY, open_keystore, png_bytes

CLASSES = ["background", "disc", "square", "triangle", "ring", "striped_blob"]
CONSOLE = Path(__file__).resolve().parents[1] / "app" / "console"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    home = root / "home"
    keystore = open_keystore(home)
    import_demo_models(home, keystore)  # trained models: a stolen one gives a visibly wrong mask
    made = {
        "admin": keystore.create_token("admin", ["admin", "segment"], ["*"]),
        "client": keystore.create_token("client", ["segment"], ["demo-cp", "demo-plain"]),
        "admin-only": keystore.create_token("ops", ["admin"], ["*"]),
    }
    previous = os.environ.get("SEGLOCK_MASTER_KEY")
    os.environ["SEGLOCK_MASTER_KEY"] = MASTER_KEY
    settings = Settings(home=home, import_demo=False, max_batch=4, max_wait_ms=2, max_body_bytes=300_000,
                        max_pixels=1_000_000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield {"client": client, "home": home, "keystore": keystore,
               "tokens": {who: token for who, (_, token) in made.items()},
               "ids": {who: record.id for who, (record, _) in made.items()}}
    if previous is None:
        os.environ.pop("SEGLOCK_MASTER_KEY", None)
    else:
        os.environ["SEGLOCK_MASTER_KEY"] = previous


def auth(server, who="admin") -> dict:
    return {"Authorization": f"Bearer {server['tokens'][who]}"}


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def thief_view(server, model, data, who="admin"):
    return server["client"].post(f"/admin/models/{model}/thief-view", files={"image": ("x.png", data)},
                                 headers=auth(server, who))


def scene(index: int, height: int = 128, width: int = 128) -> np.ndarray:
    """A synthetic scene of the kind the demo models were trained on, at height x width."""
    image = generate_scene(7, index, 128)[0]
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def local_mask(server, name: str, image: np.ndarray, tmp_path: Path) -> np.ndarray:
    """What the model's stolen artifact (its export: the home itself holds only ciphertext) computes
    for `image` as it is, without any key: a thief's mask."""
    home = Home(server["home"], server["keystore"])
    exported = tmp_path / f"stolen-{name}"
    home.export_revision(name, home.revision_dir(name, 1), exported)
    model, manifest = load_artifact(exported)
    resized = resize_rgb(image, tuple(manifest.input_size))
    with torch.no_grad():
        logits = model(model_input(torch.from_numpy(resized.copy())[None], manifest))
    return resize_mask(logits.argmax(1)[0].to(torch.uint8).numpy(), image.shape[:2])


def decoded(mask_png: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(mask_png)))
    assert image.format == "PNG" and image.mode == "P"
    return np.asarray(image)


# -- /ui ---------------------------------------------------------------------------------------

def test_console_page_is_served_under_a_strict_content_security_policy(server):
    response = server["client"].get("/ui")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.content == (CONSOLE / "index.html").read_bytes()
    policy = response.headers["content-security-policy"]
    assert policy == CONTENT_SECURITY_POLICY
    directives = dict(part.split(" ", 1) for part in policy.split("; "))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and directives["form-action"] == "'none'"
    assert directives["object-src"] == "'none'" and directives["base-uri"] == "'none'"
    assert "unsafe" not in policy and "http" not in policy
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cross-origin-opener-policy"] == "same-origin"
    assert server["client"].get("/ui/").content == response.content


def test_console_html_has_no_inline_script_style_or_handler_and_loads_nothing_from_elsewhere():
    html = (CONSOLE / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.DOTALL)
    assert scripts == [(' src="/ui/console.js" defer', "")]
    assert "<style" not in html and " style=" not in html
    assert re.search(r"\son[a-z]+\s*=", html) is None
    assert re.findall(r'(?:src|href)="([^"#]*)"', html) == [
        "/ui/favicon.svg", "/ui/console.css", "/ui/console.js", "/ui/favicon.svg"]
    script = (CONSOLE / "console.js").read_text()
    assert "eval(" not in script and "innerHTML" not in script and "localStorage" not in script
    assert "http://" not in script and "https://" not in script


@pytest.mark.parametrize("asset,media_type", [
    ("console.js", "text/javascript; charset=utf-8"),
    ("console.css", "text/css; charset=utf-8"),
    ("favicon.svg", "image/svg+xml"),
    ("sample.png", "image/png"),
])
def test_console_assets_are_served_with_their_types_and_the_same_headers(server, asset, media_type):
    response = server["client"].get(f"/ui/{asset}")
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.content == (CONSOLE / asset).read_bytes()
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/ui/index.htm", "/ui/..%2Fmain.py", "/ui/%2E%2E%2F%2E%2E%2Fpyproject.toml",
                                  "/ui/console.js%00.png"])
def test_console_serves_only_its_own_files(server, path):
    response = server["client"].get(path)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert error_of(server["client"].get("/ui/index.htm"), 404) == "the console has no such file"


def test_the_packaged_console_files_are_package_data():
    from importlib import resources

    from seglock.app.routes.console import ASSETS, INDEX

    for name in [INDEX, *ASSETS]:
        assert resources.files("seglock.app").joinpath("console", name).is_file(), name
    pyproject = (CONSOLE.parents[1] / "pyproject.toml").read_text()
    assert '"seglock.app" = ["console/*.html", "console/*.js", "console/*.css", "console/*.svg", "console/*.png"]' \
        in pyproject


# -- /v1/whoami ---------------------------------------------------------------------------------

def test_whoami_answers_id_name_scopes_and_models_for_any_valid_token(server):
    client = server["client"]
    admin = client.get("/v1/whoami", headers=auth(server))
    assert admin.status_code == 200
    assert admin.json() == {"id": server["ids"]["admin"], "name": "admin", "scopes": ["segment", "admin"],
                            "models": ["*"], "expires_at": None}
    assert client.get("/v1/whoami", headers=auth(server, "client")).json() == {
        "id": server["ids"]["client"], "name": "client", "scopes": ["segment"], "models": ["demo-cp", "demo-plain"],
        "expires_at": None}
    assert client.get("/v1/whoami", headers=auth(server, "admin-only")).json() == {
        "id": server["ids"]["admin-only"], "name": "ops", "scopes": ["admin"], "models": ["*"], "expires_at": None}
    for who, token in server["tokens"].items():
        secret = token.rsplit("_", 1)[1]
        assert secret not in client.get("/v1/whoami", headers=auth(server, who)).text


def test_whoami_refuses_missing_bad_and_revoked_tokens(server):
    client = server["client"]
    assert error_of(client.get("/v1/whoami"), 401) == "missing Authorization: Bearer <token> header"
    bad = {"Authorization": "Bearer slk_000000000000_" + "0" * 64}
    assert error_of(client.get("/v1/whoami", headers=bad), 401) == "the API token is not valid"
    record, token = server["keystore"].create_token("short-lived", ["segment"], ["demo-plain"])
    server["keystore"].revoke_token(record.id)
    assert error_of(client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"}), 401) \
        == "the API token was revoked"


# -- /admin/models ------------------------------------------------------------------------------

def test_admin_models_lists_protection_revisions_and_key_versions_without_material(server):
    response = server["client"].get("/admin/models", headers=auth(server, "admin-only"))
    assert response.status_code == 200
    models = {m["name"]: m for m in response.json()["models"]}
    assert sorted(models) == ["demo-cp", "demo-per-image", "demo-plain", "demo-shf"]
    keystore = server["keystore"]
    cp = models["demo-cp"]
    active = keystore.active_model_key("demo-cp")
    assert (cp["mode"], cp["model_version"], cp["key_version"], cp["revisions"]) == ("cp", 1, active.version, [1])
    assert cp["protection"] == read_manifest(zoo_dir() / "demo-cp").protection  # as bundled: taps, channels
    assert [(k["version"], k["state"], k["kind"]) for k in cp["key_versions"]] == [(1, "active", "cp")]
    assert cp["key_versions"][0]["id"] == active.id
    assert (cp["rotatable"], cp["suite_report"]) == (True, False)
    assert cp["class_names"] == CLASSES and cp["input_size"] == [128, 128]
    plain = models["demo-plain"]
    assert (plain["mode"], plain["key_version"], plain["key_versions"], plain["rotatable"]) == ("none", None, [], False)
    shf = models["demo-shf"]
    assert (shf["mode"], shf["key_version"], shf["rotatable"]) == ("shf", 1, False)
    assert [(k["version"], k["state"], k["kind"]) for k in shf["key_versions"]] == [(1, "active", "block")]
    assert models["demo-per-image"]["key_versions"] == [] and models["demo-per-image"]["key_version"] is None
    text = response.text
    assert "material" not in text and "perm" not in text and "password" not in text


def test_admin_models_refuses_segment_tokens_and_no_token(server):
    assert error_of(server["client"].get("/admin/models", headers=auth(server, "client")), 403) \
        == "this token lacks the 'admin' scope"
    assert server["client"].get("/admin/models").status_code == 401


# -- the thief view -----------------------------------------------------------------------------

def test_thief_view_of_a_cp_model_shows_the_keyed_mask_and_the_stolen_weights_without_key(server, tmp_path):
    image = scene(4, 96, 112)
    response = thief_view(server, "demo-cp", png_bytes(image))
    assert response.status_code == 200, response.text
    view = response.json()
    assert (view["model"], view["mode"], view["model_version"]) == ("demo-cp", "cp", 1)
    assert (view["height"], view["width"]) == (96, 112)
    assert view["key_version"] == server["keystore"].active_model_key("demo-cp").version
    assert view["class_names"] == CLASSES
    assert view["without_key_means"] == "the stored weights run as they are, with no key at the tap"
    keyed, stolen = decoded(view["with_key"]["mask_png"]), decoded(view["without_key"]["mask_png"])
    segmented = server["client"].post("/v1/models/demo-cp/segment", files={"image": ("x.png", png_bytes(image))},
                                      headers=auth(server))
    np.testing.assert_array_equal(keyed, np.asarray(Image.open(io.BytesIO(segmented.content))))
    # the stolen file on disk, run by whoever holds it, without the key
    np.testing.assert_array_equal(stolen, local_mask(server, "demo-cp", image, tmp_path))
    assert not np.array_equal(keyed, stolen)
    for side, mask in (("with_key", keyed), ("without_key", stolen)):
        counts = np.bincount(mask.reshape(-1), minlength=6)
        assert view[side]["counts"] == {name: int(c) for name, c in zip(view["class_names"], counts, strict=True) if c}
    assert view["agreement"] == round(float((keyed == stolen).mean()), 6)
    assert view["advantage"] is None
    assert set(view) == {"model", "mode", "model_version", "key_version", "height", "width", "class_names",
                         "with_key", "without_key", "without_key_means", "agreement", "advantage"}


def test_thief_view_reveals_no_key_material(server):
    text = thief_view(server, "demo-cp", png_bytes(scene(5, 32, 32))).text
    assert "perm" not in text and "material" not in text and "taps" not in text
    perm = server["keystore"].active_model_key("demo-cp").material
    assert json.dumps(perm) not in text


def test_thief_view_of_a_block_model_feeds_the_stolen_weights_the_plain_image(server, tmp_path):
    image = scene(6, 32, 32)
    view = thief_view(server, "demo-shf", png_bytes(image)).json()
    segmented = server["client"].post("/v1/models/demo-shf/segment", files={"image": ("x.png", png_bytes(image))},
                                      headers=auth(server))
    np.testing.assert_array_equal(decoded(view["with_key"]["mask_png"]),
                                  np.asarray(Image.open(io.BytesIO(segmented.content))))
    np.testing.assert_array_equal(decoded(view["without_key"]["mask_png"]),
                                  local_mask(server, "demo-shf", image, tmp_path))
    assert view["without_key_means"] == "the stored weights fed the plain image, which only the key holder can encrypt"


def test_thief_view_is_audited(server):
    thief_view(server, "demo-cp", png_bytes(scene(7, 32, 32)))
    last = server["keystore"].audit_log(limit=1)[0]
    assert (last.actor, last.action, last.target) == (server["ids"]["admin"], "thief-view", "demo-cp")
    assert last.outcome == "ok"


def test_thief_view_refusals(server):
    data = png_bytes(scene(8, 32, 32))
    assert error_of(thief_view(server, "demo-cp", data, who="client"), 403) == "this token lacks the 'admin' scope"
    anonymous = server["client"].post("/admin/models/demo-cp/thief-view", files={"image": ("x.png", data)})
    assert anonymous.status_code == 401
    assert error_of(thief_view(server, "demo-plain", data), 400) \
        == "model demo-plain is not protected: a thief gets the same mask as its owner"
    assert error_of(thief_view(server, "nope", data), 404) == "unknown model 'nope'"
    error_of(thief_view(server, "demo-cp", b"not an image"), 415)
    assert error_of(server["client"].post("/admin/models/demo-cp/thief-view", files={"other": ("x.png", data)},
                                          headers=auth(server)), 400) == "multipart field 'image' (a file) is missing"
    error_of(thief_view(server, "demo-cp", b"\x00" * 400_000), 413)


def test_thief_view_shows_the_models_suite_report_if_it_has_one(server):
    report = {"kind": "suite", "model": "demo-cp", "fraction": 0.1, "owner": {"mIoU": 81.5}, "no_key": {"mIoU": 4.25},
              "alternatives": {"scratch": {"mIoU": 30.0}, "public": None},
              "attacks": [{"name": "finetune", "mIoU": 30.5, "seconds": 12.0, "advantage": 0.5}],
              "advantage": 0.5, "notes": "not passed on"}
    path = server["home"] / "models" / "demo-cp" / "suite.json"
    try:
        path.write_text(json.dumps(report))
        view = thief_view(server, "demo-cp", png_bytes(scene(9, 32, 32))).json()
        assert view["advantage"] == {k: v for k, v in report.items() if k != "notes"}
        models = server["client"].get("/admin/models", headers=auth(server)).json()["models"]
        assert {m["name"]: m["suite_report"] for m in models} == {
            "demo-cp": True, "demo-per-image": False, "demo-plain": False, "demo-shf": False}
        for wrong in ({**report, "kind": "finetune"}, {**report, "model": "demo-shf"}, {**report, "advantage": "big"}):
            path.write_text(json.dumps(wrong))
            assert thief_view(server, "demo-cp", png_bytes(scene(9, 32, 32))).json()["advantage"] is None
        path.write_text("{not json")
        assert thief_view(server, "demo-cp", png_bytes(scene(9, 32, 32))).json()["advantage"] is None
    finally:
        path.unlink(missing_ok=True)


# -- the audit log ------------------------------------------------------------------------------

def test_audit_log_is_newest_first_and_paged(server):
    client = server["client"]
    for n in range(3):
        body = {"name": f"paged-{n}", "scopes": ["segment"], "models": ["demo-plain"]}
        assert client.post("/admin/tokens", json=body, headers=auth(server)).status_code == 201
    everything = [e.to_json() for e in reversed(server["keystore"].audit_log())]
    page = client.get("/admin/audit", params={"limit": 2}, headers=auth(server)).json()
    assert (page["total"], page["offset"], page["limit"]) == (len(everything), 0, 2)
    # the audit GET itself writes nothing, so the log is the same when read back
    assert page["entries"] == everything[:2]
    second = client.get("/admin/audit", params={"offset": 2, "limit": 2}, headers=auth(server)).json()
    assert second["entries"] == everything[2:4]
    beyond = client.get("/admin/audit", params={"offset": len(everything)}, headers=auth(server)).json()
    assert beyond["entries"] == [] and beyond["total"] == len(everything)
    default = client.get("/admin/audit", headers=auth(server)).json()
    assert default["limit"] == 50 and default["entries"] == everything[:50]


def test_audit_log_filters_by_action_its_family_and_actor(server):
    client = server["client"]
    made = client.post("/admin/tokens", json={"name": "filtered", "scopes": ["segment"], "models": ["demo-plain"]},
                       headers=auth(server, "admin-only")).json()
    assert client.delete(f"/admin/tokens/{made['id']}", headers=auth(server, "admin-only")).status_code == 204
    everything = [e.to_json() for e in reversed(server["keystore"].audit_log())]
    exact = client.get("/admin/audit", params={"action": "token.create", "limit": 500}, headers=auth(server)).json()
    assert exact["entries"] == [e for e in everything if e["action"] == "token.create"]
    assert exact["total"] == len(exact["entries"]) >= 2
    family = client.get("/admin/audit", params={"action": "token", "limit": 500}, headers=auth(server)).json()
    assert family["entries"] == [e for e in everything if e["action"] in ("token.create", "token.revoke")]
    assert client.get("/admin/audit", params={"action": "toke"}, headers=auth(server)).json()["total"] == 0
    ops = server["ids"]["admin-only"]
    by_actor = client.get("/admin/audit", params={"actor": ops}, headers=auth(server)).json()
    assert [(e["action"], e["target"]) for e in by_actor["entries"]] == [("token.revoke", made["id"]),
                                                                         ("token.create", made["id"])]
    both = client.get("/admin/audit", params={"actor": ops, "action": "token.revoke"}, headers=auth(server)).json()
    assert both["total"] == 1 and both["entries"][0]["target"] == made["id"]


@pytest.mark.parametrize("params,message", [
    ({"limit": 0}, "limit: Input should be greater than or equal to 1"),
    ({"limit": 501}, "limit: Input should be less than or equal to 500"),
    ({"offset": -1}, "offset: Input should be greater than or equal to 0"),
    ({"offset": "x"}, "offset: Input should be a valid integer, unable to parse string as an integer"),
])
def test_audit_log_bad_parameters_are_422(server, params, message):
    response = server["client"].get("/admin/audit", params=params, headers=auth(server))
    assert error_of(response, 422) == f"query.{message}"


def test_audit_log_refuses_segment_tokens(server):
    assert error_of(server["client"].get("/admin/audit", headers=auth(server, "client")), 403) \
        == "this token lacks the 'admin' scope"
    assert server["client"].get("/admin/audit").status_code == 401


# -- documentation and logs ---------------------------------------------------------------------

def test_new_endpoints_are_in_the_openapi_schema_with_their_responses(server):
    schema = server["client"].get("/openapi.json").json()
    paths = schema["paths"]
    documented = {
        ("/v1/whoami", "get"): {"200", "401"},
        ("/admin/models", "get"): {"200", "401", "403", "503"},
        ("/admin/models/{name}/thief-view", "post"): {"200", "400", "401", "403", "404", "409", "413", "415", "422",
                                                      "503"},
        ("/admin/audit", "get"): {"200", "401", "403", "422", "503"},
        ("/ui", "get"): {"200"},
        ("/ui/{asset}", "get"): {"200", "404", "422"},
    }
    for (path, method), statuses in documented.items():
        assert set(paths[path][method]["responses"]) == statuses, path
    assert "multipart/form-data" in paths["/admin/models/{name}/thief-view"]["post"]["requestBody"]["content"]
    assert [p["name"] for p in paths["/admin/audit"]["get"]["parameters"]] == ["offset", "limit", "action", "actor"]
    assert "text/html" in paths["/ui"]["get"]["responses"]["200"]["content"]
    whoami = schema["components"]["schemas"]["WhoAmI"]["properties"]
    assert sorted(whoami) == ["expires_at", "id", "models", "name", "scopes"]


def test_no_token_reaches_the_access_log(server, caplog):
    client = server["client"]
    with caplog.at_level(logging.INFO, logger="seglock.access"):
        client.get("/v1/whoami", headers=auth(server, "client"))
        client.get("/admin/audit", params={"action": "token"}, headers=auth(server))
        thief_view(server, "demo-cp", png_bytes(scene(10, 32, 32)))
        client.get("/ui")
    lines = [r.getMessage() for r in caplog.records if r.name == "seglock.access"]
    assert len(lines) == 4 and any(" GET /admin/audit 200 " in line for line in lines)
    for token in server["tokens"].values():
        assert all(token.rsplit("_", 1)[1] not in line for line in lines)
    assert all("action=" not in line for line in lines)  # query strings are never logged
