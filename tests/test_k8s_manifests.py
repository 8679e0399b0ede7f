"""deploy/k8s/: every manifest passes the Kubernetes schema (strict), and the parts fit together:
probes on /readyz and /healthz, a GPU per pod, the master key and the PostgreSQL URL from Secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
VERSION = "1.30.0"


def documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


@pytest.mark.parametrize("name,doc", documents(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_each_manifest_passes_the_strict_kubernetes_schema(name, doc):
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_validator_refuses_a_manifest_with_a_misspelt_field():
    deployment = by_kind("Deployment")[0]
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def server_container() -> dict:
    (deployment,) = by_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_probes_use_readyz_and_healthz_on_the_served_port():
    container = server_container()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["ports"][0]["containerPort"] == int(env["SEGLOCK_PORT"]) == 8000


def test_each_pod_gets_one_gpu_and_serves_on_cuda():
    container = server_container()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {e["name"]: e["value"] for e in container["env"]}["SEGLOCK_DEVICE"] == "cuda"


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_master_key_and_keystore_url_come_from_secrets_as_files(kind):
    (workload,) = by_kind(kind)
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "SEGLOCK_MASTER_KEY" not in env and "SEGLOCK_KEYSTORE_URL" not in env  # never in plain env
    secrets = {s["metadata"]["name"]: s for s in by_kind("Secret")}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for variable, secret, key in (("SEGLOCK_MASTER_KEY_FILE", "seglock-master-key", "master.key"),
                                  ("SEGLOCK_KEYSTORE_URL_FILE", "seglock-keystore-url", "url")):
        mount = next(m for m in container["volumeMounts"] if env[variable].startswith(m["mountPath"] + "/"))
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["secret"]["secretName"] == secret
        assert env[variable] == f"{mount['mountPath']}/{key}" and key in secrets[secret]["stringData"]
    assert secrets["seglock-keystore-url"]["stringData"]["url"].startswith("postgresql://")


def test_service_selects_the_server_pods():
    (service,) = by_kind("Service")
    (deployment,) = by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_every_replica_reads_one_shared_models_root():
    container = server_container()
    env = {e["name"]: e["value"] for e in container["env"]}
    pod = by_kind("Deployment")[0]["spec"]["template"]["spec"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["SEGLOCK_MODELS_ROOT"])
    claim = next(v for v in pod["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
    (pvc,) = by_kind("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
