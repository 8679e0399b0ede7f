"""A server home on disk: its layout, the revision each model serves, import, and key rotation.

    HOME/keystore.json                       the encrypted keystore (keys, tokens, audit)
    HOME/models/<name>/r<N>/                 artifact revisions; manifest.key.version names the key
    HOME/models/<name>/.rotate.lock          held while the model's revisions or keys change

Weights are encrypted at rest (`seglock.models.at_rest`: AES-256-GCM under the model's data key,
which the keystore holds, bound to the model name and revision): every revision Home writes
(import, rotation, `encrypt_at_rest`) is sealed, and is opened only in memory when loaded. A
revision with plain weights (a home from before at-rest encryption) still loads, and is encrypted
by the next rotation or by `seglock models encrypt` (`encrypt_at_rest`).

The models folder may live elsewhere: a models root (`--models-root`, `SEGLOCK_MODELS_ROOT`) on
shared storage that every replica reads, separate from the keystore (which may be a database).
With a database keystore the rotation lock is the database's (an advisory lock), so it holds
across hosts; with the file keystore it is the file lock above.

The revision in use is the one whose manifest names the keystore's active key version (keyless
models: the newest). Key rotation writes the new revision and key before activating them, so
after a crash at any point `serving_revision(name, repair=True)` finds exactly one consistent
(artifact, key) pair. `Home` is everything the offline commands need; the server's `Registry`
adds loaded modules, batchers and hot swaps on top of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
from torch import nn

from seglock.app.errors import (
    InvalidModelName,
    KeyRequired,
    ModelExists,
    ModelNotFound,
    ModelUnavailable,
    NeedsRetraining,
    NotRotatable,
)
from seglock.client import fsio
from seglock.client.modes import Mode, check_model_name, is_model_name
from seglock.client.transforms import BlockKey
from seglock.keystore import Keystore
from seglock.keystore.errors import KeystoreError, ModelKeyNotFound
from seglock.models import (
    CPKey,
    KeyRef,
    Manifest,
    at_rest,
    fold_key,
    load_artifact,
    read_manifest,
    rekey,
    save_artifact,
)
from seglock.models.artifact import MANIFEST_FILE
from seglock.models.errors import ArtifactError

log = logging.getLogger("seglock.home")

MODELS_DIR = "models"
MODELS_ROOT_VARIABLE = "SEGLOCK_MODELS_ROOT"
LOCK_FILE = ".rotate.lock"
_REVISION = re.compile(r"r(\d+)")


@dataclass(frozen=True)
class Rotation:
    """A finished key rotation: `revision` (with `manifest`) now serves `key_version`."""

    model: str
    previous_key_version: int
    key_version: int
    revision: int
    manifest: Manifest

    def summary(self) -> dict[str, Any]:
        """The admin API's and the CLI's answer (without the time taken)."""
        return {"model": self.model, "previous_key_version": self.previous_key_version,
                "key_version": self.key_version}


class Home:
    """One home folder and (for anything that reads or writes keys) its open keystore."""

    def __init__(self, path: str | Path, keystore: Keystore | None = None, *,
                 models_root: str | Path | None = None):
        self.path = Path(path)
        self.keystore = keystore
        # None: $SEGLOCK_MODELS_ROOT, else HOME/models (so every command of a deployment agrees)
        root = models_root or os.environ.get(MODELS_ROOT_VARIABLE)
        self.models_root = Path(root) if root else None

    def __repr__(self) -> str:
        return f"Home({str(self.path)!r})"

    # -- layout -------------------------------------------------------------------------------------

    @property
    def models_dir(self) -> Path:
        """HOME/models, or the models root on shared storage that every replica reads."""
        return self.models_root if self.models_root is not None else self.path / MODELS_DIR

    def model_dir(self, name: str) -> Path:
        """HOME/models/<name>, for a name that follows the model-name rule."""
        return self.models_dir / _checked_name(name)

    def revision_dir(self, name: str, revision: int) -> Path:
        return self.model_dir(name) / f"r{revision}"

    def revisions(self, name: str) -> dict[int, Path]:
        """{revision number: folder} of every r<N> folder of `name` (none for an unknown name)."""
        folder = self.model_dir(name)
        found = {}
        if folder.is_dir():
            for child in folder.iterdir():
                match = _REVISION.fullmatch(child.name)
                if match and child.is_dir():
                    found[int(match.group(1))] = child
        return found

    def model_names(self) -> list[str]:
        """The folders under HOME/models that are model names, sorted."""
        if not self.models_dir.is_dir():
            return []
        return sorted(c.name for c in self.models_dir.iterdir() if c.is_dir() and is_model_name(c.name))

    def is_taken(self, name: str) -> bool:
        """True when `name` has an artifact here or any key version in the keystore."""
        keystore = self._keystore()
        return bool(self.revisions(name)) or bool(keystore.model_key_versions(name))

    def model_lock(self, name: str):
        """Held while a model's revisions or keys change (rotation, clean-up after a cut-off one), so
        workers, replicas and the CLI sharing a home never tidy away each other's half-done work.
        With a database keystore the lock is the database's, so it holds across hosts too."""
        storage = self.keystore.storage if self.keystore is not None else None
        if storage is not None and storage.kind != "file":
            return storage.exclusive(f"seglock-rotate:{_checked_name(name)}")
        return filelock.FileLock(str(self.model_dir(name) / LOCK_FILE), mode=0o600)

    # -- the revision in use --------------------------------------------------------------------------

    def serving_revision(self, name: str, *, repair: bool = False) -> Path:
        """The artifact revision of `name` a server serves.

        Without `repair` nothing changes (and without a keystore the newest revision is the answer).
        With `repair`, under the model's lock and with the keystore re-read, revisions and key
        versions left by an interrupted rotation (or retired by a finished one) are removed.
        """
        if not repair:
            return self._choose(name, repair=False)
        if not self.revisions(name):
            raise ModelNotFound(f"{self.path} has no model {name!r}")
        keystore = self._keystore()
        with self.model_lock(name):
            keystore.refresh()
            return self._choose(name, repair=True)

    def load_serving(self, name: str) -> tuple[Path, nn.Module, Manifest, BlockKey | None]:
        """`serving_revision(repair=True)` and `serving_module` under one hold of the model's lock,
        so a rotation elsewhere cannot remove the revision between choosing it and reading it."""
        if not self.revisions(name):
            raise ModelNotFound(f"{self.path} has no model {name!r}")
        keystore = self._keystore()
        with self.model_lock(name):
            keystore.refresh()
            path = self._choose(name, repair=True)
            return (path, *self.serving_module(name, path))

    def revision_for_key(self, name: str, key_version: int) -> tuple[int, Path] | None:
        """The newest revision whose manifest names `key_version`, or None."""
        for revision, path in sorted(self.revisions(name).items(), reverse=True):
            manifest = read_manifest(path)
            if manifest.key is not None and manifest.key.version == key_version:
                return revision, path
        return None

    def _choose(self, name: str, *, repair: bool) -> Path:
        found = self.revisions(name)
        if not found:
            raise ModelNotFound(f"{self.path} has no model {name!r}")
        manifests = {rev: read_manifest(path) for rev, path in found.items()}
        newest = max(found)
        if not manifests[newest].mode.has_model_key or (self.keystore is None and not repair):
            keep = newest
        else:
            keystore = self._keystore()
            active = keystore.active_model_key(name)
            if active is None:
                raise ModelUnavailable(f"model {name} has no active key in the keystore")
            matching = [rev for rev, m in manifests.items() if m.key is not None and m.key.version == active.version]
            if not matching:
                raise ModelUnavailable(f"no artifact of model {name} matches its active key version {active.version}")
            keep = max(matching)
            if repair:
                # versions written by an unfinished rotation, or retired by a finished one, are destroyed
                for version in keystore.model_key_versions(name):
                    if version.version != active.version and version.state != "destroyed":
                        keystore.destroy_model_key(name, version.version, actor="reconcile")
        if repair:
            for rev, path in found.items():
                if rev != keep:
                    shutil.rmtree(path, ignore_errors=True)
                    log.info("model %s: removed stale revision r%d", name, rev)
        return found[keep]

    # -- keys ---------------------------------------------------------------------------------------

    def model_key(self, manifest: Manifest, name: str | None = None) -> CPKey | BlockKey | None:
        """The key a revision's manifest names (id and version), stored under `name` (default: the
        manifest's name) in the keystore; None for a mode without a model key."""
        if not manifest.mode.has_model_key:
            return None
        name = name or manifest.name
        if manifest.key is None:
            raise ModelUnavailable(f"the manifest of {name} names no key version to look up")
        version = manifest.key.version
        try:
            stored = self._keystore().get_model_key(name, version)
        except ModelKeyNotFound:
            raise ModelUnavailable(f"the keystore in {self.path} has no key {name} v{version}") from None
        if stored.id != manifest.key.id:
            raise ModelUnavailable(f"the keystore in {self.path} holds another key as {name} v{version} "
                                   f"(id {stored.id}, the manifest names {manifest.key.id})")
        if stored.material is None:
            raise ModelUnavailable(f"key {name} v{version} in {self.path} was destroyed")
        return key_from_material(manifest.mode, stored.material)

    # -- weights at rest ----------------------------------------------------------------------------

    def _data_key(self, name: str, *, create: bool = False, actor: str = "home") -> at_rest.DataKey:
        found = self._keystore().data_key(name, create=create, actor=actor)
        if found is None:
            raise ModelUnavailable(f"the keystore in {self.path} has no at-rest data key for model {name}")
        return at_rest.DataKey(*found)

    def _sealer(self, name: str, revision: int, actor: str) -> Callable[[bytes], bytes]:
        """What `save_artifact` encrypts a revision's weights with (the data key is made on first use)."""
        key = self._data_key(name, create=True, actor=actor)
        aad = at_rest.associated_data(name, revision)
        return lambda plain: at_rest.seal(plain, key, aad)

    def unsealer(self, name: str, path: Path) -> Callable[[bytes], bytes]:
        """What `load_artifact` decrypts a revision's weights with, in memory (looked up only when sealed)."""
        revision = _revision_number(path)
        aad = at_rest.associated_data(name, revision)
        return lambda data: at_rest.unseal(data, self._data_key(name), aad, where=f"weights of {name} r{revision}")

    def load_revision(self, name: str, path: Path) -> tuple[nn.Module, Manifest]:
        """(model with its stored weights, manifest) of a revision of `name`, decrypted in memory."""
        return load_artifact(path, unseal=self.unsealer(name, path))

    def export_revision(self, name: str, path: Path, out: Path) -> Manifest:
        """Write a revision of `name` to `out` as a plain artifact: the same manifest and the very
        weights bytes the home encrypted (a cp model's keyed weights, not the folded ones), checked
        against the manifest's SHA-256 and loaded once before the folder is swapped in."""
        manifest = read_manifest(path)
        data = (path / manifest.weights.file).read_bytes()
        if at_rest.is_sealed(data):
            data = self.unsealer(name, path)(data)
        if len(data) != manifest.weights.bytes or hashlib.sha256(data).hexdigest() != manifest.weights.sha256:
            raise ArtifactError(f"the weights of {name} r{_revision_number(path)} do not match "
                                "their manifest's SHA-256")
        with fsio.atomic_directory(out, mode=0o755) as tmp:
            (tmp / manifest.weights.file).write_bytes(data)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
            load_artifact(tmp)  # the folder opens as an artifact on its own
        return manifest

    def is_encrypted(self, path: Path) -> bool:
        """True when a revision's weights file is in the at-rest format."""
        weights = path / read_manifest(path).weights.file
        with weights.open("rb") as f:
            return at_rest.is_sealed(f.read(len(at_rest.MAGIC)))

    def encrypt_at_rest(self, name: str, *, actor: str = "cli") -> list[int]:
        """Encrypt `name`'s revisions that still hold plain weights (a home from before at-rest
        encryption); returns their numbers. Each weights file is replaced atomically (the write
        helper's temp file holds only ciphertext), under the model's lock."""
        done = []
        with self.model_lock(name):
            self._keystore().refresh()
            for revision, path in sorted(self.revisions(name).items()):
                if self.is_encrypted(path):
                    continue
                manifest = read_manifest(path)
                weights = path / manifest.weights.file
                load_artifact(path)  # the plain weights must match their manifest before they are sealed
                sealed = self._sealer(name, revision, actor)(weights.read_bytes())
                fsio.write_atomic(weights, sealed, mode=0o644)
                log.info("model %s: r%d encrypted at rest", name, revision)
                done.append(revision)
        return done

    def serving_module(self, name: str, path: Path) -> tuple[nn.Module, Manifest, BlockKey | None]:
        """(module to run, manifest, block key) of a revision of `name`: a cp key is folded in."""
        model, manifest = self.load_revision(name, path)
        key = self.model_key(manifest, name)
        if isinstance(key, CPKey):
            return fold_key(model, manifest.protection["tap"], key), manifest, None  # zero cost at inference
        return model, manifest, key

    def key_sink(self) -> HomeKeySink:
        """Where `seglock train --home` puts a run's key."""
        return HomeKeySink(self.path)

    # -- import -------------------------------------------------------------------------------------

    def import_artifact(self, source: Path, *, name: str | None = None, key: CPKey | BlockKey | None = None,
                        actor: str = "cli") -> Manifest:
        """Copy an artifact into the home as revision r1, re-keyed to a fresh key where that is exact.

        CP models are re-keyed (the key given is usually public, e.g. a bundled demo key); block
        models keep theirs, since changing an input key needs retraining.
        """
        keystore = self._keystore()
        model, manifest = load_artifact(source)
        name = name or manifest.name
        _checked_name(name)
        if self.revisions(name):
            raise ModelExists(f"model {name} already exists in {self.path}")
        if manifest.mode.has_model_key and key is None:
            raise KeyRequired(f"model {name} is {manifest.mode}-protected: its key file is needed to import it")
        if manifest.mode is Mode.CP:
            key = rekey(model, manifest.protection["tap"], key)
        key_ref = None
        if manifest.mode.has_model_key:
            version = keystore.add_model_key(name, *key_material(manifest.mode, key), activate=True, actor=actor)
            key_ref = KeyRef(id=version.id, version=version.version)
        return save_artifact(model, self.revision_dir(name, 1), name=name, class_names=list(manifest.class_names),
                             input_size=list(manifest.input_size), normalization=manifest.normalization,
                             protection=_saved_protection(manifest), key=key_ref,
                             seal=self._sealer(name, 1, actor))

    # -- rotation -----------------------------------------------------------------------------------

    def rotate_key(self, name: str,
                   on_commit: Callable[[Rotation, nn.Module], None] | None = None) -> Rotation:
        """Re-key a cp model: exact re-key -> new revision on disk -> keystore commit -> old revision
        and key destroyed. `on_commit(rotation, folded_module)` runs right after the commit (the
        server swaps the module in there). Under the model's lock, after a repair, so workers,
        replicas and the CLI sharing a home rotate one at a time from a consistent pair.
        """
        found = self.revisions(name)
        if not found:
            raise ModelNotFound(f"{self.path} has no model {name!r}")
        check_rotatable(read_manifest(found[max(found)]))
        keystore = self._keystore()
        actor = f"rotate:{name}"
        with self.model_lock(name):
            keystore.refresh()
            old_path = self._choose(name, repair=True)
            model, manifest = self.load_revision(name, old_path)
            tap = manifest.protection["tap"]
            old_version = manifest.key.version
            old_key = self.model_key(manifest, name)
            new_key = rekey(model, tap, old_key)
            added = keystore.add_model_key(name, *key_material(Mode.CP, new_key), activate=False, actor=actor)
            new_revision = max(self.revisions(name)) + 1
            new_manifest = save_artifact(model, self.revision_dir(name, new_revision), name=name,
                                         class_names=list(manifest.class_names),
                                         input_size=list(manifest.input_size), normalization=manifest.normalization,
                                         protection=_saved_protection(manifest),
                                         key=KeyRef(id=added.id, version=added.version),
                                         seal=self._sealer(name, new_revision, actor))
            keystore.set_active(name, added.version, actor=actor)
            rotation = Rotation(name, old_version, added.version, new_revision, new_manifest)
            if on_commit is not None:
                on_commit(rotation, fold_key(model, tap, new_key))
            shutil.rmtree(old_path, ignore_errors=True)
            keystore.destroy_model_key(name, old_version, actor=actor)
        return rotation

    def _keystore(self) -> Keystore:
        if self.keystore is None:
            raise TypeError(f"{self!r} was opened without its keystore")
        return self.keystore


