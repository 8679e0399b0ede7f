"""First start on an empty home: import the bundled demo models and make the first tokens.

The demo models ship with public keys (`models/zoo/keys/`), so a CP demo is re-keyed to a
fresh key as it is imported; the initial tokens go to `HOME/initial-tokens.json` (0600) and
expire after a day unless told otherwise. Whether a home is new is a keystore fact (no token and
no model key yet), not a file fact: deleting initial-tokens.json never mints another admin token.
Several workers or replicas may start on one empty home at once: a file lock lets one of them
set it up, and a pending marker lets a start that was killed half-way finish the job.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import filelock

from seglock.app.home import Home
from seglock.client import fsio
from seglock.keystore import Keystore
from seglock.models import read_manifest

log = logging.getLogger("seglock.bootstrap")

INITIAL_TOKENS = "initial-tokens.json"
PENDING = ".first-start-pending"
LOCK = ".first-start.lock"


INITIAL_TOKEN_TTL_S = 86_400.0


def is_empty_home(home: Path, keystore: Keystore, models_root: Path | None = None) -> bool:
    """No token and no model key in the keystore, and no model folder: nothing was ever set up here."""
    keystore.refresh()
    if keystore.list_tokens() or keystore.models():
        return False
    folder = Home(home, models_root=models_root).models_dir
    return not (folder.is_dir() and any(folder.iterdir()))


def needs_first_start(home: Path, keystore: Keystore, models_root: Path | None = None) -> bool:
    return (home / PENDING).exists() or is_empty_home(home, keystore, models_root)


def import_demo_models(home: Path, keystore: Keystore, models_root: Path | None = None) -> list[str]:
    """Import every bundled demo model; returns their names."""
    from seglock.models.keyfile import read_key_file
    from seglock.models.zoo import DEMO_MODELS, zoo_dir

    target = Home(home, keystore, models_root=models_root)
    imported = []
    for name in DEMO_MODELS:
        if target.model_dir(name).is_dir():  # imported by a first start that was cut off
            imported.append(name)
            continue
        source = zoo_dir() / name
        manifest = read_manifest(source)
        key_path = zoo_dir() / "keys" / f"{name}.json"
        key = read_key_file(key_path).key if key_path.exists() else None
        target.import_artifact(source, name=name, key=key, actor="bootstrap")
        if manifest.mode.is_block:
            log.warning("demo model %s keeps its bundled %s key: an input key cannot change without "
                        "re-training, so do not use this demo for anything that matters", name, manifest.mode)
        imported.append(name)
    return imported


def write_initial_tokens(home: Path, keystore: Keystore, models: list[str], *,
                         token_ttl_s: float = INITIAL_TOKEN_TTL_S) -> Path:
    """Make an admin token (and a client token granted `models`), both expiring after `token_ttl_s`,
    and write them once, 0600, atomically."""
    expires_at = time.time() + token_ttl_s
    with keystore.transaction():  # both or neither: a cut-off start must not leave a lone admin token
        _, admin = keystore.create_token("initial-admin", ["admin", "segment"], ["*"], expires_at=expires_at,
                                         actor="bootstrap")
        tokens = {"admin": admin}
        if models:  # with no demo models there is nothing to grant a client yet
            tokens["client"] = keystore.create_token("initial-client", ["segment"], models, expires_at=expires_at,
                                                     actor="bootstrap")[1]
    path = home / INITIAL_TOKENS
    fsio.write_atomic(path, json.dumps(tokens).encode("utf-8"), mode=fsio.SECRET_FILE_MODE)
    return path


def first_start(home: Path, keystore: Keystore, *, import_demo: bool = True,
                models_root: Path | None = None, token_ttl_s: float = INITIAL_TOKEN_TTL_S) -> Path | None:
    """Set up an empty home; returns the initial-tokens path, or None if the home was in use."""
    if not needs_first_start(home, keystore, models_root):
        return None
    storage = keystore.storage
    # Replicas on several hosts share a database keystore and a models root: lock there, not in the home.
    lock = (storage.exclusive("seglock-first-start") if storage.kind != "file"
            else filelock.FileLock(str(home / LOCK), mode=0o600))
    with lock:
        if not needs_first_start(home, keystore, models_root):  # another worker did it while this one waited
            return None
        (home / PENDING).touch(mode=0o600)
        models = import_demo_models(home, keystore, models_root) if import_demo else []
        path = write_initial_tokens(home, keystore, models, token_ttl_s=token_ttl_s)
        (home / PENDING).unlink()
    log.info("first start: %d demo models imported; initial tokens written to %s", len(models), path)
    return path
