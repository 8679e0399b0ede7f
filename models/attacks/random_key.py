"""Random-key attack (paper 000 §III-E2, Fig. 9): the thief runs the stolen model with N guessed keys."""

from __future__ import annotations

import os
from typing import Any

from seglock.models.evaluate import evaluate_conditions

__all__ = ["random_key_attack"]


def random_key_attack(
    artifact_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    n: int = 100,
    key: Any = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    split: str | None = None,
) -> dict[str, Any]:
    """mIoU (aAcc, mAcc) with no key and with `n` random wrong keys; with the owner's `key`, also the
    correct condition to compare against (the thief never has it). Box-plot statistics per metric."""
    conditions = (["correct"] if key is not None else []) + ["plain", f"random:{n}"]
    result = evaluate_conditions(artifact_dir, data_dir, key=key, conditions=conditions, device=device, seed=seed,
                                 progress=progress, split=split)
    return {"kind": "random-key", "n": n, **result}
