"""The training recipe in one place: `FitConfig` (how the loop trains) and `TrainConfig` (a whole
`seglock train` run). Every default a caller shows or uses (`seglock train`'s flags, the attacks'
retraining) is read from these two classes, never restated.

Recipe (paper 000, docs/references.md [000], section IV-A): SGD with momentum 0.9 and weight decay
1e-4, the poly schedule of eq. (8), lr_n = lr (1 - n / N)^0.9 per iteration, pixel-wise
cross-entropy ignoring 255 (+ 0.4 x the auxiliary head's loss where the architecture has one),
random resized crop and horizontal flip, the epoch with the lowest validation loss kept.
Paper 001 (docs/references.md [001], section 3.1) uses cosine annealing with warm restarts every
ten epochs down to lr / 1000: `schedule="cosine"`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from seglock.client.modes import Mode
from seglock.client.transforms.errors import TransformError
from seglock.client.transforms.geometry import check_divisible
from seglock.client.transforms.per_image import check_geometry
from seglock.models.artifact import IMAGENET_NORMALIZATION
from seglock.models.errors import ModelError

__all__ = [
    "AUX_WEIGHT",
    "CENTRED_NORMALIZATION",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_PER_IMAGE",
    "DEFAULT_SPLITS",
    "HOLDOUT_EVERY",
    "POLY_POWER",
    "RECIPE",
    "SCHEDULES",
    "FitConfig",
    "TrainConfig",
    "TrainError",
    "check_input_geometry",
    "default_normalization",
]

SCHEDULES = ("poly", "cosine")
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


class TrainError(ModelError):
    """A training run that cannot start or continue as asked."""


@dataclass(frozen=True)
class FitConfig:
    """How `fit` trains: paper 000's recipe at seglock's scale. `RECIPE` holds the defaults."""

    epochs: int = 30
    batch_size: int = 8
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "poly"
    poly_power: float = POLY_POWER
    aux_weight: float = AUX_WEIGHT
    device: str = "auto"
    seed: int = 0
    amp: bool | None = None  # None: on for CUDA
    workers: int = 0

    def check(self) -> None:
        """Every option in range, with a message naming the flag."""
        for name in ("epochs", "batch_size"):
            _positive_int(name, getattr(self, name))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise TrainError("momentum must be in [0, 1) and weight decay non-negative")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.workers < 0 or self.seed < 0:
            raise TrainError("workers and seed must be non-negative")


RECIPE = FitConfig()


@dataclass
class TrainConfig:
    """The options of `seglock train`; the recipe's defaults come from `FitConfig`."""

    data: str
    arch: str = "tiny"
    protect: str = "none"
    tap: str | None = None
    block_size: int | None = None  # shf/np/ffx: M (default 4); per-image: B (default 16)
    sub_block: int | None = None  # per-image: S (default 4)
    epochs: int = RECIPE.epochs
    batch_size: int = RECIPE.batch_size
    lr: float = RECIPE.lr
    momentum: float = RECIPE.momentum
    weight_decay: float = RECIPE.weight_decay
    schedule: str = RECIPE.schedule
    size: int = 256
    device: str = RECIPE.device
    seed: int | None = None  # None: a secret seed from the OS's CSPRNG, never recorded (see `secret_seed`)
    name: str | None = None  # artifact (and keystore) name; default: the output folder's name
    train_split: str | None = None  # default per format: folder train, voc train-1318, cityscapes train
    val_split: str | None = None  # folder val, voc val-146, cityscapes val
    workers: int = RECIPE.workers
    augment: bool = True
    crop_scale: tuple[float, float] = (0.25, 1.0)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None
    amp: bool | None = RECIPE.amp  # None: on for CUDA
    resume: bool = False

    def fit_config(self) -> FitConfig:
        """The loop's part of this run."""
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                         weight_decay=self.weight_decay, schedule=self.schedule, device=self.device,
                         seed=RECIPE.seed if self.seed is None else self.seed, amp=self.amp,
                         workers=self.workers)

    def protection(self) -> dict[str, Any]:
        """The public protection parameters of the artifact this config makes."""
        mode = Mode.parse(self.protect)
        if mode is None:
            raise TrainError(f"protection must be one of {', '.join(Mode)}, got {self.protect!r}")
        if mode is Mode.CP:  # no tap named: the architecture's measured default (models.taps.DEFAULT_TAPS)
            from seglock.models.taps import default_taps

            return {"mode": mode.value, "tap": self.tap or default_taps(self.arch)}
        if mode.is_block:
            return {"mode": mode.value, "block_size": self.block_size or DEFAULT_BLOCK_SIZE}
        if mode is Mode.PER_IMAGE:
            return {"mode": mode.value, "block_size": self.block_size or DEFAULT_PER_IMAGE[0],
                    "sub_block": self.sub_block or DEFAULT_PER_IMAGE[1]}
        return {"mode": mode.value}

    def check(self) -> None:
        """Every option in range, with a message naming the flag."""
        for name in ("epochs", "batch_size", "size"):
            _positive_int(name, getattr(self, name))
        self.fit_config().check()
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


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")


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