def check_rotatable(manifest: Manifest) -> None:
    """Only cp keys rotate in place; a block key is the model's input, per-image and none have none."""
    if manifest.mode.is_block:
        raise NeedsRetraining(f"model {manifest.name} is {manifest.mode}-protected: "
                              "a new input key needs re-training")
    if manifest.mode is not Mode.CP:
        raise NotRotatable(f"model {manifest.name} ({manifest.mode}) has no key to rotate")


class HomeKeySink:
    """`seglock train --home`: a run's key goes to the home's keystore as the model's active key."""

    def __init__(self, home: str | Path):
        self.home = Path(home)

    def check(self, name: str) -> None:
        try:
            with Keystore.open(self.home, create=True) as store:
                taken = Home(self.home, store).is_taken(name)
        except KeystoreError as exc:
            raise ValueError(f"cannot open the keystore in {self.home}: {exc}") from None
        if taken:
            raise ValueError(f"{self.home} already has a model named {name!r}: choose another name (--name)")

    def store(self, name: str, key: CPKey | BlockKey) -> KeyRef:
        try:
            with Keystore.open(self.home, create=True) as store:
                version = store.add_model_key(name, *key_material(_key_mode(key), key), actor="train")
        except KeystoreError as exc:
            raise ValueError(f"cannot store the key in {self.home}: {exc}") from None
        return KeyRef(id=version.id, version=version.version)


def key_material(mode: Mode | str, key: CPKey | BlockKey) -> tuple[str, dict[str, Any]]:
    """(keystore kind, material dict) of a model key."""
    return ("cp" if mode == Mode.CP else "block"), key.to_dict()


def key_from_material(mode: Mode | str, material: dict[str, Any]) -> CPKey | BlockKey:
    return CPKey.from_dict(material) if mode == Mode.CP else BlockKey.from_dict(material)


def _key_mode(key: CPKey | BlockKey) -> Mode:
    return Mode.CP if isinstance(key, CPKey) else Mode(key.method)


def _saved_protection(manifest: Manifest) -> dict[str, Any]:
    # save_artifact records a cp tap's channel count itself
    return {k: v for k, v in manifest.protection.items() if k != "channels"}


def _revision_number(path: Path) -> int:
    match = _REVISION.fullmatch(Path(path).name)
    if match is None:
        raise ArtifactError(f"{path} is not a revision folder (r<N>) of a home")
    return int(match.group(1))


def _checked_name(name: str) -> str:
    try:
        return check_model_name(name)
    except ValueError as exc:
        raise InvalidModelName(str(exc)) from None
