"""Downstream retraining: keep the stolen network up to its first keyed tap, retrain everything after it.

CP leaves every layer before the first keyed tap untouched (only the tap's consumers are
re-indexed), so a thief holds a working feature extractor up to there. This attack freezes it
(its weights and its BatchNorm statistics, exactly as stolen) and trains the rest of the network
on D', either from a fresh initialisation (`init="fresh"`: the thief's own head on the stolen
features) or from the stolen, keyed weights (`init="stolen"`). The deeper the first keyed tap, the
more of the network the thief keeps, which is why the first keyed tap decides how much CP protects.

Which modules come before the tap is measured, not assumed: one forward pass records the order in
which the model's parameterised modules run, and those that ran before the first tap's producer
finished are the frozen front.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from seglock.models.architectures import build_model
from seglock.models.attacks.data import AttackError
from seglock.models.attacks.recipes import Recipe, parse_recipes, thief_fit
from seglock.models.attacks.stolen import Stolen
from seglock.models.inputs import model_input
from seglock.models.taps import Tap

__all__ = ["INITS", "downstream_attack", "front_modules"]

INITS = ("fresh", "stolen")


def front_modules(model: nn.Module, tap: Tap, manifest: Any) -> list[str]:
    """Names of the modules with parameters or buffers that run before `tap`'s producer has finished."""
    order: list[str] = []
    done = {"flag": False}
    hooks = []
    leaves = [(name, m) for name, m in model.named_modules()
              if not list(m.children()) and (list(m.parameters(recurse=False)) or list(m.buffers(recurse=False)))]
    for name, module in leaves:
        hooks.append(module.register_forward_pre_hook(
            lambda m, i, name=name: None if done["flag"] or name in order else order.append(name)))
    hooks.append(model.get_submodule(tap.producer).register_forward_hook(
        lambda m, i, o: done.__setitem__("flag", True)))
    height, width = manifest.input_size
    try:
        with torch.no_grad():
            model.eval()(model_input(torch.zeros(1, height, width, 3, dtype=torch.uint8), manifest))
    finally:
        for hook in hooks:
            hook.remove()
    return order


def downstream_attack(
    stolen: Stolen,
    *,
    recipes: list[Recipe] | None = None,
    init: str = "fresh",
    progress: bool = True,
) -> dict[str, Any]:
    """Retrain everything after the first keyed tap on D' (per recipe); the best result and every recipe's."""
    started = time.perf_counter()
    if init not in INITS:
        raise AttackError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    keyed = stolen.keyed_taps
    if not keyed:
        raise AttackError(f"downstream retraining needs a cp model: {stolen.manifest.name} is {stolen.manifest.mode}")
    first = keyed[0]
    front = front_modules(stolen.model, first, stolen.manifest)
    front_prefixes = tuple(f"{name}." for name in front)
    front_set = set(front)

    def keep_front_eval(m: nn.Module) -> None:
        for name, module in m.named_modules():
            if name in front_set:
                module.eval()

    runs = []
    for recipe in recipes or parse_recipes(None):
        model = stolen.copy_model()
        if init == "fresh":
            torch.manual_seed(stolen.seed + 1)
            fresh = build_model(stolen.manifest.architecture, stolen.manifest.num_classes,
                                **stolen.manifest.architecture_kwargs)
            state = fresh.state_dict()
            stolen_state = stolen.model.state_dict()
            state.update({k: v for k, v in stolen_state.items() if k.startswith(front_prefixes)})
            model.load_state_dict(state)
        trainable = []
        for name, param in model.named_parameters():
            frozen = name.startswith(front_prefixes)
            param.requires_grad_(not frozen)
            if not frozen:
                trainable.append(param)
        t0 = time.perf_counter()
        history = thief_fit(model, stolen.train_part, recipe, normalization=stolen.manifest.normalization,
                            parameters=trainable, frozen=keep_front_eval, device=stolen.device, seed=stolen.seed,
                            progress=progress, desc=f"downstream {recipe.name}")
        scores = stolen.score_plain(model)
        runs.append({"recipe": recipe.to_dict(), "mIoU": scores["mIoU"], "scores": scores,
                     "final_loss": history[-1]["train_loss"], "seconds": round(time.perf_counter() - t0, 3)})
    best = max(runs, key=lambda r: r["mIoU"])
    return {
        "kind": "downstream",
        **stolen.describe(),
        "first_tap": first.name,
        "init": init,
        "frozen_modules": front,
        "frozen_parameters": sum(p.numel() for n, p in stolen.model.named_parameters()
                                 if n.startswith(front_prefixes)),
        "parameters": sum(p.numel() for p in stolen.model.parameters()),
        "mIoU": best["mIoU"],
        "best_recipe": best["recipe"]["name"],
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 3),
    }
