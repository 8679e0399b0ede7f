"""What a thief holds: the stolen artifact, its share D' of the training data, and how results are scored.

Every attack that the suite runs starts from a `Stolen`: the model as it was copied (weights keyed,
no key), the manifest, D' with and without augmentation (`attacker_subset`), and the owner's
evaluation split to score on. The owner's key is there only when the experimenter gives it, to
report the owner's mIoU and how much of a key an attack recovered; no attack reads it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from seglock.models.artifact import Manifest, load_artifact
from seglock.models.attacks.data import AttackError, attacker_subset, check_fraction
from seglock.models.device import resolve_device
from seglock.models.errors import ModelError
from seglock.models.evaluate import check_key, evaluate_model, evaluation_data
from seglock.models.protect import CPKey, protection_taps, resolve_taps
from seglock.models.taps import Tap

__all__ = ["Stolen", "headline", "load_stolen"]


def headline(scores: dict[str, Any]) -> dict[str, Any]:
    """aAcc, mIoU, mAcc of a metrics dict (the per-class lists left out of attack reports)."""
    return {name: scores[name] for name in ("aAcc", "mIoU", "mAcc") if name in scores}


@dataclass
class Stolen:
    artifact: str
    data: str
    model: nn.Module = field(repr=False)
    manifest: Manifest
    eval_set: Dataset = field(repr=False)
    split: str
    train_part: Dataset = field(repr=False)  # D' with the owner's crop-and-flip augmentation
    plain_part: Dataset = field(repr=False)  # D' as it is
    pool: int
    fraction: float
    key: Any = field(default=None, repr=False)  # the owner's key, for reporting only
    device: Any = "cpu"
    seed: int = 0

    @property
    def keyed_taps(self) -> list[Tap]:
        """The taps the stolen CP model is keyed at, in network order (empty for other modes)."""
        if self.manifest.mode != "cp":
            return []
        return resolve_taps(self.model, list(protection_taps(self.manifest.protection)))

    @property
    def plain_manifest(self) -> Manifest:
        """The manifest of a plain model of this family (what a thief's retrained model is)."""
        return dataclasses.replace(self.manifest, protection={"mode": "none"}, key=None)

    def copy_model(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def score_plain(self, model: nn.Module) -> dict[str, Any]:
        """A thief's model used without any key, fed plain images."""
        return headline(evaluate_model(model, self.plain_manifest, self.eval_set, condition="plain",
                                       device=self.device, seed=self.seed))

    def score_no_key(self) -> dict[str, Any]:
        """The stolen model used as it is."""
        return headline(evaluate_model(self.model, self.manifest, self.eval_set, condition="plain",
                                       device=self.device, seed=self.seed))

    def score_key(self, key: CPKey, model: nn.Module | None = None) -> dict[str, Any]:
        """The stolen model (or `model`, keyed the same way) run with a key (the owner's or a recovered one)."""
        return headline(evaluate_model(self.model if model is None else model, self.manifest, self.eval_set,
                                       condition="correct", key=key, device=self.device, seed=self.seed))

    def score_owner(self) -> dict[str, Any] | None:
        """The model as its owner runs it: with its key, or, for keyless modes, as served (per-image: fresh keys)."""
        if self.key is None:
            if self.manifest.mode in ("cp", "shf", "np", "ffx"):
                return None
            return headline(evaluate_model(self.model, self.manifest, self.eval_set, condition="correct",
                                           device=self.device, seed=self.seed))
        return self.score_key(self.key)

    def describe(self) -> dict[str, Any]:
        return {"model": self.manifest.name, "artifact": self.artifact, "architecture": self.manifest.architecture,
                "protection": dict(self.manifest.protection), "data": self.data, "split": self.split,
                "fraction": self.fraction, "attacker_images": len(self.plain_part), "training_images": self.pool}


def load_stolen(artifact_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str], *, fraction: float,
                key: Any = None, device: str = "cpu", seed: int = 0, cp_only: bool = False) -> Stolen:
    fraction = check_fraction(fraction)
    model, manifest = load_artifact(artifact_dir)
    if cp_only and manifest.mode != "cp":
        raise AttackError(f"this attack recovers or works around channel permutations: {manifest.name} is "
                          f"{manifest.mode}, not cp")
    if key is not None:
        check_key(manifest, key)
        if manifest.mode == "cp":
            try:
                key = key.bind(protection_taps(manifest.protection))
            except ModelError as exc:
                raise AttackError(str(exc)) from None
    eval_set, split = evaluation_data(data_dir, manifest)
    train_part, plain_part, pool = attacker_subset(data_dir, tuple(manifest.input_size), fraction, seed=seed)
    return Stolen(artifact=str(artifact_dir), data=str(data_dir), model=model, manifest=manifest, eval_set=eval_set,
                  split=split, train_part=train_part, plain_part=plain_part, pool=pool, fraction=fraction, key=key,
                  device=resolve_device(device), seed=seed)
