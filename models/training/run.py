"""`train`: a whole run, from a data set on disk to an artifact and its key.

Data, model, key, `fit`, key storage (keystore or 0600 key file), artifact. A run checkpoints
after every epoch to OUT/.checkpoint (its key beside it, 0600) and continues from there with
`resume=True`; the checkpoint is removed once the artifact is written.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from seglock.client.modes import Mode, is_model_name
from seglock.client.transforms import BlockKey
from seglock.models.architectures import build_model
from seglock.models.artifact import KeyRef, Manifest, save_artifact
from seglock.models.data import DatasetError, RandomResizedCropFlip, detect_format, open_dataset
from seglock.models.data.folder import FolderDataset
from seglock.models.device import resolve_device
from seglock.models.keyfile import KeyFileError, read_key_file, write_key_file
from seglock.models.protect import CPKey
from seglock.models.training.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILE, CHECKPOINT_KEY, load_checkpoint
from seglock.models.training.config import (
    DEFAULT_SPLITS,
    HOLDOUT_EVERY,
    TrainConfig,
    TrainError,
    default_normalization,
)
from seglock.models.training.loop import check_fit_key, fit

__all__ = ["KeySink", "TrainResult", "train", "training_data"]



@dataclass
class TrainResult:
    artifact: Path
    manifest: Manifest
    best_epoch: int
    history: list[dict[str, Any]]
    key: CPKey | BlockKey | None = field(default=None, repr=False)
    key_ref: KeyRef | None = None
    key_file: Path | None = None
    home: Path | None = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready, without key material."""
        return {
            "artifact": str(self.artifact),
            "name": self.manifest.name,
            "protection": dict(self.manifest.protection),
            "key": None if self.key_ref is None else {"id": self.key_ref.id, "version": self.key_ref.version},
            "key_file": None if self.key_file is None else str(self.key_file),
            "home": None if self.home is None else str(self.home),
            "best_epoch": self.best_epoch,
            "history": self.history,
            "seconds": round(self.seconds, 3),
        }


class KeySink(Protocol):
    """Where a run's key goes when it is not a key file: the server side's keystore
    (`seglock.app.home.HomeKeySink`). `models` never imports the keystore itself (DESIGN)."""

    def check(self, name: str) -> None:
        """Raise (a ValueError) before training if `name` cannot be stored."""

    def store(self, name: str, key: CPKey | BlockKey) -> KeyRef:
        """Store the key as the active key of `name`; the reference the manifest carries."""


