"""Access-control evaluation: a model's accuracy with its key, without it, and with wrong keys.

Conditions (paper 000 section IV-B and Fig. 9; paper 001 Table 1):
    correct    the model as its owner runs it: cp with its key (folded into the weights), shf/np/ffx
               on images encrypted with its key, per-image on images encrypted with fresh keys,
               none on plain images
    plain      what a thief runs: cp weights as they are (the identity permutation at the tap),
               shf/np/ffx/per-image on unencrypted images, none on plain images
    random:N   N wrong keys drawn like real ones: random permutations of the tap's channels (cp),
               `BlockKey.generate` with the model's method and block size (shf/np/ffx); keyless
               modes (none, per-image) have no key to guess
Metrics are `seglock.models.metrics` on the argmax predictions at the model's input size: aAcc, mIoU,
mAcc (percent) and per-class IoU and Acc. Wrong keys and per-image keys come from a generator
seeded by `seed`, so a report can be made again; a wrong key equal to the model's is redrawn.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from seglock.client.modes import Mode
from seglock.client.transforms import BlockKey
from seglock.models.artifact import Manifest, load_artifact
from seglock.models.data import DatasetError, detect_format, open_dataset
from seglock.models.device import resolve_device
from seglock.models.encryption import encrypt_blocks_torch, encrypt_per_image_torch
from seglock.models.errors import ModelError
from seglock.models.inputs import model_input
from seglock.models.metrics import MetricAccumulator
from seglock.models.protect import CPKey, fold_key, protection_channels, protection_taps

__all__ = [
    "CONDITIONS",
    "EvaluateError",
    "evaluate_conditions",
    "evaluate_model",
    "parse_conditions",
    "predictions",
    "wrong_keys",
]

CONDITIONS = ("correct", "plain", "wrong")
DEFAULT_SPLITS = {"folder": "val", "voc": "val", "cityscapes": "val"}
_CACHE_BYTES = 1 << 30  # evaluation sets up to 1 GiB of pixels are read once and kept for every condition
_WRONG_KEY_STREAM = 17
_PER_IMAGE_STREAM = 29


class EvaluateError(ModelError):
    """An evaluation that cannot be run as asked (missing or unfitting key, bad condition, data)."""


def _seeded_bytes(rng: np.random.Generator) -> Callable[[int], bytes]:
    return lambda n: rng.bytes(n)


def check_key(manifest: Manifest, key: Any) -> None:
    """The key fits the manifest's protection (kind, channels, method, block size)."""
    mode = manifest.mode
    if mode is Mode.CP:
        if not isinstance(key, CPKey):
            raise EvaluateError(f"model {manifest.name} is cp-protected: it needs a cp key")
        try:
            bound = key.bind(protection_taps(manifest.protection))
            channels = protection_channels(manifest.protection)
        except ModelError as exc:
            raise EvaluateError(f"the key does not fit {manifest.name}: {exc}") from None
        for tap, count in channels.items():
            if bound[tap].size != count:
                raise EvaluateError(f"the key has {bound[tap].size} channels but tap {tap!r} of {manifest.name} "
                                    f"has {count}")
    elif mode.is_block:
        if not isinstance(key, BlockKey):
            raise EvaluateError(f"model {manifest.name} is {mode}-protected: it needs a block key")
        if key.method != mode or key.block_size != manifest.protection["block_size"]:
            raise EvaluateError(f"the key is {key.method} with block size {key.block_size}, but {manifest.name} "
                                f"needs {mode} with block size {manifest.protection['block_size']}")
    elif key is not None:
        raise EvaluateError(f"model {manifest.name} ({mode}) has no key")


def serving_model(model: nn.Module, manifest: Manifest, condition: str, key: Any = None) -> nn.Module:
    """The module a condition runs: cp with a key folds it in; everything else runs as given."""
    if manifest.mode is Mode.CP and condition in ("correct", "wrong"):
        return fold_key(model, manifest.protection["tap"], key)
    return model


def encrypt_batch(images: torch.Tensor, manifest: Manifest, condition: str, key: Any = None,
                  randbytes: Callable[[int], bytes] = os.urandom) -> torch.Tensor:
    """The NHWC batch a condition feeds: encrypted with `key` (block), fresh keys (per-image), or plain."""
    mode = manifest.mode
    if condition == "plain" or not mode.encrypts_input:
        return images
    if mode.is_block:
        return encrypt_blocks_torch(images, key)
    return encrypt_per_image_torch(images, manifest.protection["block_size"], manifest.protection["sub_block"],
                                   randbytes=randbytes)


