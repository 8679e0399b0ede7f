"""Training a segmentation model under any protection mode, from a data set on disk to an artifact.

The code lives in `seglock.models.training` (config, loop, checkpoint, run); this module keeps
the names callers import:

    from seglock.models.train import FitConfig, TrainConfig, fit, train
    result = train(TrainConfig(data="scenes", protect="cp", tap="layer4"), "out/m", key_out="m.key.json")
    fit(model, train_set, val_set, FitConfig(epochs=5, device="cpu"), protection={"mode": "none"}, key=None)
"""

from seglock.models.device import resolve_device
from seglock.models.training.checkpoint import CHECKPOINT_DIR
from seglock.models.training.config import (
    AUX_WEIGHT,
    CENTRED_NORMALIZATION,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_PER_IMAGE,
    DEFAULT_SPLITS,
    HOLDOUT_EVERY,
    POLY_POWER,
    RECIPE,
    SCHEDULES,
    FitConfig,
    TrainConfig,
    TrainError,
    check_input_geometry,
    default_normalization,
)
from seglock.models.training.loop import FitResult, fit, lr_factor
from seglock.models.training.run import KeySink, TrainResult, train, training_data

__all__ = [
    "AUX_WEIGHT",
    "CENTRED_NORMALIZATION",
    "CHECKPOINT_DIR",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_PER_IMAGE",
    "DEFAULT_SPLITS",
    "HOLDOUT_EVERY",
    "POLY_POWER",
    "RECIPE",
    "SCHEDULES",
    "FitConfig",
    "FitResult",
    "KeySink",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "check_input_geometry",
    "default_normalization",
    "fit",
    "lr_factor",
    "resolve_device",
    "train",
    "training_data",
]
