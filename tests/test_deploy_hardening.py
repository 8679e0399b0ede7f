"""Issue 13, deployment and dependencies: what the shipped files promise, read from the files."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Lowest release past the known vulnerability each finding named.
FIXED = {
    "pillow": (10, 3),  # libwebp heap overflow (CVE-2023-4863) and CVE-2024-28219
    "torch": (2, 6),  # torch.load weights_only bypass (CVE-2025-32434)
    "starlette": (0, 40),  # multipart form DoS (CVE-2024-47874)
    "python-multipart": (0, 0, 18),  # boundary DoS (CVE-2024-53981)
}


def _minimums() -> dict[str, tuple[int, ...]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in project["dependencies"] + project["optional-dependencies"]["server"]:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", requirement)
        if match:
            found[match.group(1).lower()] = tuple(int(p) for p in match.group(2).split("."))
    return found


@pytest.mark.parametrize("name", sorted(FIXED))
def test_minimum_versions_are_past_the_known_vulnerabilities(name):
    assert _minimums()[name] >= FIXED[name]


def _lock() -> dict[str, tuple[str, list[str]]]:
    text = (REPO / "requirements.lock").read_text()
    pins = {}
    for block in re.split(r"\n(?=[^\s#])", text):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            pins[match.group(1).lower()] = (match.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return pins


def test_the_image_lock_pins_every_dependency_with_hashes_past_the_fixes():
    pins = _lock()
    assert {"fastapi", "starlette", "uvicorn", "pillow", "cryptography", "python-multipart", "numpy"} <= set(pins)
    assert {"psycopg", "psycopg-binary", "psycopg-pool"} <= set(pins)  # the image runs a PostgreSQL keystore too
    assert all(len(hashes) >= 1 for _, hashes in pins.values())
    torch = dict(re.findall(r"^(torch|torchvision)==(\S+)$", (REPO / "requirements-torch.txt").read_text(), re.M))
    assert set(torch) == {"torch", "torchvision"}  # exact versions; hashes: see docs/security.md
    versions = {**{name: version for name, (version, _) in pins.items()}, **torch}
    for name, fixed in FIXED.items():
        assert tuple(int(p) for p in re.findall(r"\d+", versions[name])[:len(fixed)]) >= fixed


def test_the_dockerfile_installs_from_the_lock_with_hashes_required():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r requirements.lock" in dockerfile
    assert "-r requirements-torch.txt" in dockerfile
    assert "pip install -r /tmp/requirements.txt" not in dockerfile


def _compose() -> str:
    return (REPO / "docker-compose.yml").read_text()


def test_compose_publishes_on_loopback_by_default():
    ports = re.findall(r'^\s*-\s*"([^"]+:\d+)"\s*$', _compose(), re.M)
    assert ports and all(p.startswith("${SEGLOCK_BIND:-127.0.0.1}:") for p in ports), ports


def _tmpfs_mib(service_block: str) -> int:
    return int(re.search(r"/tmp:size=(\d+)m", service_block).group(1))


def test_compose_tmpfs_holds_the_uploads_a_worker_may_spool_at_once():
    compose = _compose()
    seglock = compose.split("services:")[0]  # the shared x-seglock block
    concurrency = int(re.search(r"SEGLOCK_DECODE_CONCURRENCY:\s*(\d+)", seglock).group(1))
    assert _tmpfs_mib(seglock) >= concurrency * 20 + 64  # 20 MiB bodies, and room for the rest


def _nginx() -> str:
    return (REPO / "deploy" / "nginx.conf").read_text()


def test_nginx_streams_bodies_instead_of_buffering_them_to_its_tmpfs():
    conf = _nginx()
    assert re.search(r"proxy_request_buffering\s+off;", conf)
    assert re.search(r"proxy_max_temp_file_size\s+0;", conf)


def test_nginx_rate_limits_every_location_that_proxies():
    conf = _nginx()
    assert re.search(r"limit_req_zone \$binary_remote_addr zone=seglock_api:\d+m rate=\d+r/s;", conf)
    locations = re.findall(r"location\s+([^{]+)\{([^}]*)\}", conf)
    proxied = [(where, body) for where, body in locations if "proxy_pass" in body]
    assert proxied and all("limit_req " in body for _, body in proxied)


def test_nginx_admits_admin_only_from_an_allow_list():
    conf = _nginx()
    admin = re.search(r"location\s+/admin/\s*\{([^}]*)\}", conf)
    assert admin, "no /admin/ location"
    rules = re.findall(r"(allow|deny)\s+([^;]+);", admin.group(1))
    assert rules[-1] == ("deny", "all") and any(kind == "allow" for kind, _ in rules)
