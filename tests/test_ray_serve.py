"""Ray Serve: a real local Ray (2 CPUs) serving the same FastAPI app answers the same /v1 requests
with the same masks as `seglock serve` on the same home."""

from __future__ import annotations

import time

import httpx
import pytest
from server_fixtures import MASTER_KEY, free_port, live_server, make_artifacts, open_keystore, png_bytes, scene

from seglock.app.home import Home

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


def wait_ready(base: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the Ray Serve deployment did not become ready"
        time.sleep(1)


def answers(base: str, token: str) -> dict:
    """What a client sees: the model list, masks for two scenes per model, and the auth errors."""
    auth = {"Authorization": f"Bearer {token}"}
    out = {"models": httpx.get(f"{base}/v1/models", headers=auth, timeout=60).json(),
           "no_token": httpx.get(f"{base}/v1/models", timeout=60).status_code,
           "bad_token": httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer slk_x"}, timeout=60)
           .status_code}
    for model in ("plain", "cp"):
        for seed in (1, 2):
            r = httpx.post(f"{base}/v1/models/{model}/segment", headers=auth, timeout=120,
                           files={"image": ("x.png", png_bytes(scene(seed)))})
            assert r.status_code == 200, r.text
            out[f"{model}/{seed}"] = r.content  # PNG bytes of the mask
    return out


@pytest.mark.slow
def test_ray_serve_deployment_answers_like_seglock_serve(tmp_path, monkeypatch):
    home = tmp_path / "home"
    with open_keystore(home) as keystore:
        for name, (path, key) in make_artifacts(tmp_path / "artifacts").items():
            if name in ("plain", "cp"):
                Home(home, keystore).import_artifact(path, key=key)
        token = keystore.create_token("client", ["segment"], ["*"])[1]

    with live_server(home, "--no-demo") as reference:
        expected = answers(reference["base"], token)

    monkeypatch.setenv("SEGLOCK_MASTER_KEY", MASTER_KEY)
    from seglock.app import ray_serve
    from seglock.app.settings import Settings

    port = free_port()
    settings = Settings(home=home, port=port, device="cpu", import_demo=False, max_batch=4, max_wait_ms=2)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=ray_serve.runtime_env())
    try:
        ray_serve.start(settings, replicas=2, num_cpus=0.5)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base)
        got = answers(base, token)
        assert got["models"] == expected["models"]
        assert (got["no_token"], got["bad_token"]) == (expected["no_token"], expected["bad_token"]) == (401, 401)
        for key in expected:
            assert got[key] == expected[key], key  # byte-identical masks
        replicas = serve.status().applications[ray_serve.APP_NAME].deployments[ray_serve.DEPLOYMENT_NAME].replica_states
        assert replicas.get("RUNNING") == 2
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_serve_run_config_is_valid_and_builds_the_deployment():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from seglock.app.ray_serve import DEPLOYMENT_NAME, app_builder
    from tests.test_k8s_manifests import K8S

    config = yaml.safe_load((K8S.parent / "ray" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    (application,) = schema.applications
    assert application.import_path == "seglock.app.ray_serve:app_builder"
    built = app_builder(application.args)
    deployment = built._bound_deployment
    assert deployment.name == DEPLOYMENT_NAME
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert deployment._deployment_config.autoscaling_config.max_replicas == 8
