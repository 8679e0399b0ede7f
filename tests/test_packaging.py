"""One namespace: the installed names live under `seglock`, and the bare install is the SDK alone."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVER_PACKAGES = ("torch", "torchvision", "fastapi", "uvicorn", "starlette", "matplotlib", "scipy")


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("bare", ["app", "models", "client", "keystore"])
def test_the_repository_folders_are_not_top_level_packages_once_installed(tmp_path, bare):
    done = subprocess.run([sys.executable, "-c", f"import {bare}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert f"ModuleNotFoundError: No module named '{bare}'" in done.stderr


@pytest.mark.parametrize("name", ["seglock.app.cli", "seglock.models.protect", "seglock.keystore.store",
                                  "seglock.client.sdk"])
def test_every_part_imports_under_the_seglock_namespace(tmp_path, name):
    done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_bare_install_requires_only_the_sdk_dependencies():
    names = sorted(req.split(">")[0].split("<")[0].split("=")[0].strip().lower() for req in _project()["dependencies"])
    assert names == ["httpx", "numpy", "pillow", "pyffx"]


def test_the_extras_carry_the_server_and_the_offline_tools():
    extras = _project()["optional-dependencies"]
    assert set(extras) >= {"server", "train", "report", "attacks", "dev"}
    server = " ".join(extras["server"])
    assert all(name in server for name in ("torch", "torchvision", "fastapi", "uvicorn", "cryptography"))
    assert any(req.startswith("matplotlib") for req in extras["report"])
    assert any(req.startswith("scipy") for req in extras["attacks"])
    assert not any(req.startswith(SERVER_PACKAGES) for req in _project()["dependencies"])


def test_console_scripts_point_into_the_namespace():
    scripts = _project()["scripts"]
    assert scripts == {"seglock": "seglock.app.cli:main", "seglock-client": "seglock.client.cli:main"}
