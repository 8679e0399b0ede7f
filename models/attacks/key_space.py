"""Brute force (paper 000 §III-E1): the size of each mode's key space and the time to search it.

Key spaces, log2 (bits), computed with lgamma so that c! for c = 2048 never overflows:
- cp: c! permutations of the tap's c channels (000_03ca646f856607f9.txt Table I); a key on several
  taps draws one permutation per tap independently, so its space is the product c_1! c_2! ...
- shf: (3 M^2)! permutations of a block vector (paper 000 Table I, with c = 3).
- np: 3 M^2 bits, any subset of the block vector inverted (paper 001 §2.4). seglock's keys pick
  the subset by the reference rule key > L/2, which always inverts the same number of positions,
  so the keys it actually draws number C(3 M^2, k): `seglock_log2`.
- ffx: paper 001 §2.4 encrypts half of the block vector chosen by the key with a fixed password,
  so its key is the choice of positions, C(3 M^2, k). seglock also draws a 128-bit password per
  key: `seglock_log2` adds it.
- per-image (003_b5ba2da3aed36e6d.txt §II-B): a fresh key per image, 3! channel orders per B x B
  block and (S^2)! pixel orders per S x S sub-block and colour channel. No key is tied to the
  model, so the model itself has no key to search: `model_log2` is 0 (no access control).
Brute force expects to try half the space; at the measured seconds per try (one forward pass and
the metric on one image, the least an attacker must do to recognise the right key).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from seglock.client.modes import Mode
from seglock.models.inputs import model_input
from seglock.models.metrics import confusion_matrix, segmentation_metrics

__all__ = [
    "BLOCK_SIZES",
    "FFX_PASSWORD_BITS",
    "brute_force",
    "key_space",
    "key_space_attack",
    "key_space_table",
    "log2_binomial",
    "log2_factorial",
    "measure_seconds_per_try",
    "model_key_space",
    "np_selected_count",
]

LN2 = math.log(2.0)
SECONDS_PER_YEAR = 365.25 * 24 * 3600
FFX_PASSWORD_BITS = 128  # BlockKey.generate draws 16 random bytes for the FFX password
BLOCK_SIZES = (1, 2, 4, 8, 16, 32)  # paper 000 Table III; paper 001 Table 1 goes on to 256
CHANNELS = 3


def log2_factorial(n: int) -> float:
    """log2(n!)."""
    return math.lgamma(n + 1) / LN2


def log2_binomial(n: int, k: int) -> float:
    """log2(C(n, k))."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / LN2


def np_selected_count(length: int) -> int:
    """How many of a block vector's `length` positions the reference rule `key > length / 2` selects."""
    return sum(1 for value in range(length) if value > length / 2)


