"""Training checkpoints: OUT/.checkpoint/last.pt after every epoch (0600, crash-safe), and the
run's key beside it as key.json (0600) so a resumed run keeps its key.

The file is `torch.save` of a plain dict (read back with `weights_only=True`):
{"format": "seglock-checkpoint", "version": 1, "fingerprint", "epoch", "model", "optimizer",
"scheduler", "scaler", "rng", "cuda_rng", "history", "best_state", "best_epoch", "best_loss"}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from seglock.client import fsio
from seglock.models.training.config import TrainError

__all__ = ["CHECKPOINT_DIR", "CHECKPOINT_FILE", "CHECKPOINT_KEY", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_DIR = ".checkpoint"
CHECKPOINT_FILE = "last.pt"
CHECKPOINT_KEY = "key.json"
CHECKPOINT_FORMAT = "seglock-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(folder: Path, *, fingerprint: dict[str, Any], epoch: int, model: dict[str, torch.Tensor],
                    optimizer: Any, scheduler: Any, scaler: Any, device: torch.device,
                    history: list[dict[str, Any]], best_state: dict[str, torch.Tensor] | None, best_epoch: int,
                    best_loss: float) -> None:
    """Atomic and 0600: a crash leaves the previous checkpoint or the new one, never half of one."""
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "epoch": epoch,
        "model": model, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        "history": history, "best_state": best_state, "best_epoch": best_epoch, "best_loss": best_loss,
    }
    with fsio.atomic_writer(folder / CHECKPOINT_FILE, mode=fsio.SECRET_FILE_MODE) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The checkpoint in `folder`, or None when there is none; TrainError naming a bad file."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which
        raise TrainError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a seglock training checkpoint")
    return payload


def restore_checkpoint(saved: dict[str, Any], *, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                       scaler: Any, device: torch.device) -> None:
    """Put the model, optimiser, schedule, scaler and random state back as `saved` holds them."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng"])
    if device.type == "cuda" and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
