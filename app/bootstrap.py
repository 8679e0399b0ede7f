"""First start on an empty home: import the bundled demo models and make the first tokens.

The demo models ship with public keys (`models/zoo/keys/`), so a CP demo is re-keyed to a
fresh key as it is imported; the initial tokens go to `HOME/initial-tokens.json` (0600).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from app.registry import BLOCK_MODES, import_artifact, models_dir
from keystore import Keystore
from models import read_manifest

log = logging.getLogger("seglock.bootstrap")

INITIAL_TOKENS = "initial-tokens.json"


def is_empty_home(home: Path) -> bool:
    folder = models_dir(home)
    return not (folder.is_dir() and any(folder.iterdir())) and not (home / INITIAL_TOKENS).exists()


def import_demo_models(home: Path, keystore: Keystore) -> list[str]:
    """Import every bundled demo model; returns their names."""
    from models.keyfile import read_key_file
    from models.zoo import DEMO_MODELS, zoo_dir

    imported = []
    for name in DEMO_MODELS:
        source = zoo_dir() / name
        manifest = read_manifest(source)
        key_path = zoo_dir() / "keys" / f"{name}.json"
        key = read_key_file(key_path).key if key_path.exists() else None
        import_artifact(home, keystore, source, name=name, key=key, actor="bootstrap")
        if manifest.mode in BLOCK_MODES:
            log.warning("demo model %s keeps its bundled %s key: an input key cannot change without "
                        "re-training, so do not use this demo for anything that matters", name, manifest.mode)
        imported.append(name)
    return imported


def write_initial_tokens(home: Path, keystore: Keystore, models: list[str]) -> Path:
    """Make an admin and a client token and write them once, 0600, atomically."""
    _, admin = keystore.create_token("initial-admin", ["admin", "segment"], ["*"], actor="bootstrap")
    _, client = keystore.create_token("initial-client", ["segment"], models, actor="bootstrap")
    path = home / INITIAL_TOKENS
    fd, tmp = tempfile.mkstemp(prefix=".initial-tokens.", dir=home)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"admin": admin, "client": client}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def first_start(home: Path, keystore: Keystore, *, import_demo: bool = True) -> Path | None:
    """Set up an empty home; returns the initial-tokens path, or None if the home was in use."""
    if not is_empty_home(home):
        return None
    models = import_demo_models(home, keystore) if import_demo else []
    path = write_initial_tokens(home, keystore, models)
    log.info("first start: %d demo models imported; initial tokens written to %s", len(models), path)
    return path