def key_space(mode: str, **params: Any) -> dict[str, Any]:
    """{mode, params, log2, seglock_log2, model_log2, formula} for one protection mode and its parameters."""
    known = Mode.parse(mode)
    if known is None:
        raise ValueError(f"unknown protection mode {mode!r}")
    mode = known.value
    if known is Mode.NONE:
        return _entry(mode, {}, 0.0, formula="no key")
    if known is Mode.CP:
        raw = params.get("channels")
        if isinstance(raw, (list, tuple)):
            counts = [_positive({"channels": c}, "channels") for c in raw]
            if not counts:
                raise ValueError("key space: a cp key needs at least one tap")
            return _entry(mode, {"channels": counts, **_optional(params, "tap")},
                          sum(log2_factorial(c) for c in counts), formula=" * ".join(f"{c}!" for c in counts))
        c = _positive(params, "channels")
        entry = _entry(mode, {"channels": c, **_optional(params, "tap")}, log2_factorial(c), formula=f"{c}!")
        return entry
    if known.is_block:
        m = _positive(params, "block_size")
        length = CHANNELS * m * m
        if known is Mode.SHF:
            return _entry(mode, {"block_size": m}, log2_factorial(length), formula=f"(3*{m}^2)! = {length}!")
        k = np_selected_count(length)
        selection = log2_binomial(length, k)
        if known is Mode.NP:
            return _entry(mode, {"block_size": m}, float(length), seglock=selection,
                          formula=f"2^(3*{m}^2) = 2^{length}; seglock keys: C({length}, {k})")
        return _entry(mode, {"block_size": m}, selection, seglock=selection + FFX_PASSWORD_BITS,
                      formula=f"C({length}, {k}) with a fixed password; "
                              f"seglock keys add a {FFX_PASSWORD_BITS}-bit password")
    if known is Mode.PER_IMAGE:
        b, s = _positive(params, "block_size"), _positive(params, "sub_block")
        height, width = _image_size(params)
        blocks = (height // b) * (width // b)
        sub_blocks = (height // s) * (width // s)
        image_bits = blocks * log2_factorial(CHANNELS) + sub_blocks * CHANNELS * log2_factorial(s * s)
        entry = _entry(mode, {"block_size": b, "sub_block": s, "image_size": [height, width]}, image_bits,
                       model=0.0, formula=f"(3!)^{blocks} * (({s}^2)!)^{3 * sub_blocks} per image; none for the model")
        return entry
    raise AssertionError(f"key_space does not cover {known!r}")


def brute_force(log2_keys: float, seconds_per_try: float | None) -> dict[str, Any]:
    """Expected tries (half the space) and the time they take, as log10 values (they overflow floats)."""
    expected_log2 = max(log2_keys - 1.0, 0.0)
    result: dict[str, Any] = {"expected_tries_log2": expected_log2,
                              "expected_tries_log10": expected_log2 * math.log10(2)}
    if seconds_per_try is None or seconds_per_try <= 0:
        return result
    log10_seconds = result["expected_tries_log10"] + math.log10(seconds_per_try)
    log10_years = log10_seconds - math.log10(SECONDS_PER_YEAR)
    result.update({
        "seconds_per_try": seconds_per_try,
        "log10_seconds": log10_seconds,
        "log10_years": log10_years,
        "human": _human(log10_seconds),
    })
    return result


def key_space_table(
    *,
    taps: Mapping[str, int] | None = None,
    block_sizes: tuple[int, ...] = BLOCK_SIZES,
    sub_blocks: tuple[int, ...] = (16, 8, 4),
    per_image_block: int = 16,
    image_size: tuple[int, int] = (256, 256),
    seconds_per_try: float | None = None,
) -> list[dict[str, Any]]:
    """One entry per mode and parameter setting, each with its brute-force estimate."""
    entries = [key_space(Mode.CP, channels=c, tap=name) for name, c in (taps or {}).items()]
    if taps and len(taps) > 1:  # every tap keyed at once: the spaces multiply
        entries.append(key_space(Mode.CP, channels=list(taps.values()), tap=",".join(taps)))
    entries += [key_space(mode, block_size=m) for mode in Mode.block_modes() for m in block_sizes]
    entries += [
        key_space(Mode.PER_IMAGE, block_size=per_image_block, sub_block=s, image_size=list(image_size))
        for s in sub_blocks
        if per_image_block % s == 0 and image_size[0] % per_image_block == 0 and image_size[1] % per_image_block == 0
    ]
    for entry in entries:
        entry["brute_force"] = brute_force(entry["seglock_log2"], seconds_per_try) if entry["model_log2"] else None
    return entries


@torch.no_grad()
def measure_seconds_per_try(
    model: nn.Module,
    manifest: Any,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    device: str = "cpu",
    repeats: int = 5,
    clock=time.perf_counter,
) -> float:
    """Median seconds to score one key guess: one image through the model, then its mIoU.

    `image` is one uint8 H x W x 3 tensor already in the model's input domain (encrypting it for a
    guessed block key would only add to the time); `model` is run as given (a KeyedModel for CP).
    """
    model = model.to(device).eval()
    batch = image.unsqueeze(0).to(device)
    target = mask.numpy()
    times = []
    for _ in range(max(repeats, 1) + 1):  # the first run warms up caches and is dropped
        start = clock()
        logits = model(model_input(batch, manifest))
        pred = logits.argmax(1)[0].cpu().numpy()
        conf = confusion_matrix(pred, target, manifest.num_classes)
        if conf.sum():
            segmentation_metrics(conf)
        times.append(clock() - start)
    return float(np.median(times[1:]))


def _entry(mode: str, params: dict[str, Any], log2: float, *, seglock: float | None = None,
           model: float | None = None, formula: str = "") -> dict[str, Any]:
    seglock = log2 if seglock is None else seglock
    return {
        "mode": mode,
        "params": params,
        "log2": log2,
        "seglock_log2": seglock,
        "model_log2": seglock if model is None else model,
        "log10": log2 * math.log10(2),
        "formula": formula,
    }


def _positive(params: Mapping[str, Any], name: str) -> int:
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"key space: {name} must be a positive integer, got {value!r}")
    return int(value)


def _optional(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {name: params[name]} if params.get(name) is not None else {}


def _image_size(params: Mapping[str, Any]) -> tuple[int, int]:
    size = params.get("image_size", (256, 256))
    if isinstance(size, int):
        size = (size, size)
    height, width = (int(v) for v in size)
    return height, width


def _human(log10_seconds: float) -> str:
    """A rough reading of a duration given as log10 seconds."""
    if log10_seconds < math.log10(120):
        return f"{10 ** log10_seconds:.3g} seconds"
    if log10_seconds < math.log10(2 * 3600):
        return f"{10 ** log10_seconds / 60:.3g} minutes"
    if log10_seconds < math.log10(3 * 86400):
        return f"{10 ** log10_seconds / 3600:.3g} hours"
    log10_years = log10_seconds - math.log10(SECONDS_PER_YEAR)
    if log10_years < 0:
        return f"{10 ** log10_seconds / 86400:.3g} days"
    if log10_years < 6:
        return f"{10 ** log10_years:.3g} years"
    return f"10^{log10_years:.1f} years"


def model_key_space(manifest: Any) -> dict[str, Any]:
    """The key space of an artifact's own protection (mode and public parameters from its manifest)."""
    p = manifest.protection
    if manifest.mode == Mode.CP:
        return key_space(Mode.CP, channels=p["channels"], tap=p["tap"])
    if manifest.mode == Mode.PER_IMAGE:
        return key_space(Mode.PER_IMAGE, block_size=p["block_size"], sub_block=p["sub_block"],
                         image_size=list(manifest.input_size))
    if manifest.mode == Mode.NONE:
        return key_space(Mode.NONE)
    return key_space(manifest.mode, block_size=p["block_size"])


def key_space_attack(
    artifact_dir: str | None = None,
    data_dir: str | None = None,
    *,
    seconds_per_try: float | None = None,
    image_size: tuple[int, int] | None = None,
    device: str = "cpu",
    repeats: int = 5,
) -> dict[str, Any]:
    """Key spaces of every mode (and the model's own, given an artifact) with brute-force times.

    With an artifact and no `seconds_per_try`, the rate is measured on one image of `data_dir`'s
    evaluation split (or a random image of the model's input size when no data is given).
    """
    from seglock.models.artifact import load_artifact
    from seglock.models.protect import CPKey, apply_key, protection_channels
    from seglock.models.taps import taps as model_taps

    result: dict[str, Any] = {"kind": "key-space", "model": None, "protection": None}
    tap_channels: dict[str, int] = {}
    own = None
    if artifact_dir is not None:
        model, manifest = load_artifact(artifact_dir)
        tap_channels = {name: tap.channels for name, tap in model_taps(model).items()}
        image_size = image_size or tuple(manifest.input_size)
        own = model_key_space(manifest)
        if seconds_per_try is None:
            image, mask = _one_image(data_dir, manifest)
            runner = model
            if manifest.mode is Mode.CP:  # a guess is tried by running the model with it at the tap
                runner = apply_key(model, manifest.protection["tap"],
                                   CPKey.generate(protection_channels(manifest.protection)))
            seconds_per_try = measure_seconds_per_try(runner, manifest, image, mask, device=device, repeats=repeats)
            result["measured_on"] = {"device": str(device), "image_size": list(image_size), "repeats": repeats}
        result.update({"model": manifest.name, "architecture": manifest.architecture,
                       "protection": dict(manifest.protection)})
    image_size = tuple(image_size or (256, 256))
    result["seconds_per_try"] = seconds_per_try
    if own is not None:
        own["brute_force"] = brute_force(own["seglock_log2"], seconds_per_try) if own["model_log2"] else None
    result["own"] = own
    result["entries"] = key_space_table(taps=tap_channels, image_size=image_size, seconds_per_try=seconds_per_try)
    return result


def _one_image(data_dir: str | None, manifest: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if data_dir is not None:
        from seglock.models.evaluate import evaluation_data

        dataset, _ = evaluation_data(data_dir, manifest)
        return dataset[0]
    height, width = manifest.input_size
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (height, width, CHANNELS), dtype=torch.uint8, generator=generator)
    return image, torch.zeros(height, width, dtype=torch.int64)
