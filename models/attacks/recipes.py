"""The thief's training recipes: a fine-tuning attack is only as strong as its recipe.

A thief who steals weights is free to choose the optimiser, learning rate and schedule, so every
attack that trains (fine-tuning, downstream retraining) and the honest alternative it is compared
with (training from scratch) is run with several recipes, and the attack suite reports the worst
case for the owner: the best attack result and the best alternative, each over the recipes.

`thief_fit` is a plain training loop on the thief's share D' (no validation set: the thief has no
other labelled data, so the last epoch is kept). The owner's recipe (paper 000: SGD momentum 0.9,
weight decay 1e-4, poly schedule eq. 8) is one of the recipes; Adam with a cosine schedule and SGD
at a lower and a higher rate are the others.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from seglock.models.attacks.data import AttackError
from seglock.models.inputs import scaled_input
from seglock.models.metrics import IGNORE_INDEX
from seglock.models.training.config import RECIPE

__all__ = ["DEFAULT_RECIPES", "RECIPES", "Recipe", "parse_recipes", "thief_fit"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("poly", "cosine", "constant")
POLY_POWER = RECIPE.poly_power  # paper 000 eq. (8)


@dataclass(frozen=True)
class Recipe:
    """How the thief trains: optimiser, initial learning rate, schedule, epochs, batch size."""

    name: str
    optimizer: str = "sgd"
    lr: float = RECIPE.lr
    schedule: str = RECIPE.schedule
    epochs: int = RECIPE.epochs
    batch_size: int = RECIPE.batch_size
    momentum: float = RECIPE.momentum
    weight_decay: float = RECIPE.weight_decay

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise AttackError(f"recipe {self.name}: optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise AttackError(f"recipe {self.name}: schedule must be one of {', '.join(SCHEDULES)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AttackError(f"recipe {self.name}: lr must be a positive number")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AttackError(f"recipe {self.name}: {name} must be a positive integer, got {value!r}")

    def with_budget(self, epochs: int | None = None, batch_size: int | None = None) -> Recipe:
        return replace(self, epochs=epochs or self.epochs, batch_size=batch_size or self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(f"sgd-{RECIPE.lr:g}"),  # the owner's recipe: `seglock train`'s defaults (paper 000)
        Recipe("sgd-0.05", "sgd", 0.05, "poly"),  # the demo zoo's owner recipe
        Recipe("sgd-0.005", "sgd", 0.005, "poly"),  # gentle: stays near the stolen weights
        Recipe("adam-1e-3", "adam", 1e-3, "cosine", weight_decay=0.0),
        Recipe("adam-3e-4", "adam", 3e-4, "cosine", weight_decay=0.0),
    )
}
DEFAULT_RECIPES = (f"sgd-{RECIPE.lr:g}", "sgd-0.005", "adam-1e-3")


def parse_recipes(spec: str | Iterable[str] | None, *, epochs: int | None = None,
                  batch_size: int | None = None) -> list[Recipe]:
    """Named recipes ("sgd-0.02,adam-1e-3" or "all"; default DEFAULT_RECIPES) with the epoch budget applied."""
    if spec is None:
        names = list(DEFAULT_RECIPES)
    elif isinstance(spec, str):
        names = list(RECIPES) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    else:
        names = list(spec)
    if not names:
        raise AttackError("no recipe named")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise AttackError(f"unknown recipe {unknown[0]!r}; recipes: {', '.join(RECIPES)}, or all")
    return [RECIPES[n].with_budget(epochs, batch_size) for n in names]


def _factor(step: int, total: int, schedule: str) -> float:
    if schedule == "poly":
        return (1 - min(step, total) / max(total, 1)) ** POLY_POWER
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
    return 1.0


def thief_fit(
    model: nn.Module,
    train_set: Dataset,
    recipe: Recipe,
    *,
    normalization: Mapping[str, Any],
    parameters: Iterable[nn.Parameter] | None = None,
    frozen: Callable[[nn.Module], None] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    desc: str = "",
) -> list[dict[str, Any]]:
    """Train `model` in place on plain images of D' with `recipe`; the per-epoch losses.

    `parameters`: what the thief trains (default all). `frozen(model)`: called after `model.train()`
    each epoch, to put frozen parts back in eval mode (their BatchNorm statistics stay the stolen ones).
    """
    if len(train_set) == 0:
        raise AttackError("the attacker's data set is empty")
    device = torch.device(device)
    model.to(device)
    params = [p for p in (model.parameters() if parameters is None else parameters) if p.requires_grad]
    if not params:
        raise AttackError("nothing to train")
    if recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    drop_last = len(train_set) > recipe.batch_size  # no 1-image tail batch for BatchNorm
    steps_per_epoch = len(train_set) // recipe.batch_size if drop_last else 1
    total = recipe.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _factor(step, total, recipe.schedule))
    history = []
    bar = _bar(recipe.epochs * steps_per_epoch, progress, desc or recipe.name)
    try:
        for epoch in range(recipe.epochs):
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)
            elif hasattr(getattr(train_set, "dataset", None), "set_epoch"):
                train_set.dataset.set_epoch(epoch)
            order = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            loader = DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, drop_last=drop_last,
                                generator=order)
            model.train()
            if frozen is not None:
                frozen(model)
            total_loss, seen = 0.0, 0
            for images, masks in loader:
                x = scaled_input(images.to(device), "none", normalization)
                masks = masks.to(device)
                outputs = model.forward_train(x)
                loss = F.cross_entropy(outputs["out"], masks, ignore_index=IGNORE_INDEX)
                if outputs.get("aux") is not None:
                    loss = loss + 0.4 * F.cross_entropy(outputs["aux"], masks, ignore_index=IGNORE_INDEX)
                if not torch.isfinite(loss):
                    raise AttackError(f"recipe {recipe.name}: the loss diverged in epoch {epoch + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += loss.item() * images.shape[0]
                seen += images.shape[0]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{total_loss / seen:.3f}")
            history.append({"epoch": epoch + 1, "train_loss": total_loss / max(seen, 1)})
    finally:
        if bar is not None:
            bar.close()
    model.to("cpu").eval()
    return history


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr, dynamic_ncols=True, disable=None)
