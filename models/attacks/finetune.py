"""Fine-tuning attack (paper 000 §III-E3, §IV-D, Table IV): retrain the stolen weights without the key.

The thief holds the protected weights and D', a fraction (5 % or 10 % in the paper) of the training
data. It trains the weights as a plain model on plain images of D' (same recipe as the owner,
`seglock.models.training.config.RECIPE`: SGD, momentum 0.9, poly schedule, crop and flip; the
best epoch by loss on D' itself, since the thief has no other labelled data) and then uses the
model without any key. Reported: mIoU without the key before (Table IV's 0 % row) and after,
against the owner's mIoU with the key.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch

from seglock.models.artifact import load_artifact, save_artifact
from seglock.models.attacks.data import attacker_subset, check_fraction
from seglock.models.device import resolve_device
from seglock.models.evaluate import check_key, evaluate_model, evaluation_data
from seglock.models.training.config import RECIPE, FitConfig
from seglock.models.training.loop import fit

__all__ = ["finetune_attack", "headline"]

def headline(scores: dict[str, Any]) -> dict[str, Any]:
    """aAcc, mIoU, mAcc of a metrics dict (the per-class lists left out of attack reports)."""
    return {name: scores[name] for name in ("aAcc", "mIoU", "mAcc") if name in scores}


def finetune_attack(
    artifact_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    fraction: float,
    key: Any = None,
    epochs: int = RECIPE.epochs,
    batch_size: int = RECIPE.batch_size,
    lr: float = RECIPE.lr,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    save_to: str | os.PathLike[str] | None = None,
    recipes: str | None = None,
) -> dict[str, Any]:
    """Fine-tune the stolen model on `fraction` of the training data without a key; a JSON-ready report.

    With `recipes` (names from `seglock.models.attacks.recipes`, or "all"), the thief's training loop
    runs each recipe for `epochs` and "after" is the best of them (the worst case for the owner).
    """
    if recipes is not None:
        return _finetune_recipes(artifact_dir, data_dir, fraction=fraction, key=key, recipes=recipes, epochs=epochs,
                                 batch_size=batch_size, device=device, seed=seed, progress=progress)
    started = time.perf_counter()
    fraction = check_fraction(fraction)
    device = resolve_device(device)
    model, manifest = load_artifact(artifact_dir)
    if key is not None:
        check_key(manifest, key)
    eval_set, split = evaluation_data(data_dir, manifest)
    train_part, val_part, pool = attacker_subset(data_dir, tuple(manifest.input_size), fraction, seed=seed)

    before = evaluate_model(model, manifest, eval_set, condition="plain", device=device, seed=seed)
    owner = None
    if key is not None or not manifest.mode.has_model_key:
        owner = evaluate_model(model, manifest, eval_set, condition="correct", key=key, device=device, seed=seed)

    # The thief's model is a plain model fed plain pixels the way a plain model of this family is.
    plain_manifest = dataclasses.replace(manifest, protection={"mode": "none"}, key=None)
    torch.manual_seed(seed)
    recipe = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, device=device, seed=seed)
    result = fit(model, train_part, val_part, recipe, protection={"mode": "none"}, key=None,
                 normalization=manifest.normalization, progress=progress)
    model.to("cpu")
    after = evaluate_model(model, plain_manifest, eval_set, condition="plain", device=device, seed=seed)
    if save_to is not None:
        save_artifact(model, save_to, name=f"{manifest.name}-finetuned"[:64], class_names=list(manifest.class_names),
                      input_size=manifest.input_size, normalization=manifest.normalization,
                      protection={"mode": "none"})
    return {
        "kind": "finetune",
        "model": manifest.name,
        "artifact": str(artifact_dir),
        "architecture": manifest.architecture,
        "protection": dict(manifest.protection),
        "data": str(data_dir),
        "split": split,
        "fraction": fraction,
        "attacker_images": len(train_part),
        "training_images": pool,
        "epochs": epochs,
        "best_epoch": result.best_epoch,
        "before": headline(before),
        "after": headline(after),
        "owner": None if owner is None else headline(owner),
        "history": result.history,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _finetune_recipes(artifact_dir, data_dir, *, fraction, key, recipes, epochs, batch_size, device, seed,
                      progress) -> dict[str, Any]:
    from seglock.models.attacks.recipes import parse_recipes, thief_fit
    from seglock.models.attacks.stolen import load_stolen

    started = time.perf_counter()
    stolen = load_stolen(artifact_dir, data_dir, fraction=fraction, key=key, device=device, seed=seed)
    runs = []
    for recipe in parse_recipes(recipes, epochs=epochs, batch_size=batch_size):
        model = stolen.copy_model()
        history = thief_fit(model, stolen.train_part, recipe, normalization=stolen.manifest.normalization,
                            device=stolen.device, seed=seed, progress=progress, desc=f"finetune {recipe.name}")
        runs.append({"recipe": recipe.to_dict(), "after": stolen.score_plain(model), "history": history})
    best = max(runs, key=lambda r: r["after"]["mIoU"])
    return {
        "kind": "finetune",
        **stolen.describe(),
        "epochs": epochs,
        "before": stolen.score_no_key(),
        "after": best["after"],
        "best_recipe": best["recipe"]["name"],
        "owner": stolen.score_owner(),
        "runs": runs,
        "history": best["history"],
        "seconds": round(time.perf_counter() - started, 3),
    }
