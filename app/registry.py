"""The models a server hosts: their artifacts on disk, keys from the keystore, engines in memory.

Home layout:
    HOME/keystore.json                       the encrypted keystore (keys, tokens, audit)
    HOME/models/<name>/r<N>/                 artifact revisions; manifest.key.version names the key
The revision in use is the one whose manifest names the keystore's active key version (keyless
models: the newest). Key rotation writes the new revision and key before activating them, so
after a crash at any point `reconcile` finds exactly one consistent (artifact, key) pair.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import torch

from seglock.app.engine import DynamicBatcher, ModelRunner
from seglock.app.observability import Metrics
from seglock.app.settings import Settings
from seglock.client.transforms import BlockKey
from seglock.keystore import Keystore
from seglock.keystore.errors import KeystoreError
from seglock.models import CPKey, KeyRef, Manifest, fold_key, load_artifact, read_manifest, rekey, save_artifact
from seglock.models.inputs import model_input

log = logging.getLogger("seglock.registry")

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REVISION = re.compile(r"^r(\d+)$")
BLOCK_MODES = ("shf", "np", "ffx")
KEYED_MODES = ("cp",) + BLOCK_MODES


class RegistryError(Exception):
    """A model operation that cannot be done; `status` says which HTTP answer fits."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class HostedModel:
    """One model as served: its manifest, revision, key version and engine."""

    name: str
    manifest: Manifest
    revision: int
    batcher: DynamicBatcher
    block_key: BlockKey | None = None  # shf/np/ffx: the key clients encrypt with

    @property
    def mode(self) -> str:
        return self.manifest.mode

    @property
    def key_version(self) -> int | None:
        return None if self.manifest.key is None else self.manifest.key.version

    def public_info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": self.name,
            "model_version": self.revision,
            "key_version": self.key_version,
            "architecture": m.architecture,
            "num_classes": m.num_classes,
            "class_names": list(m.class_names),
            "input_size": list(m.input_size),
            "normalization": {k: list(v) for k, v in m.normalization.items()},
            "protection": dict(m.protection),
        }

    def prepare(self, batch_nhwc: torch.Tensor) -> torch.Tensor:
        """Encrypted (or plain, for none/cp) HWC batch -> the model's normalised input."""
        return model_input(batch_nhwc, self.manifest)


def models_dir(home: Path) -> Path:
    return Path(home) / "models"


def revisions(home: Path, name: str) -> dict[int, Path]:
    folder = models_dir(home) / name
    found = {}
    if folder.is_dir():
        for child in folder.iterdir():
            match = _REVISION.match(child.name)
            if match and child.is_dir():
                found[int(match.group(1))] = child
    return found


class HomeKeySink:
    """`seglock train --home`: a run's key goes to the home's keystore as the model's active key."""

    def __init__(self, home: str | Path):
        self.home = Path(home)

    def check(self, name: str) -> None:
        try:
            with Keystore.open(self.home, create=True) as store:
                taken = bool(store.model_key_versions(name))
        except KeystoreError as exc:
            raise ValueError(f"cannot open the keystore in {self.home}: {exc}") from None
        if taken or (models_dir(self.home) / name).exists():
            raise ValueError(f"{self.home} already has a model named {name!r}: choose another name (--name)")

    def store(self, name: str, key: CPKey | BlockKey) -> KeyRef:
        kind, material = key_material("cp" if isinstance(key, CPKey) else "block", key)
        try:
            with Keystore.open(self.home, create=True) as store:
                version = store.add_model_key(name, kind, material, actor="train")
        except KeystoreError as exc:
            raise ValueError(f"cannot store the key in {self.home}: {exc}") from None
        return KeyRef(id=version.id, version=version.version)


def key_material(mode: str, key: CPKey | BlockKey) -> tuple[str, dict[str, Any]]:
    """(keystore kind, material dict) of a model key."""
    return ("cp" if mode == "cp" else "block"), key.to_dict()


def key_from_material(mode: str, material: dict[str, Any]) -> CPKey | BlockKey:
    return CPKey.from_dict(material) if mode == "cp" else BlockKey.from_dict(material)


