"""Training a segmentation model under any protection mode, from a data set on disk to an artifact.

Recipe (paper 000, 000_03ca646f856607f9.txt section IV-A): SGD with momentum 0.9 and weight
decay 1e-4, the poly schedule of eq. (8), lr_n = lr (1 - n / N)^0.9 per iteration, pixel-wise
cross-entropy ignoring 255 (+ 0.4 x the auxiliary head's loss where the architecture has one),
random resized crop and horizontal flip, the epoch with the lowest validation loss kept.
Paper 001 (001_1d6747102c10f252.txt section 3.1) uses cosine annealing with warm restarts
every ten epochs down to lr / 1000: `schedule="cosine"`.

Where the key acts:
- `cp`: the model is trained wrapped in `apply_key(model, tap, key)` (paper 000's CP in the
  loop), so its saved weights need the key at the tap.
- `shf`, `np`, `ffx`: every batch is encrypted with the one block key after augmentation.
- `per-image`: every image of every batch is encrypted with fresh keys (paper 003).
Then `seglock.models.inputs.scaled_input` divides by the mode's input scale and normalises.

`fit` is the loop on datasets and a model; `train` is the whole command: data, model, key,
`fit`, key storage (keystore or 0600 key file), artifact. A run checkpoints after every epoch
to OUT/.checkpoint (its key beside it, 0600) and continues from there with `resume=True`; the
checkpoint is removed once the artifact is written.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from seglock.client.modes import Mode, is_model_name
from seglock.client.transforms import BlockKey
from seglock.client.transforms.errors import TransformError
from seglock.client.transforms.geometry import check_divisible
from seglock.client.transforms.per_image import check_geometry
from seglock.models.architectures import build_model
from seglock.models.artifact import IMAGENET_NORMALIZATION, KeyRef, Manifest, save_artifact
from seglock.models.data import DatasetError, RandomResizedCropFlip, detect_format, open_dataset
from seglock.models.data.folder import FolderDataset
from seglock.models.errors import ModelError
from seglock.models.inputs import encrypt_for_mode, scaled_input
from seglock.models.keyfile import KeyFileError, read_key_file, write_key_file
from seglock.models.metrics import IGNORE_INDEX, MetricAccumulator
from seglock.models.protect import CPKey, apply_key
from seglock.models.taps import get_tap

__all__ = [
    "CHECKPOINT_DIR",
    "SCHEDULES",
    "FitResult",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "default_normalization",
    "fit",
    "lr_factor",
    "resolve_device",
    "train",
]

SCHEDULES = ("poly", "cosine")
CHECKPOINT_DIR = ".checkpoint"
AUX_WEIGHT = 0.4  # torchvision's segmentation reference: loss = out + 0.5 aux; mmseg's FCN aux head: 0.4
POLY_POWER = 0.9  # paper 000 eq. (8)
COSINE_RESTART_EPOCHS = 10  # paper 001: restarted every ten epochs
COSINE_MIN_FACTOR = 1e-3  # paper 001: 0.1 -> 0.0001
DEFAULT_BLOCK_SIZE = 4
DEFAULT_PER_IMAGE = (16, 4)  # paper 003: B = ViT patch size, S = 4
# Block and per-image modes mix colour channels, so per-channel ImageNet statistics mean nothing
# there; the scaled input lies in [0, 1] (paper 001 section 2.4) and is centred on 0.5.
CENTRED_NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
DEFAULT_SPLITS = {"folder": ("train", "val"), "voc": ("train-1318", "val-146"), "cityscapes": ("train", "val")}
HOLDOUT_EVERY = 10  # a folder data set without splits.json: every 10th stem validates
_CHECKPOINT_FILE = "last.pt"
_CHECKPOINT_KEY = "key.json"
_CHECKPOINT_FORMAT = "seglock-checkpoint"


class TrainError(ModelError):
    """A training run that cannot start or continue as asked."""


@dataclass
class TrainConfig:
    """The options of `seglock train` (defaults: paper 000's recipe at seglock's scale)."""

    data: str
    arch: str = "tiny"
    protect: str = "none"
    tap: str | None = None
    block_size: int | None = None  # shf/np/ffx: M (default 4); per-image: B (default 16)
    sub_block: int | None = None  # per-image: S (default 4)
    epochs: int = 30
    batch_size: int = 8
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "poly"
    size: int = 256
    device: str = "auto"
    seed: int = 0
    name: str | None = None  # artifact (and keystore) name; default: the output folder's name
    train_split: str | None = None  # default per format: folder train, voc train-1318, cityscapes train
    val_split: str | None = None  # folder val, voc val-146, cityscapes val
    workers: int = 0
    augment: bool = True
    crop_scale: tuple[float, float] = (0.25, 1.0)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None
    amp: bool | None = None  # None: on for CUDA
    resume: bool = False

    def protection(self) -> dict[str, Any]:
        """The public protection parameters of the artifact this config makes."""
        mode = Mode.parse(self.protect)
        if mode is None:
            raise TrainError(f"protection must be one of {', '.join(Mode)}, got {self.protect!r}")
        if mode is Mode.CP:
            if not self.tap:
                raise TrainError("cp training needs a tap (--tap): the feature map whose channels the key permutes")
            return {"mode": mode.value, "tap": self.tap}
        if mode.is_block:
            return {"mode": mode.value, "block_size": self.block_size or DEFAULT_BLOCK_SIZE}
        if mode is Mode.PER_IMAGE:
            return {"mode": mode.value, "block_size": self.block_size or DEFAULT_PER_IMAGE[0],
                    "sub_block": self.sub_block or DEFAULT_PER_IMAGE[1]}
        return {"mode": mode.value}

    def check(self) -> None:
        """Every option in range, with a message naming the flag."""
        for name in ("epochs", "batch_size", "size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise TrainError("momentum must be in [0, 1) and weight decay non-negative")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.workers < 0 or self.seed < 0:
            raise TrainError("workers and seed must be non-negative")
        mode = Mode.parse(self.protect)
        if (mode is None or not mode.encrypts_input) and (self.block_size or self.sub_block):
            raise TrainError(f"block-size and sub-block apply to block and per-image modes, not {self.protect!r}")
        if self.protect != Mode.CP and self.tap:
            raise TrainError(f"tap applies to cp, not {self.protect!r}")
        if self.protect != Mode.PER_IMAGE and self.sub_block:
            raise TrainError("sub-block applies to per-image only")
        check_input_geometry(self.protection(), self.size)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["crop_scale"] = list(self.crop_scale)
        return data


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]  # CPU copies of the best epoch's state dict
    best_epoch: int  # 1-based
    history: list[dict[str, Any]]  # one dict per epoch: epoch, train_loss, val_loss, val_mIoU, ...


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


# -- pieces ----------------------------------------------------------------------------------------


def default_normalization(mode: str) -> dict[str, list[float]]:
    """ImageNet statistics for plain pixels (none, cp); centred [0, 1] for encrypted inputs."""
    source = CENTRED_NORMALIZATION if Mode(mode).encrypts_input else IMAGENET_NORMALIZATION
    return {k: list(v) for k, v in source.items()}


def check_input_geometry(protection: Mapping[str, Any], size: int | tuple[int, int]) -> None:
    """Block modes need M | H, W; per-image needs B | H, W and S | B."""
    height, width = (size, size) if isinstance(size, int) else size
    mode = Mode(protection["mode"])
    try:
        if mode.is_block:
            check_divisible(height, width, protection["block_size"])
        elif mode is Mode.PER_IMAGE:
            check_geometry(height, width, protection["block_size"], protection["sub_block"])
    except TransformError as exc:
        raise TrainError(f"input size {height}x{width} does not fit {mode}: {exc}") from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; a CUDA device that is not there is an error."""
    if isinstance(device, torch.device):
        return device
    spec = str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(spec)
    except RuntimeError:
        raise TrainError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"device {device!r} asked for but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise TrainError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    return resolved


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, schedule: str) -> float:
    """The learning rate at iteration `step` as a fraction of the initial one."""
    if schedule == "poly":  # paper 000 eq. (8)
        return max(0.0, 1.0 - step / max(1, total_steps)) ** POLY_POWER
    period = max(1, COSINE_RESTART_EPOCHS * steps_per_epoch)  # SGDR, paper 001
    t = (step % period) / period
    return COSINE_MIN_FACTOR + (1.0 - COSINE_MIN_FACTOR) * 0.5 * (1.0 + math.cos(math.pi * t))