def predictions(
    model: nn.Module,
    manifest: Manifest,
    dataset: Dataset,
    *,
    condition: str,
    key: Any = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(predicted classes, target mask) per batch, both N x H x W int64 on the CPU."""
    if condition not in CONDITIONS:
        raise EvaluateError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
    if condition == "correct" and manifest.mode.has_model_key and key is None:
        raise EvaluateError(f"model {manifest.name} is {manifest.mode}-protected: the correct condition needs its key")
    if condition == "wrong" and not manifest.mode.has_model_key:
        raise EvaluateError(f"model {manifest.name} ({manifest.mode}) has no key, so no wrong key either")
    if condition == "wrong" and key is None:
        raise EvaluateError("the wrong-key condition needs the wrong key to use")
    if condition != "plain" and manifest.mode.has_model_key:
        check_key(manifest, key)
    device = resolve_device(device)
    net = serving_model(model, manifest, condition, key).to(device).eval()
    use_amp = device.type == "cuda"
    randbytes = _seeded_bytes(np.random.default_rng([seed, _PER_IMAGE_STREAM]))
    loader = dataset if isinstance(dataset, _Batches) else DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with torch.inference_mode():
        for images, masks in loader:
            x = encrypt_batch(images.to(device), manifest, condition, key, randbytes)
            x = model_input(x, manifest)
            if use_amp:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                logits = net(x)
            yield logits.argmax(1).cpu(), masks


def evaluate_model(
    model: nn.Module,
    manifest: Manifest,
    dataset: Dataset,
    *,
    condition: str,
    key: Any = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """aAcc, mIoU, mAcc, per-class IoU/Acc (`seglock.models.metrics`) of `model` under one condition.

    condition: "correct" (with the model's `key`), "plain" (no key), or "wrong" (with `key`, a
    key that is not the model's; the same computation as "correct", named for what it is).
    """
    accumulator = MetricAccumulator(manifest.num_classes)
    images = 0
    for pred, target in predictions(model, manifest, dataset, condition=condition, key=key, device=device,
                                    batch_size=batch_size, seed=seed):
        accumulator.update(pred, target)
        images += int(target.shape[0])
    try:
        scores = accumulator.compute()
    except ValueError as exc:
        raise EvaluateError(f"nothing to score: {exc}") from None
    scores["per_class"] = {
        name: {"IoU": iou, "Acc": acc}
        for name, iou, acc in zip(manifest.class_names, scores["IoU"], scores["Acc"], strict=False)
    }
    scores["images"] = images
    return scores


def wrong_keys(manifest: Manifest, n: int, *, key: Any = None, seed: int = 0) -> list[CPKey | BlockKey]:
    """`n` keys of the model's kind, none equal to `key`, from a generator seeded by `seed`."""
    mode = manifest.mode
    if not mode.has_model_key:
        raise EvaluateError(f"model {manifest.name} ({mode}) has no key to guess")
    rng = np.random.default_rng([seed, _WRONG_KEY_STREAM])
    keys: list[CPKey | BlockKey] = []
    if mode is Mode.CP:
        channels = protection_channels(manifest.protection)
        key = None if key is None else key.bind(list(channels))
    while len(keys) < n:
        if mode is Mode.CP:
            candidate = CPKey({tap: rng.permutation(count) for tap, count in channels.items()})
        else:
            candidate = BlockKey.generate(mode, manifest.protection["block_size"], randbytes=_seeded_bytes(rng))
        if key is None or candidate != key:
            keys.append(candidate)
    return keys


def parse_conditions(text: str | Sequence[str]) -> list[tuple[str, int]]:
    """"correct,plain,random:100" -> [("correct", 0), ("plain", 0), ("random", 100)]."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    parsed: list[tuple[str, int]] = []
    for item in items:
        name, _, count = item.partition(":")
        if name in ("correct", "plain") and not count:
            parsed.append((name, 0))
        elif name == "random" and count.isdigit() and int(count) >= 1:
            parsed.append(("random", int(count)))
        else:
            raise EvaluateError(f"unknown condition {item!r}: use correct, plain, random:N (N >= 1)")
    if not parsed:
        raise EvaluateError("no condition given: use correct, plain, random:N")
    return parsed


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """mean, min, quartiles (numpy's linear interpolation), max and the values (paper 000 Fig. 9)."""
    arr = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(arr, [25, 50, 75])
    return {"mean": float(arr.mean()), "min": float(arr.min()), "q1": float(q1), "median": float(median),
            "q3": float(q3), "max": float(arr.max()), "values": [float(v) for v in arr]}


class _Batches:
    """A data set read once into memory as batches, for running several conditions over it."""

    def __init__(self, dataset: Dataset, batch_size: int) -> None:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        self.batches = [(images, masks) for images, masks in loader]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def evaluation_data(data_dir: str | os.PathLike[str], manifest: Manifest,
                    split: str | None = None) -> tuple[Dataset, str]:
    """(evaluation split of `data_dir` at the model's input size, split name), checked against its classes."""
    try:
        kind = detect_format(data_dir)
        if split is None:
            split = DEFAULT_SPLITS[kind]
            if kind == "folder" and not (Path(data_dir) / "splits.json").is_file():
                split = "all"
        dataset = open_dataset(data_dir, split, kind=kind, size=tuple(manifest.input_size))
    except DatasetError as exc:
        raise EvaluateError(str(exc)) from None
    if dataset.num_classes != manifest.num_classes:
        raise EvaluateError(f"the data set has {dataset.num_classes} classes but model {manifest.name} "
                            f"predicts {manifest.num_classes}")
    return dataset, split


def evaluate_conditions(
    artifact_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    key: Any,
    conditions: str | Sequence[str],
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 8,
    split: str | None = None,
    unseal: Callable[[bytes], bytes] | None = None,
) -> dict[str, Any]:
    """Every condition of `conditions` on the artifact and data set; a JSON-ready dict.

    `unseal` decrypts a home revision's weights in memory (`seglock.app.home.Home.unsealer`)."""
    started = time.perf_counter()
    parsed = parse_conditions(conditions)
    model, manifest = load_artifact(artifact_dir, unseal=unseal)
    if key is not None:
        check_key(manifest, key)
    keyed = manifest.mode.has_model_key
    if keyed and key is None and any(name == "correct" for name, _ in parsed):
        raise EvaluateError(f"model {manifest.name} is {manifest.mode}-protected: the correct condition needs its key "
                            "(a key file, or the home whose keystore holds it)")
    dataset, split = evaluation_data(data_dir, manifest, split)
    images = len(dataset)
    height, width = manifest.input_size
    if len(dataset) * height * width * 4 <= _CACHE_BYTES:
        dataset = _Batches(dataset, batch_size)
    runs = sum(n if name == "random" else 1 for name, n in parsed)
    bar = _bar(runs, progress)

    def run(condition: str, run_key: Any) -> dict[str, Any]:
        scores = evaluate_model(model, manifest, dataset, condition=condition, key=run_key, device=device,
                                batch_size=batch_size, seed=seed)
        if bar is not None:
            bar.update(1)
        return scores

    results: dict[str, Any] = {}
    try:
        for name, count in parsed:
            label = name if name != "random" else f"random:{count}"
            if name != "random":
                results[label] = run(name, key if name == "correct" else None)
            elif not keyed:
                results[label] = {"applicable": False, "reason": f"{manifest.mode} models have no key to guess"}
                if bar is not None:
                    bar.update(count)
            else:
                scores = [run("wrong", k) for k in wrong_keys(manifest, count, key=key, seed=seed)]
                summaries = {metric: summarize([s[metric] for s in scores]) for metric in ("aAcc", "mIoU", "mAcc")}
                results[label] = {"applicable": True, "n": count, **summaries}
    finally:
        if bar is not None:
            bar.close()
    return {
        "model": manifest.name,
        "artifact": str(artifact_dir),
        "architecture": manifest.architecture,
        "protection": dict(manifest.protection),
        "data": str(data_dir),
        "split": split,
        "images": images,
        "class_names": list(manifest.class_names),
        "seed": seed,
        "conditions": results,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="evaluate", unit="run", leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=None)