def training_data(config: TrainConfig) -> tuple[Dataset, Dataset, list[str]]:
    """(train set with augmentation, validation set, class names) of the config's data."""
    kind = detect_format(config.data)
    train_split, val_split = DEFAULT_SPLITS[kind]
    augment = RandomResizedCropFlip(scale=tuple(config.crop_scale)) if config.augment else None
    no_splits_file = kind == "folder" and not (Path(config.data) / "splits.json").is_file()
    if no_splits_file and config.train_split is None and config.val_split is None:
        # Any user's folder without splits.json: a fixed holdout, every 10th stem in sorted order.
        train_all = FolderDataset(config.data, "all", size=config.size, augment=augment, seed=config.seed)
        val_all = FolderDataset(config.data, "all", size=config.size)
        val_idx = list(range(0, len(train_all), HOLDOUT_EVERY)) if len(train_all) > 1 else []
        train_idx = [i for i in range(len(train_all)) if i not in set(val_idx)]
        return Subset(train_all, train_idx), Subset(val_all, val_idx), train_all.classes
    train_set = open_dataset(config.data, config.train_split or train_split, kind=kind, size=config.size,
                             augment=augment, seed=config.seed)
    val_set = open_dataset(config.data, config.val_split or val_split, kind=kind, size=config.size)
    if val_set.classes != train_set.classes:
        raise TrainError("the training and validation splits name different classes")
    return train_set, val_set, train_set.classes


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    key_sink: KeySink | None = None,
    key_out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train per `config` and write the artifact to `out_dir`; the key goes to `key_sink` (a
    keystore) or to the 0600 key file `key_out` (exactly one of them for keyed modes). `on_epoch` as in `fit`."""
    started = time.perf_counter()
    config.check()
    out_dir = Path(out_dir)
    protection = config.protection()
    mode = protection["mode"]
    name = config.name or _default_name(out_dir)
    if not is_model_name(name):
        raise TrainError(f"model name must be 1-64 letters, digits or . _ - (starting alphanumeric), got {name!r}")
    if key_sink is not None and key_out is not None:
        raise TrainError("give the key one place: a home's keystore or a key file, not both")
    if Mode(mode).has_model_key and key_sink is None and key_out is None:
        raise TrainError(f"{mode} training makes a key: store it in a keystore (--home) or a key file (--key-out)")
    if not Mode(mode).has_model_key:
        key_sink = key_out = None  # nothing to store
    _check_out_dir(out_dir, config.resume)
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    resuming = config.resume and (checkpoint_dir / CHECKPOINT_FILE).is_file()
    if config.resume and not resuming and progress:
        print(f"no checkpoint in {checkpoint_dir}: starting from the first epoch", file=sys.stderr)
    if key_out is not None:
        key_out = Path(key_out)
        if key_out.exists() and not resuming:
            raise TrainError(f"key file {key_out} already exists; refusing to overwrite it")
    if key_sink is not None and not resuming:
        try:
            key_sink.check(name)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
    resolve_device(config.device)  # a device this machine lacks stops the run before any work
    config = replace(config, seed=_run_seed(config.seed, checkpoint_dir, resuming))

    try:
        train_set, val_set, classes = training_data(config)
    except DatasetError as exc:
        raise TrainError(str(exc)) from None
    arch_kwargs = dict(config.arch_kwargs)
    if config.arch == "vit_seg":
        arch_kwargs.setdefault("image_size", [config.size, config.size])
    torch.manual_seed(config.seed)
    model = build_model(config.arch, len(classes), backbone_weights=config.backbone_weights, **arch_kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir.mkdir(mode=0o700, exist_ok=True)
    key = _run_key(checkpoint_dir, model, protection, name, resuming)
    normalization = default_normalization(mode)

    result = fit(model, train_set, val_set, config.fit_config(), protection=protection, key=key,
                 normalization=normalization, checkpoint_dir=checkpoint_dir, resume=resuming, progress=progress,
                 on_epoch=on_epoch)

    key_ref, key_file = None, None
    if key is not None and key_sink is not None:
        try:
            key_ref = key_sink.store(name, key)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
    elif key is not None:
        key_file = _write_run_key(key_out, key, name)
        key_ref = KeyRef(id=f"file-{secrets.token_hex(6)}", version=1)  # random: says nothing about the key
    model.to("cpu")
    manifest = save_artifact(model, out_dir, name=name, class_names=classes, input_size=(config.size, config.size),
                             normalization=normalization, protection=protection, key=key_ref, overwrite=True)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # gone with the swap already; this is belt and braces
    return TrainResult(artifact=out_dir, manifest=manifest, best_epoch=result.best_epoch, history=result.history,
                       key=key, key_ref=key_ref, key_file=key_file, home=getattr(key_sink, "home", None),
                       seconds=time.perf_counter() - started)


def _default_name(out_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", out_dir.resolve().name).lstrip("._-")[:64]
    if not is_model_name(name):
        raise TrainError(f"cannot make a model name from {out_dir}: pass a name (--name)")
    return name


def _check_out_dir(out_dir: Path, resume: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"{out_dir} exists and is not a folder")
    entries = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()
    if entries - {CHECKPOINT_DIR}:
        raise TrainError(f"{out_dir} is not empty: choose a new output folder")
    if CHECKPOINT_DIR in entries and not resume:
        raise TrainError(f"{out_dir / CHECKPOINT_DIR} holds an interrupted run: continue it with --resume, "
                         "or delete it to start over")


def _make_key(model: nn.Module, protection: Mapping[str, Any]) -> CPKey | BlockKey | None:
    mode = Mode(protection["mode"])
    if mode is Mode.CP:
        return CPKey.for_model(model, protection["tap"])
    if mode.is_block:
        return BlockKey.generate(mode, protection["block_size"])
    return None


def _run_seed(seed: int | None, checkpoint_dir: Path, resuming: bool) -> int:
    """The run's seed: the given one, else the checkpoint's when resuming, else a secret one.

    A CP-keyed model trained from a seed the thief can guess can be matched channel by channel
    against the thief's own training from that seed (docs/security.md), so the default seed comes
    from the OS's CSPRNG and is written nowhere but the run's checkpoint (mode 0700, deleted when
    the run ends).
    """
    if seed is not None:
        return seed
    saved = load_checkpoint(checkpoint_dir) if resuming else None
    if saved is not None:
        return int(saved["fingerprint"]["seed"])
    return secrets.randbelow(2**31)


def _run_key(checkpoint_dir: Path, model: nn.Module, protection: Mapping[str, Any], name: str,
             resuming: bool) -> CPKey | BlockKey | None:
    """The run's key: the checkpointed one when resuming, else a fresh one, saved beside the checkpoint."""
    path = checkpoint_dir / CHECKPOINT_KEY
    if resuming and path.is_file():
        key = read_key_file(path).key
        try:
            check_fit_key(model, protection, key)
        except TrainError:
            raise TrainError(f"the key in {path} does not fit this run's protection; delete {checkpoint_dir}") from None
        return key
    key = _make_key(model, protection)
    if key is not None:
        write_key_file(path, key, model=name, overwrite=True)
    return key


def _write_run_key(path: Path, key: CPKey | BlockKey, name: str) -> Path:
    """Write the key file; a resumed run that already wrote this very key may find it there."""
    if path.exists():
        try:
            if read_key_file(path).key == key:
                return path
        except KeyFileError:
            pass
        raise TrainError(f"key file {path} already exists and holds another key; refusing to overwrite it")
    try:
        return write_key_file(path, key, model=name)
    except KeyFileError as exc:
        raise TrainError(str(exc)) from None