def reconcile(home: Path, keystore: Keystore, name: str) -> Path:
    """The artifact revision to serve for `name`, after cleaning up an interrupted rotation."""
    found = revisions(home, name)
    if not found:
        raise RegistryError(404, f"model {name} has no artifact under {models_dir(home) / name}")
    manifests = {rev: read_manifest(path) for rev, path in found.items()}
    newest = max(found)
    if manifests[newest].mode not in KEYED_MODES:
        keep = newest
    else:
        active = keystore.active_model_key(name)
        if active is None:
            raise RegistryError(503, f"model {name} has no active key in the keystore")
        matching = [rev for rev, m in manifests.items() if m.key is not None and m.key.version == active.version]
        if not matching:
            raise RegistryError(503, f"no artifact of model {name} matches its active key version {active.version}")
        keep = max(matching)
        # versions written by an unfinished rotation, or retired by a finished one, are destroyed
        for version in keystore.model_key_versions(name):
            if version.version != active.version and version.state != "destroyed":
                keystore.destroy_model_key(name, version.version, actor="reconcile")
    for rev, path in found.items():
        if rev != keep:
            shutil.rmtree(path, ignore_errors=True)
            log.info("model %s: removed stale revision r%d", name, rev)
    return found[keep]


def import_artifact(home: Path, keystore: Keystore, source: Path, *, name: str | None = None,
                    key: CPKey | BlockKey | None = None, actor: str = "cli") -> Manifest:
    """Copy an artifact into HOME as revision r1, re-keyed to a fresh key where that is exact.

    CP models are re-keyed (the key given is usually public, e.g. a bundled demo key); block
    models keep theirs, since changing an input key needs retraining.
    """
    model, manifest = load_artifact(source)
    name = name or manifest.name
    if not MODEL_NAME.match(name):
        raise RegistryError(400, f"invalid model name {name!r}")
    if revisions(home, name):
        raise RegistryError(409, f"model {name} already exists in {home}")
    if manifest.mode in KEYED_MODES and key is None:
        raise RegistryError(400, f"model {name} is {manifest.mode}-protected: its key file is needed to import it")
    if manifest.mode == "cp":
        key = rekey(model, manifest.protection["tap"], key)
    key_ref = None
    if manifest.mode in KEYED_MODES:
        kind, material = key_material(manifest.mode, key)
        version = keystore.add_model_key(name, kind, material, activate=True, actor=actor)
        key_ref = KeyRef(id=version.id, version=version.version)
    protection = {k: v for k, v in manifest.protection.items() if k != "channels"}
    return save_artifact(model, models_dir(home) / name / "r1", name=name,
                         class_names=list(manifest.class_names), input_size=list(manifest.input_size),
                         normalization=manifest.normalization, protection=protection, key=key_ref)