def _amp_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _grad_scaler(enabled: bool):
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3


def _set_epoch(dataset: Dataset, epoch: int) -> None:
    inner = dataset.dataset if isinstance(dataset, Subset) else dataset
    if hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)


def _check_fit_key(model: nn.Module, protection: Mapping[str, Any], key: Any) -> None:
    mode = Mode.parse(protection.get("mode"))
    if mode is None:
        raise TrainError(f"protection mode must be one of {', '.join(Mode)}, got {protection.get('mode')!r}")
    if mode is Mode.CP:
        tap = get_tap(model, protection.get("tap"))
        if not isinstance(key, CPKey) or key.channels != tap.channels:
            raise TrainError(f"cp training at tap {tap.name!r} needs a CPKey of {tap.channels} channels")
    elif mode.is_block:
        if not isinstance(key, BlockKey) or key.method != mode or key.block_size != protection.get("block_size"):
            raise TrainError(f"{mode} training needs a {mode} BlockKey of block size {protection.get('block_size')}")
    elif key is not None:
        raise TrainError(f"{mode} training takes no key")


def _loss(outputs: Mapping[str, torch.Tensor], masks: torch.Tensor, aux_weight: float) -> torch.Tensor:
    loss = F.cross_entropy(outputs["out"].float(), masks, ignore_index=IGNORE_INDEX)
    if "aux" in outputs and outputs["aux"] is not None and aux_weight:
        loss = loss + aux_weight * F.cross_entropy(outputs["aux"].float(), masks, ignore_index=IGNORE_INDEX)
    return loss


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_checkpoint(folder: Path, payload: dict[str, Any]) -> None:
    """Atomic and 0600: a crash leaves the previous checkpoint or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{_CHECKPOINT_FILE}.", dir=folder)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, folder / _CHECKPOINT_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load_checkpoint(folder: Path) -> dict[str, Any] | None:
    path = folder / _CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which
        raise TrainError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a seglock training checkpoint")
    return payload


# -- the loop --------------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    *,
    protection: Mapping[str, Any],
    key: CPKey | BlockKey | None,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    schedule: str = "poly",
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    amp: bool | None = None,
    normalization: Mapping[str, Any] | None = None,
    workers: int = 0,
    resume: bool = False,
    aux_weight: float = AUX_WEIGHT,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train `model` in place on (uint8 HWC image, int64 mask) pairs; returns the best epoch.

    On return the model holds the best epoch's weights. With `checkpoint_dir`, each epoch ends
    with a checkpoint there; `resume=True` continues from it (same settings, else TrainError).
    `on_epoch(record)` is called after each epoch's checkpoint.
    """
    protection = dict(protection)
    mode = protection.get("mode")
    _check_fit_key(model, protection, key)
    if schedule not in SCHEDULES:
        raise TrainError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if len(train_set) == 0:
        raise TrainError("the training set is empty")
    device = resolve_device(device)
    use_amp = (device.type == "cuda") if amp is None else bool(amp and device.type == "cuda")
    amp_dtype = _amp_dtype(device) if use_amp else torch.float32
    channels_last = device.type == "cuda"
    normalization = dict(normalization or default_normalization(mode))
    block_key = key if Mode(mode).is_block else None

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = apply_key(model, protection["tap"], key).to(device) if mode == Mode.CP else model

    drop_last = len(train_set) > batch_size  # no 1-image tail batch for BatchNorm
    steps_per_epoch = len(train_set) // batch_size if drop_last else 1
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, steps_per_epoch, schedule))
    scaler = _grad_scaler(use_amp and amp_dtype == torch.float16)
    fingerprint = {"mode": mode, "epochs": epochs, "batch_size": batch_size, "lr": float(lr), "schedule": schedule,
                   "train_size": len(train_set), "seed": seed}

    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, best_loss, start_epoch = 0, math.inf, 0
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        saved = _load_checkpoint(folder) if resume else None
        if saved is not None:
            if saved["fingerprint"] != fingerprint:
                raise TrainError(f"the checkpoint in {folder} was made with other settings "
                                 f"({saved['fingerprint']}); delete it or resume with those")
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            scaler.load_state_dict(saved["scaler"])
            torch.set_rng_state(saved["rng"])
            if device.type == "cuda" and saved.get("cuda_rng") is not None:
                torch.cuda.set_rng_state_all(saved["cuda_rng"])
            history, best_state = list(saved["history"]), saved["best_state"]
            best_epoch, best_loss, start_epoch = saved["best_epoch"], saved["best_loss"], saved["epoch"]

    def inputs(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device, non_blocking=True)
        x = scaled_input(encrypt_for_mode(images, protection, block_key), mode, normalization)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        _set_epoch(train_set, epoch)
        order = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                            generator=order, num_workers=workers, pin_memory=device.type == "cuda")
        net.train()
        total, seen = 0.0, 0
        bar = _progress(loader, progress, f"epoch {epoch + 1}/{epochs}")
        for images, masks in bar:
            x, masks = inputs(images), masks.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                outputs = net.forward_train(x)
            loss = _loss(outputs, masks, aux_weight)
            if not torch.isfinite(loss):
                raise TrainError(f"the loss became {loss.item()} in epoch {epoch + 1}: lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total += loss.item() * images.shape[0]
            seen += images.shape[0]
            if progress:
                bar.set_postfix(loss=f"{total / seen:.4f}")
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / max(1, seen),
                                  "lr": optimizer.param_groups[0]["lr"]}
        if val_set is not None and len(val_set):
            record.update(_validate(net, val_set, inputs, device, use_amp, amp_dtype, batch_size, workers))
        record["seconds"] = round(time.perf_counter() - started, 3)
        history.append(record)
        score = record.get("val_loss", -epoch)  # no validation set: the last epoch is kept
        if best_state is None or score < best_loss:
            best_state, best_epoch, best_loss = _state_copy(model), epoch + 1, score
        if progress:
            _report(record)
        if folder is not None:
            _save_checkpoint(folder, {
                "format": _CHECKPOINT_FORMAT, "version": 1, "fingerprint": fingerprint, "epoch": epoch + 1,
                "model": _state_copy(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                "history": history, "best_state": best_state, "best_epoch": best_epoch, "best_loss": best_loss,
            })
        if on_epoch is not None:
            on_epoch(dict(record))

    model.load_state_dict(best_state)
    model.to(memory_format=torch.contiguous_format).eval()
    return FitResult(best_state=best_state, best_epoch=best_epoch, history=history)


def _validate(net, val_set, inputs, device, use_amp, amp_dtype, batch_size, workers) -> dict[str, float]:
    """Validation loss (mean over labelled pixels) and metrics of the main output."""
    net.eval()
    loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=workers)
    loss_sum, pixels = 0.0, 0
    metrics: MetricAccumulator | None = None
    with torch.inference_mode():
        for images, masks in loader:
            x, masks = inputs(images), masks.to(device)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                logits = net(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum").item()
            pixels += int((masks != IGNORE_INDEX).sum())
            if metrics is None:
                metrics = MetricAccumulator(logits.shape[1])
            metrics.update(logits.argmax(1).cpu(), masks.cpu())
    if not pixels:
        return {"val_loss": math.nan}
    scores = metrics.compute()
    return {"val_loss": loss_sum / pixels, "val_mIoU": scores["mIoU"], "val_aAcc": scores["aAcc"]}


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True, disable=None)


