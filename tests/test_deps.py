"""The server's typed wiring (seglock.app.deps): routes ask for their parts by type, never app.state."""

from __future__ import annotations

import ast
from pathlib import Path

from fastapi.testclient import TestClient

from seglock.app.main import create_app
from seglock.app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_no_route_reads_app_state():
    for path in [*sorted((ROOT / "app" / "routes").glob("*.py")), ROOT / "app" / "security.py"]:
        source = path.read_text(encoding="utf-8")
        reads = [node.lineno for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.Attribute) and node.attr == "state"
                 and isinstance(node.value, ast.Attribute) and node.value.attr == "app"]
        assert reads == [], f"{path.name} reads request.app.state at lines {reads}"


def test_openapi_shows_only_the_real_parameters(tmp_path):
    spec = create_app(Settings(home=tmp_path, import_demo=False)).openapi()
    segment = spec["paths"]["/v1/models/{name}/segment"]["post"]
    assert sorted((p["in"], p["name"]) for p in segment["parameters"]) == [
        ("header", "accept"), ("header", "x-seglock-encrypted"), ("header", "x-seglock-key-version"),
        ("path", "name")]
    rotate = spec["paths"]["/admin/models/{name}/rotate-key"]["post"]
    assert [(p["in"], p["name"]) for p in rotate["parameters"]] == [("path", "name")]
    assert "requestBody" not in spec["paths"]["/admin/tokens"]["get"]


def test_before_startup_routes_answer_503_json_not_500(tmp_path):
    client = TestClient(create_app(Settings(home=tmp_path, import_demo=False)), raise_server_exceptions=False)
    ready = client.get("/readyz")  # no `with`: the lifespan (keystore, registry) never ran
    assert (ready.status_code, ready.json()) == (503, {"status": "starting"})
    for method, url in [("get", "/v1/models"), ("get", "/metrics"), ("get", "/admin/tokens"),
                        ("post", "/admin/models/m/rotate-key")]:
        response = client.request(method, url, headers={"Authorization": "Bearer slk_x_y"})
        assert response.status_code == 503, url
        assert response.json() == {"error": {"code": "unavailable", "message": "the server is starting"}}
        assert response.headers["retry-after"] == "1"