class Registry:
    """Loads every model under HOME/models, serves them, and rotates their keys."""

    def __init__(self, settings: Settings, keystore: Keystore, metrics: Metrics, device: torch.device):
        self.settings = settings
        self.keystore = keystore
        self.metrics = metrics
        self.device = device
        self.home = Path(settings.home)
        self._models: dict[str, HostedModel] = {}
        self._rotation_locks: dict[str, asyncio.Lock] = {}
        self._sync_lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str) -> HostedModel:
        try:
            hosted = self._models[name]
        except KeyError:
            raise RegistryError(404, f"unknown model {name!r}") from None
        if hosted.mode == "cp":
            self._follow_rotation(hosted)
        return hosted

    def _follow_rotation(self, hosted: HostedModel) -> None:
        """Serve the revision of the keystore's active key when another worker or the CLI rotated it.

        The keystore was refreshed by this request's token check, so this is a dict lookup; the
        old folded model keeps giving correct masks until the new one is swapped in.
        """
        active = self.keystore.active_model_key(hosted.name)
        if active is None or active.version == hosted.key_version:
            return
        with self._sync_lock:
            if active.version == hosted.key_version:
                return
            for revision, path in sorted(revisions(self.home, hosted.name).items(), reverse=True):
                manifest = read_manifest(path)
                if manifest.key is not None and manifest.key.version == active.version:
                    try:
                        module, manifest, _ = self._serving_module(hosted.name, path)
                    except Exception as exc:  # e.g. the revision vanished under a second rotation
                        log.warning("model %s: rotated revision r%d not loaded yet: %s", hosted.name, revision, exc)
                        return
                    hosted.batcher.runner.swap(module)
                    hosted.manifest, hosted.revision = manifest, revision
                    log.info("model %s: now serving r%d (key version %d, rotated elsewhere)",
                             hosted.name, revision, active.version)
                    return

    def load_all(self) -> None:
        folder = models_dir(self.home)
        folder.mkdir(parents=True, exist_ok=True)
        for child in sorted(folder.iterdir()):
            if child.is_dir() and MODEL_NAME.match(child.name):
                try:
                    self.load(child.name)
                except Exception as exc:  # one broken model must not keep the others offline
                    log.error("model %s not loaded: %s", child.name, exc)

    def model_lock(self, name: str):
        """Held while a model's revisions or keys change (rotation, clean-up after a cut-off one), so
        workers, replicas and the CLI sharing a home never tidy away each other's half-done work.
        With a database keystore the lock is the database's, so it holds across hosts too."""
        storage = self.keystore.storage
        if storage.kind != "file":
            return storage.exclusive(f"seglock-rotate:{name}")
        return filelock.FileLock(str(models_dir(self.home) / name / ".rotate.lock"), mode=0o600)

    def load(self, name: str) -> HostedModel:
        """Load (or reload) one model: the revision matching its active key, stale ones cleaned up."""
        with self.model_lock(name):
            self.keystore.refresh()
            path = reconcile(self.home, self.keystore, name)
        module, manifest, block_key = self._serving_module(name, path)
        runner = ModelRunner(module, self.device, amp=self.settings.amp,
                             channels_last=self.settings.channels_last)
        batcher = DynamicBatcher(runner, name=name, max_batch=self.settings.max_batch,
                                 max_wait_ms=self.settings.max_wait_ms, queue_size=self.settings.queue_size,
                                 on_batch=self.metrics.observe_batch)
        hosted = HostedModel(name, manifest, int(path.name[1:]), batcher, block_key)
        self._models[name] = hosted
        log.info("model %s r%d loaded (%s)", name, hosted.revision, manifest.mode)
        return hosted

    def _serving_module(self, name: str, path: Path):
        model, manifest = load_artifact(path)
        block_key = None
        if manifest.mode in KEYED_MODES:
            stored = self.keystore.get_model_key(name, manifest.key.version)
            key = key_from_material(manifest.mode, stored.material)
            if manifest.mode == "cp":
                model = fold_key(model, manifest.protection["tap"], key)  # zero cost at inference
            else:
                block_key = key
        return model, manifest, block_key

    def warm_up(self) -> None:
        for hosted in self._models.values():
            height, width = hosted.manifest.input_size
            dummy = torch.zeros((1, height, width, 3), dtype=torch.uint8)
            hosted.batcher.run_sync([hosted.prepare(dummy)[0]])

    def close(self) -> None:
        for hosted in self._models.values():
            hosted.batcher.close()

    async def rotate_key(self, name: str, *, actor: str) -> dict[str, Any]:
        hosted = self.get(name)
        if hosted.mode in BLOCK_MODES:
            raise RegistryError(409, f"model {name} is {hosted.mode}-protected: a new input key needs re-training")
        if hosted.mode != "cp":
            raise RegistryError(400, f"model {name} ({hosted.mode}) has no key to rotate")
        lock = self._rotation_locks.setdefault(name, asyncio.Lock())
        async with lock:
            started = time.perf_counter()
            result = await asyncio.to_thread(self._rotate_cp, name)
            result["seconds"] = round(time.perf_counter() - started, 3)
            return result

    def _rotate_cp(self, name: str) -> dict[str, Any]:
        """Exact re-key -> new revision on disk -> keystore commit -> hot swap -> old key destroyed.

        Under a file lock per model, so workers, replicas and the CLI sharing a home rotate one at a time.
        """
        with self.model_lock(name):
            self.keystore.refresh()
            self._follow_rotation(self._models[name])
            return self._rotate_cp_locked(name)

    def _rotate_cp_locked(self, name: str) -> dict[str, Any]:
        hosted = self._models[name]
        old_path = revisions(self.home, name)[hosted.revision]
        model, manifest = load_artifact(old_path)
        tap = manifest.protection["tap"]
        old_version = manifest.key.version
        old_key = key_from_material("cp", self.keystore.get_model_key(name, old_version).material)
        new_key = rekey(model, tap, old_key)
        kind, material = key_material("cp", new_key)
        added = self.keystore.add_model_key(name, kind, material, activate=False, actor=f"rotate:{name}")
        new_revision = max(revisions(self.home, name)) + 1
        new_path = models_dir(self.home) / name / f"r{new_revision}"
        protection = {k: v for k, v in manifest.protection.items() if k != "channels"}
        new_manifest = save_artifact(model, new_path, name=name, class_names=list(manifest.class_names),
                                     input_size=list(manifest.input_size), normalization=manifest.normalization,
                                     protection=protection, key=KeyRef(id=added.id, version=added.version))
        self.keystore.set_active(name, added.version, actor=f"rotate:{name}")
        hosted.batcher.runner.swap(fold_key(model, tap, new_key))
        hosted.manifest, hosted.revision = new_manifest, new_revision
        shutil.rmtree(old_path, ignore_errors=True)
        self.keystore.destroy_model_key(name, old_version, actor=f"rotate:{name}")
        self.metrics.key_rotations.labels(name, "ok").inc()
        return {"model": name, "previous_key_version": old_version, "key_version": added.version}