def _report(record: Mapping[str, Any]) -> None:
    parts = [f"epoch {record['epoch']}", f"train_loss {record['train_loss']:.4f}"]
    if "val_loss" in record:
        parts += [f"val_loss {record['val_loss']:.4f}", f"val_mIoU {record.get('val_mIoU', math.nan):.2f}"]
    parts.append(f"{record['seconds']:.1f}s")
    print("  ".join(parts), file=sys.stderr)


# -- the command ------------------------------------------------------------------------------------


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
        return CPKey.generate(get_tap(model, protection["tap"]).channels)
    if mode.is_block:
        return BlockKey.generate(mode, protection["block_size"])
    return None


def _run_key(checkpoint_dir: Path, model: nn.Module, protection: Mapping[str, Any], name: str,
             resuming: bool) -> CPKey | BlockKey | None:
    """The run's key: the checkpointed one when resuming, else a fresh one, saved beside the checkpoint."""
    path = checkpoint_dir / _CHECKPOINT_KEY
    if resuming and path.is_file():
        key = read_key_file(path).key
        try:
            _check_fit_key(model, protection, key)
        except TrainError:
            raise TrainError(f"the key in {path} does not fit this run's protection; delete {checkpoint_dir}") from None
        return key
    key = _make_key(model, protection)
    if key is not None:
        write_key_file(path, key, model=name, overwrite=True)
    return key


class KeySink(Protocol):
    """Where a run's key goes when it is not a key file: the server side's keystore
    (`seglock.app.home.HomeKeySink`). `models` never imports the keystore itself (DESIGN)."""

    def check(self, name: str) -> None:
        """Raise (a ValueError) before training if `name` cannot be stored."""

    def store(self, name: str, key: CPKey | BlockKey) -> KeyRef:
        """Store the key as the active key of `name`; the reference the manifest carries."""


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
    resuming = config.resume and (checkpoint_dir / _CHECKPOINT_FILE).is_file()
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
    device = resolve_device(config.device)

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

    result = fit(model, train_set, val_set, protection=protection, key=key, epochs=config.epochs,
                 batch_size=config.batch_size, lr=config.lr, momentum=config.momentum,
                 weight_decay=config.weight_decay, schedule=config.schedule, device=device, seed=config.seed,
                 progress=progress, checkpoint_dir=checkpoint_dir, amp=config.amp, normalization=normalization,
                 workers=config.workers, resume=resuming, on_epoch=on_epoch)

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

