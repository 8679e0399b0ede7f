"""The models a server serves: loaded modules, their batchers, and hot swaps.

Everything on disk and in the keystore (revisions, the revision in use, import, the disk-and-keystore
half of key rotation) belongs to `seglock.app.home.Home`; the registry keeps what serving needs on
top of it: one engine per model, and following or making rotations without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seglock.app import affinity
from seglock.app.backends import probe_batch
from seglock.app.engine import DynamicBatcher, ModelRunner
from seglock.app.errors import ModelNotFound
from seglock.app.home import Home, Rotation, check_rotatable
from seglock.app.observability import Metrics
from seglock.app.settings import Settings
from seglock.client.modes import Mode
from seglock.client.transforms import BlockKey
from seglock.keystore import Keystore
from seglock.models import Manifest
from seglock.models.inputs import model_input

log = logging.getLogger("seglock.registry")


@dataclass
class HostedModel:
    """One model as served: its manifest, revision, key version and engine."""

    name: str
    manifest: Manifest
    revision: int
    batcher: DynamicBatcher
    block_key: BlockKey | None = None  # shf/np/ffx: the key clients encrypt with

    @property
    def mode(self) -> Mode:
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


class Registry:
    """Serves every model of a home: one engine each, kept on the revision of the active key."""

    def __init__(self, settings: Settings, keystore: Keystore, metrics: Metrics, device: torch.device):
        self.settings = settings
        self.keystore = keystore
        self.metrics = metrics
        self.device = device
        self.home = Home(settings.home, keystore, models_root=settings.models_root)
        self._models: dict[str, HostedModel] = {}
        self._rotation_locks: dict[str, asyncio.Lock] = {}
        self._sync_lock = threading.Lock()
        # after set_threads: `auto` pins only a one-thread forward
        self.forward_core = affinity.forward_core(settings.pin_forward, device.type, torch.get_num_threads(),
                                                  settings.workers)

    def names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str) -> HostedModel:
        try:
            hosted = self._models[name]
        except KeyError:
            raise ModelNotFound(f"unknown model {name!r}") from None
        self._follow_rotation(hosted)
        return hosted

    def current(self, name: str) -> HostedModel | None:
        """The model if `get` would return it without loading anything (known, and no rotation made
        elsewhere to follow, as far as the keystore last read); None otherwise: call `get` off the
        event loop then. Reads no file and no database: safe on the event loop."""
        hosted = self._models.get(name)
        if hosted is None or self._rotated_elsewhere(hosted, refresh=False) is not None:
            return None
        return hosted

    def _rotated_elsewhere(self, hosted: HostedModel, *, refresh: bool = True) -> int | None:
        """The keystore's active key version of a cp model if it is not the one served, else None."""
        if hosted.mode is not Mode.CP:
            return None
        active = self.keystore.active_key_version(hosted.name, refresh=refresh)
        return None if active in (None, hosted.key_version) else active

    def _follow_rotation(self, hosted: HostedModel) -> None:
        """Serve the revision of the keystore's active key when another worker or the CLI rotated it.

        The keystore was refreshed by this request's token check, so this is a dict lookup; the
        old folded model keeps giving correct masks until the new one is swapped in.
        """
        active = self._rotated_elsewhere(hosted)
        if active is None:
            return
        with self._sync_lock:
            if active == hosted.key_version:  # another request followed it meanwhile
                return
            found = self.home.revision_for_key(hosted.name, active)
            if found is None:
                return
            revision, path = found
            try:
                module, manifest, _ = self.home.serving_module(hosted.name, path)
            except Exception as exc:  # e.g. the revision vanished under a second rotation
                log.warning("model %s: rotated revision r%d not loaded yet: %s", hosted.name, revision, exc)
                return
            self._swap(hosted, revision, manifest, module)
            log.info("model %s: now serving r%d (key version %d, rotated elsewhere)",
                     hosted.name, revision, active)

    def load_all(self) -> None:
        self.home.models_dir.mkdir(parents=True, exist_ok=True)
        for name in self.home.model_names():
            try:
                self.load(name)
            except Exception as exc:  # one broken model must not keep the others offline
                log.error("model %s not loaded: %s", name, exc)

    def load(self, name: str) -> HostedModel:
        """Load (or reload) one model: the revision matching its active key, stale ones cleaned up."""
        path, module, manifest, block_key = self.home.load_serving(name)
        runner = ModelRunner(module, self.device, amp=self.settings.amp, channels_last=self.settings.channels_last,
                             backend=self.settings.backend, compile_budget_s=self.settings.compile_budget_s,
                             probe=probe_batch(tuple(manifest.input_size), self.settings.max_batch), name=name)
        max_batch = self.settings.max_batch
        if self.settings.tune_batch:
            max_batch, _ = runner.cheapest_batch(max_batch)
        batcher = DynamicBatcher(runner, name=name, max_batch=max_batch,
                                 max_wait_ms=self.settings.max_wait_ms, queue_size=self.settings.queue_size,
                                 on_batch=self.metrics.observe_batch, core=self.forward_core)
        hosted = HostedModel(name, manifest, int(path.name[1:]), batcher, block_key)
        if self.settings.warmup:
            try:
                self.warm_up(hosted)
            except BaseException:
                batcher.close()
                raise
        self._models[name] = hosted
        log.info("model %s r%d loaded (%s)", name, hosted.revision, manifest.mode)
        return hosted

    @staticmethod
    def warm_up(hosted: HostedModel) -> None:
        """One blank image through the model's way in and on its batcher's thread, before it serves:
        on a GPU each thread's first forward takes over a second (`DynamicBatcher.run_sync`)."""
        height, width = hosted.manifest.input_size
        dummy = torch.zeros((1, height, width, 3), dtype=torch.uint8)
        hosted.batcher.run_sync([hosted.prepare(dummy)[0]])

    def close(self) -> None:
        for hosted in self._models.values():
            hosted.batcher.close()

    async def rotate_key(self, name: str) -> dict[str, Any]:
        """Rotate a served cp model's key (`Home.rotate_key`) and swap the re-keyed module in."""
        hosted = await asyncio.to_thread(self.get, name)  # following a rotation elsewhere loads a model
        check_rotatable(hosted.manifest)
        lock = self._rotation_locks.setdefault(name, asyncio.Lock())
        async with lock:
            started = time.perf_counter()

            def swap(rotation: Rotation, module: nn.Module) -> None:
                self._swap(self._models[name], rotation.revision, rotation.manifest, module)

            rotation = await asyncio.to_thread(self.home.rotate_key, name, swap)
            self.metrics.key_rotations.labels(name, "ok").inc()
            return {**rotation.summary(), "seconds": round(time.perf_counter() - started, 3)}

    def _swap(self, hosted: HostedModel, revision: int, manifest: Manifest, module: nn.Module) -> None:
        hosted.batcher.runner.swap(module)
        hosted.manifest, hosted.revision = manifest, revision
