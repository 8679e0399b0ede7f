"""The training loop: `fit` trains a model in place on (uint8 HWC image, int64 mask) pairs.

Where the key acts:
- `cp`: the model is trained wrapped in `apply_key(model, tap, key)` (paper 000's CP in the
  loop), so its saved weights need the key at the tap.
- `shf`, `np`, `ffx`: every batch is encrypted with the one block key after augmentation.
- `per-image`: every image of every batch is encrypted with fresh keys (paper 003).
Then `seglock.models.inputs.scaled_input` divides by the mode's input scale and normalises.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from seglock.client.modes import Mode
from seglock.client.transforms import BlockKey
from seglock.models.device import resolve_device
from seglock.models.errors import ModelError
from seglock.models.inputs import encrypt_for_mode, scaled_input
from seglock.models.metrics import IGNORE_INDEX, MetricAccumulator
from seglock.models.protect import CPKey, apply_key, bind_key
from seglock.models.training.checkpoint import load_checkpoint, restore_checkpoint, save_checkpoint
from seglock.models.training.config import (
    COSINE_MIN_FACTOR,
    COSINE_RESTART_EPOCHS,
    POLY_POWER,
    FitConfig,
    TrainError,
    default_normalization,
)

__all__ = ["FitResult", "check_fit_key", "fit", "lr_factor"]


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]  # CPU copies of the best epoch's state dict
    best_epoch: int  # 1-based
    history: list[dict[str, Any]]  # one dict per epoch: epoch, train_loss, val_loss, val_mIoU, ...


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, schedule: str, power: float = POLY_POWER) -> float:
    """The learning rate at iteration `step` as a fraction of the initial one."""
    if schedule == "poly":  # paper 000 eq. (8)
        return max(0.0, 1.0 - step / max(1, total_steps)) ** power
    period = max(1, COSINE_RESTART_EPOCHS * steps_per_epoch)  # SGDR, paper 001
    t = (step % period) / period
    return COSINE_MIN_FACTOR + (1.0 - COSINE_MIN_FACTOR) * 0.5 * (1.0 + math.cos(math.pi * t))


def check_fit_key(model: nn.Module, protection: Mapping[str, Any], key: Any) -> None:
    """TrainError unless `key` is the kind of key `protection` trains with."""
    mode = Mode.parse(protection.get("mode"))
    if mode is None:
        raise TrainError(f"protection mode must be one of {', '.join(Mode)}, got {protection.get('mode')!r}")
    if mode is Mode.CP:
        try:
            bind_key(model, protection.get("tap"), key)
        except ModelError as exc:
            raise TrainError(f"cp training at tap {protection.get('tap')!r} needs a CPKey for it: {exc}") from None
    elif mode.is_block:
        if not isinstance(key, BlockKey) or key.method != mode or key.block_size != protection.get("block_size"):
            raise TrainError(f"{mode} training needs a {mode} BlockKey of block size {protection.get('block_size')}")
    elif key is not None:
        raise TrainError(f"{mode} training takes no key")


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    config: FitConfig,
    *,
    protection: Mapping[str, Any],
    key: CPKey | BlockKey | None,
    normalization: Mapping[str, Any] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train `model` in place per `config`; returns the best epoch.

    On return the model holds the best epoch's weights. With `checkpoint_dir`, each epoch ends
    with a checkpoint there; `resume=True` continues from it (same settings, else TrainError).
    `on_epoch(record)` is called after each epoch's checkpoint.
    """
    protection = dict(protection)
    mode = protection.get("mode")
    check_fit_key(model, protection, key)
    config.check()
    if len(train_set) == 0:
        raise TrainError("the training set is empty")
    epochs, batch_size, seed, workers = config.epochs, config.batch_size, config.seed, config.workers
    device = resolve_device(config.device)
    amp = config.amp
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
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, steps_per_epoch, config.schedule, config.poly_power))
    scaler = _grad_scaler(use_amp and amp_dtype == torch.float16)
    fingerprint = {"mode": mode, "epochs": epochs, "batch_size": batch_size, "lr": float(config.lr),
                   "schedule": config.schedule, "train_size": len(train_set), "seed": seed}

    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, best_loss, start_epoch = 0, math.inf, 0
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        saved = load_checkpoint(folder) if resume else None
        if saved is not None:
            if saved["fingerprint"] != fingerprint:
                settings = {k: v for k, v in saved["fingerprint"].items() if k != "seed"}  # the seed may be secret
                raise TrainError(f"the checkpoint in {folder} was made with other settings "
                                 f"({settings}, and its seed); delete it or resume with those")
            restore_checkpoint(saved, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                               device=device)
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
            loss = _loss(outputs, masks, config.aux_weight)
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
            save_checkpoint(folder, fingerprint=fingerprint, epoch=epoch + 1, model=_state_copy(model),
                            optimizer=optimizer, scheduler=scheduler, scaler=scaler, device=device,
                            history=history, best_state=best_state, best_epoch=best_epoch, best_loss=best_loss)
        if on_epoch is not None:
            on_epoch(dict(record))

    model.load_state_dict(best_state)
    model.to(memory_format=torch.contiguous_format).eval()
    return FitResult(best_state=best_state, best_epoch=best_epoch, history=history)


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


def _loss(outputs: Mapping[str, torch.Tensor], masks: torch.Tensor, aux_weight: float) -> torch.Tensor:
    loss = F.cross_entropy(outputs["out"].float(), masks, ignore_index=IGNORE_INDEX)
    if "aux" in outputs and outputs["aux"] is not None and aux_weight:
        loss = loss + aux_weight * F.cross_entropy(outputs["aux"].float(), masks, ignore_index=IGNORE_INDEX)
    return loss


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


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
