"""Weight matching (beyond the papers): recover a CP key from the stolen weights with an assignment solver.

A CP model keyed with K at a tap has consumer columns W'[:, j] = W[:, K[j]] (models/protect.py):
column j of every layer reading the tap expects producer channel K[j]. Finding K is a matching of
the c consumer columns to the c producer channels, solved as a linear assignment on a cost matrix
built one of three ways:

- "weights": against a reference whose consumer layer has the plain column order: cost[j, i] =
  1 - cos(W'[:, j], R[:, i]) summed over the tap's tensors. The reference is a local weights file
  (the owner's plain weights, or a public pretrained backbone when the tap's consumer lies inside
  it) or a model the attacker trains on its own fraction of the data. Exact when the stolen model
  is a post-hoc protected copy of the reference; a model trained from another start has its own
  channel order, which no column distance can relate to the stolen one.
- "activations": against the attacker's labelled fraction D' itself: each producer channel i has a
  class profile (its mean activation on pixels of each class), and each consumer column j a class
  sensitivity (the mean gradient of each class logit with respect to input channel j, taken at the
  keyless features); cost[j, i] = -corr(profile_i, sensitivity_j) over classes. Exact in spirit
  only where the consumer is linear into the logits (a 1x1 classifier); deeper consumers blur it.
- "statistics": against the BatchNorm statistics the owner's training left after each consumer
  (running mean and variance of its outputs under the key), predicted from the producer's channel
  moments on D' for a candidate key; least squares and an assignment start the key, swaps refine it.

The recovered key is scored against the owner's key where the experimenter has it (fraction of
channels recovered) and by the mIoU the stolen model reaches with it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from seglock.client.modes import Mode
from seglock.models.architectures import build_model, read_state_dict
from seglock.models.artifact import read_manifest
from seglock.models.attacks.assignment import SOLVER, linear_assignment
from seglock.models.attacks.data import AttackError, attacker_subset
from seglock.models.errors import ModelError
from seglock.models.inputs import model_input
from seglock.models.protect import CPKey, fold_key
from seglock.models.taps import Tap
from seglock.models.training.config import RECIPE, FitConfig

__all__ = [
    "METHODS",
    "activation_cost",
    "describe_match",
    "match_key",
    "read_reference",
    "recover_key",
    "reference_tensors",
    "tap_columns",
    "train_reference",
    "weight_cost",
    "weight_matching_attack",
]

METHODS = ("weights", "activations", "statistics")
_PREFIXES = ("", "module.", "model.")  # checkpoint wrappers
_BACKBONE = "backbone."  # a classification network's state dict holds the backbone without this prefix


def tap_columns(state: Mapping[str, torch.Tensor], tap: Tap) -> list[torch.Tensor]:
    """For each tensor CP re-indexes at `tap`: a c x F float64 matrix, row j = everything tied to channel j."""
    columns = []
    for name, dim in tap.tensors:
        if name not in state:
            raise ModelError(f"the state dict has no tensor {name!r} for tap {tap.name!r}")
        tensor = state[name].detach().to("cpu", torch.float64)
        columns.append(tensor.movedim(dim, 0).reshape(tap.channels, -1))
    return columns


def reference_tensors(reference: Mapping[str, torch.Tensor], tap: Tap) -> dict[str, torch.Tensor]:
    """The tap's tensors from a reference state dict: a whole model's, or a pretrained backbone's.

    Only tensors present with the right shape are kept; ModelError when none is (e.g. a backbone
    file for a tap whose consumers live in the segmentation head).
    """
    found: dict[str, torch.Tensor] = {}
    for name, dim in tap.tensors:
        candidates = [prefix + name for prefix in _PREFIXES]
        if name.startswith(_BACKBONE):
            candidates += [prefix + name[len(_BACKBONE):] for prefix in _PREFIXES]
        for candidate in candidates:
            tensor = reference.get(candidate)
            if isinstance(tensor, torch.Tensor) and tensor.ndim > dim and tensor.shape[dim] == tap.channels:
                found[name] = tensor
                break
    if not found:
        wanted = ", ".join(name for name, _ in tap.tensors)
        raise ModelError(
            f"the reference holds none of tap {tap.name!r}'s tensors ({wanted}) with {tap.channels} channels: "
            "weight matching needs a reference containing the tap's consumer layer "
            "(a pretrained backbone covers only taps whose consumers are inside the backbone)"
        )
    return found


def weight_cost(stolen: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], tap: Tap) -> np.ndarray:
    """cost[j, i] = sum over the shared tensors of 1 - cos(stolen row j, reference row i)."""
    ref = reference_tensors(reference, tap)
    shared = [(name, dim) for name, dim in tap.tensors if name in ref]
    sub_tap = Tap(tap.name, tap.channels, tap.producer, tap.consumers, tap.channelwise, tap.paper_number, tuple(shared))
    cost = np.zeros((tap.channels, tap.channels))
    compared = 0
    for own, other in zip(tap_columns(stolen, sub_tap), tap_columns(ref, sub_tap), strict=False):
        if own.shape != other.shape:
            continue  # e.g. a classifier for another number of classes: nothing to compare
        cost += 1.0 - (_unit_rows(own) @ _unit_rows(other).T).numpy()
        compared += 1
    if not compared:
        raise ModelError(f"the reference's tensors for tap {tap.name!r} have other shapes than the model's")
    return cost


def activation_cost(
    model: nn.Module,
    tap: Tap,
    manifest: Any,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str = "cpu",
) -> np.ndarray:
    """cost[j, i] = -corr over classes of (producer channel i's class profile, consumer column j's sensitivity).

    `batches` are (uint8 N x H x W x 3 images already in the model's input domain, int64 N x H x W masks).
    """
    num_classes = manifest.num_classes
    sums = torch.zeros(tap.channels, num_classes, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    sensitivity = torch.zeros(tap.channels, num_classes, dtype=torch.float64)
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        features = output.detach().requires_grad_(True)
        captured["features"] = features
        return features

    model = model.to(device).eval()
    handle = model.get_submodule(tap.producer).register_forward_hook(hook)
    try:
        for images, masks in batches:
            logits = model(model_input(images.to(device), manifest))
            features = captured["features"]
            # Class profile: mean activation of each channel over the pixels of each class.
            resized = F.interpolate(masks[:, None].float(), size=features.shape[-2:], mode="nearest")
            labels = resized[:, 0].long().to(device)
            valid = labels < num_classes
            onehot = F.one_hot(labels.clamp(max=num_classes - 1), num_classes).to(torch.float64) * valid[..., None]
            flat = features.detach().to(torch.float64).permute(1, 0, 2, 3).reshape(tap.channels, -1)
            sums += (flat @ onehot.reshape(-1, num_classes)).cpu()
            counts += onehot.reshape(-1, num_classes).sum(0).cpu()
            # Class sensitivity: d(mean logit of class k) / d(input channel j), averaged over pixels.
            for k in range(num_classes):
                grad, = torch.autograd.grad(logits[:, k].mean(), features, retain_graph=k + 1 < num_classes)
                sensitivity[:, k] += grad.to(torch.float64).sum(dim=(0, 2, 3)).cpu()
    finally:
        handle.remove()
    seen = counts > 0
    if seen.sum() < 2:
        raise ModelError("the attacker's data shows fewer than 2 classes: no class profiles to match")
    profiles = _standardise(sums[:, seen] / counts[seen])
    sensitivities = _standardise(sensitivity[:, seen])
    return -(sensitivities @ profiles.T).numpy() / int(seen.sum())


def statistics_key(
    model: nn.Module,
    tap: Tap,
    manifest: Any,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str = "cpu",
    max_swaps: int | None = None,
) -> tuple[CPKey, dict[str, Any]]:
    """The key under which the consumers' outputs match the BatchNorm statistics stored after them.

    A consumer followed by a BatchNorm recorded, while its owner trained it with the key, the mean and
    variance of each of its output channels. With S the consumer's weights summed over the kernel and
    mu, C the producer channels' means and covariance measured on the attacker's images (the producer
    does not depend on the key), key K predicts mean S mu[K] + bias and variance diag(S C[K, K] S^T)
    (a 1x1 approximation of the kernel). Least squares on the means gives each column's expected input
    mean; assigning those to mu starts K, and swaps of two columns that lower the misfit of both
    moments (means in BatchNorm standard deviations, log-variances up to one common scale) refine it.
    """
    rows, means_target, vars_target = _batchnorm_equations(model, tap, batches[0][0], manifest, device)
    if not rows:
        raise ModelError(f"no BatchNorm follows the consumers of tap {tap.name!r}: no statistics to match")
    mu, cov = _producer_moments(model, tap, manifest, batches, device)
    S = np.concatenate(rows)  # (equations, c)
    target_mean = np.concatenate(means_target)
    target_var = np.concatenate(vars_target)
    scale = S.std() or 1.0
    expected, *_ = np.linalg.lstsq(S / scale, target_mean / scale, rcond=None)
    spread = mu.std() or 1.0
    start = linear_assignment(((expected[:, None] - mu[None, :]) / spread) ** 2)
    perm, before, after, swaps = _refine_by_swaps(S, target_mean, target_var, mu, cov, start,
                                                  max_swaps or 20 * tap.channels)
    return CPKey(perm), {"equations": int(S.shape[0]), "misfit_start": before, "misfit_end": after, "swaps": swaps}


def _batchnorm_equations(model: nn.Module, tap: Tap, images: torch.Tensor, manifest: Any, device: str):
    """(S rows, running_mean - bias, running_var) for every consumer whose output goes straight into a BatchNorm."""
    outputs: dict[str, int] = {}
    followers: dict[str, str] = {}
    hooks = []
    consumer_names = set(tap.consumers)
    for name, module in model.named_modules():
        if name in consumer_names:
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: outputs.__setitem__(name, id(o))))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            def seen(m, inputs, o, name=name):
                for consumer, ident in outputs.items():
                    if id(inputs[0]) == ident:
                        followers.setdefault(consumer, name)
            hooks.append(module.register_forward_hook(seen))
    model = model.to(device).eval()
    try:
        with torch.no_grad():
            model(model_input(images[:1].to(device), manifest))
    finally:
        for hook in hooks:
            hook.remove()
    rows, means, variances = [], [], []
    for consumer in tap.consumers:
        norm = followers.get(consumer)
        conv = model.get_submodule(consumer)
        if norm is None or not isinstance(conv, nn.Conv2d):
            continue
        bn = model.get_submodule(norm)
        if bn.running_mean is None or bn.running_var is None:
            continue
        rows.append(conv.weight.detach().to("cpu", torch.float64).sum(dim=(2, 3)).numpy())
        bias = conv.bias.detach().to("cpu", torch.float64).numpy() if conv.bias is not None else 0.0
        means.append(bn.running_mean.detach().to("cpu", torch.float64).numpy() - bias)
        variances.append(bn.running_var.detach().to("cpu", torch.float64).numpy())
    return rows, means, variances


@torch.no_grad()
def _producer_moments(model: nn.Module, tap: Tap, manifest: Any, batches, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the producer's channels over every pixel of the attacker's images."""
    total = torch.zeros(tap.channels, dtype=torch.float64)
    outer = torch.zeros(tap.channels, tap.channels, dtype=torch.float64)
    count = 0
    captured: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(tap.producer).register_forward_hook(
        lambda m, i, o: captured.__setitem__("x", o.detach()))
    try:
        for images, _ in batches:
            model(model_input(images.to(device), manifest))
            x = captured["x"].to(torch.float64).transpose(0, 1).reshape(tap.channels, -1).cpu()
            total += x.sum(dim=1)
            outer += x @ x.T
            count += x.shape[1]
    finally:
        handle.remove()
    mean = total / max(count, 1)
    cov = outer / max(count, 1) - torch.outer(mean, mean)
    return mean.numpy(), cov.numpy()


def _refine_by_swaps(S: np.ndarray, target_mean: np.ndarray, target_var: np.ndarray, mu: np.ndarray,
                     cov: np.ndarray, perm: np.ndarray, max_swaps: int) -> tuple[np.ndarray, float, float, int]:
    """Greedy best-improvement swaps of two columns' channels under the two-moment misfit."""
    perm = perm.copy()
    sd = np.sqrt(np.maximum(target_var, 1e-12))
    log_target = np.log(np.maximum(target_var, 1e-12))

    def misfit(means: np.ndarray, variances: np.ndarray) -> np.ndarray:
        """Misfit of predicted moments; any leading batch dims (the equations are the last one)."""
        z = (means - target_mean) / sd
        log_ratio = np.log(np.maximum(variances, 1e-12)) - log_target
        log_ratio = log_ratio - log_ratio.mean(axis=-1, keepdims=True)  # the 1x1 approximation's common scale
        return (z**2).mean(axis=-1) + (log_ratio**2).mean(axis=-1)

    def moments(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c_p = cov[np.ix_(p, p)]
        cs = S @ c_p  # (equations, c): (C_P s_o)_j
        return S @ mu[p], np.einsum("oj,oj->o", cs, S), cs

    m, v, cs = moments(perm)
    start = float(misfit(m, v))
    current, swaps = start, 0
    c = len(perm)
    upper = np.triu_indices(c, 1)
    while swaps < max_swaps:
        mp = mu[perm]
        c_p = cov[np.ix_(perm, perm)]
        j, k = upper
        d = S[:, j] - S[:, k]  # (equations, pairs)
        new_m = m[:, None] + d * (mp[k] - mp[j])[None, :]
        # s' = s - d (e_j - e_k): v' = v - 2 d (C s)_(j-k) + d^2 (C_jj + C_kk - 2 C_jk)
        new_v = (v[:, None] - 2 * d * (cs[:, j] - cs[:, k])
                 + d**2 * (c_p[j, j] + c_p[k, k] - 2 * c_p[j, k])[None, :])
        scores = misfit(new_m.T, new_v.T)
        best = int(np.argmin(scores))
        if scores[best] >= current - 1e-12:
            break
        a, b = j[best], k[best]
        perm[a], perm[b] = perm[b], perm[a]
        m, v, cs = moments(perm)
        current = float(misfit(m, v))
        swaps += 1
    return perm, start, current, swaps


def match_key(cost: np.ndarray) -> CPKey:
    """The key the cost matrix points to: K[j] = the channel assigned to column j."""
    return CPKey(linear_assignment(cost))


def describe_match(recovered: CPKey, true_key: CPKey | None) -> dict[str, Any]:
    """Fraction of channels recovered (when the experimenter knows the owner's key)."""
    result: dict[str, Any] = {"channels": recovered.channels, "solver": SOLVER}
    if true_key is not None:
        if true_key.channels != recovered.channels:
            raise ModelError(f"the owner's key has {true_key.channels} channels, the tap {recovered.channels}")
        hits = int(np.sum(recovered.perm == true_key.perm))
        result.update({"channels_recovered": hits, "fraction_recovered": hits / recovered.channels,
                       "exact": hits == recovered.channels})
    return result


def _unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _standardise(rows: torch.Tensor) -> torch.Tensor:
    centred = rows - rows.mean(dim=1, keepdim=True)
    return centred / centred.std(dim=1, unbiased=False, keepdim=True).clamp_min(1e-12)


def train_reference(
    data_dir: str | os.PathLike[str],
    manifest: Any,
    *,
    fraction: float,
    epochs: int = RECIPE.epochs,
    batch_size: int = RECIPE.batch_size,
    lr: float = RECIPE.lr,
    device: str = "cpu",
    seed: int = 1,
    progress: bool = True,
) -> nn.Module:
    """The attacker's own plain model of the stolen architecture, trained on its fraction D' from scratch."""
    from seglock.models.training.loop import fit

    train_part, val_part, _ = attacker_subset(data_dir, tuple(manifest.input_size), fraction, seed=seed)
    torch.manual_seed(seed)
    reference = build_model(manifest.architecture, manifest.num_classes, **manifest.architecture_kwargs)
    recipe = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, device=device, seed=seed)
    fit(reference, train_part, val_part, recipe, protection={"mode": "none"}, key=None,
        normalization=manifest.normalization, progress=progress)
    return reference.to("cpu").eval()


def read_reference(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A reference state dict from a local weights file, or from a model artifact folder."""
    path = Path(path)
    if path.is_dir():
        path = path / read_manifest(path).weights.file
    return read_state_dict(path)


def recover_key(
    model: nn.Module,
    keyed: list[Tap],
    manifest: Any,
    method: str,
    *,
    reference_state: Mapping[str, torch.Tensor] | None = None,
    batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    device: str = "cpu",
    passes: int | None = None,
) -> tuple[CPKey, dict[str, Any]]:
    """A key for every keyed tap by one method; (key, {tap: details}).

    Taps are matched one at a time in network order, with the keys recovered so far for the other
    taps folded into the model (so tap t is matched on features the earlier taps' keys put right),
    and, with several taps, a second pass re-matches each tap with all the others' keys in place.
    A tap the method cannot match (no reference tensors, no BatchNorm after it) keeps the identity
    when other taps could be matched; with one tap that is an error.
    """
    passes = passes or (1 if method == "weights" or len(keyed) == 1 else 2)
    recovered = {tap.name: np.arange(tap.channels) for tap in keyed}
    details: dict[str, Any] = {tap.name: {} for tap in keyed}
    errors: dict[str, str] = {}
    for _ in range(passes):
        for tap in keyed:
            others = [t for t in keyed if t.name != tap.name and not np.array_equal(recovered[t.name],
                                                                                   np.arange(t.channels))]
            context = model
            if others and method != "weights":
                context = fold_key(model, [t.name for t in others], CPKey({t.name: recovered[t.name] for t in others}))
            try:
                if method == "weights":
                    found = match_key(weight_cost(model.state_dict(), reference_state, tap))
                elif method == "activations":
                    found = match_key(activation_cost(context, tap, manifest, batches, device=device))
                else:
                    found, info = statistics_key(context, tap, manifest, batches, device=device)
                    details[tap.name] = info
            except ModelError as exc:
                if len(keyed) == 1:
                    raise
                errors[tap.name] = str(exc)
                continue
            recovered[tap.name] = found.perm
    if len(errors) == len(keyed):
        raise ModelError(f"no keyed tap could be matched: {next(iter(errors.values()))}")
    for name, message in errors.items():
        details[name] = {"skipped": message}
    return CPKey(recovered), details


def weight_matching_attack(
    artifact_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    method: str = "weights",
    reference: str | os.PathLike[str] | None = None,
    reference_state: Mapping[str, torch.Tensor] | None = None,
    fraction: float = 0.1,
    key: CPKey | None = None,
    epochs: int = RECIPE.epochs,
    batch_size: int = RECIPE.batch_size,
    lr: float = RECIPE.lr,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    stolen: Any = None,
) -> dict[str, Any]:
    """Recover the key of a stolen CP model at every keyed tap; report the channels recovered (given the
    owner's key) and mIoU.

    method "weights": against `reference` (a weights file or artifact folder), `reference_state`, or,
    without either, a plain model the attacker trains on `fraction` of the training data for `epochs`.
    method "activations": against class statistics on `fraction` of the training data.
    method "statistics": against the BatchNorm statistics stored after the consumers.
    """
    from seglock.models.attacks.stolen import load_stolen

    started = time.perf_counter()
    if method not in METHODS:
        raise AttackError(f"weight matching method must be one of {', '.join(METHODS)}, got {method!r}")
    if stolen is None:
        stolen = load_stolen(artifact_dir, data_dir, fraction=fraction, key=key, device=device, seed=seed,
                             cp_only=True)
    elif stolen.manifest.mode is not Mode.CP:
        raise AttackError(f"weight matching recovers channel permutations: {stolen.manifest.name} is "
                          f"{stolen.manifest.mode}, not cp")
    model, manifest, key = stolen.model, stolen.manifest, stolen.key
    keyed = stolen.keyed_taps
    batches = None
    if method == "weights":
        if reference_state is not None:
            used = {"kind": "given"}
        elif reference is not None:
            reference_state = read_reference(reference)
            used = {"kind": "file", "path": str(reference)}
        else:
            ref_model = train_reference(data_dir, manifest, fraction=stolen.fraction, epochs=epochs,
                                        batch_size=batch_size, lr=lr, device=str(stolen.device), seed=seed + 1,
                                        progress=progress)
            reference_state = ref_model.state_dict()
            used = {"kind": "trained", "fraction": stolen.fraction, "epochs": epochs}
    else:
        batches = list(DataLoader(stolen.plain_part, batch_size=batch_size, shuffle=False))
        used = {"kind": "data" if method == "activations" else "statistics", "fraction": stolen.fraction,
                "images": len(stolen.plain_part)}
    recovered, details = recover_key(model, keyed, manifest, method, reference_state=reference_state,
                                     batches=batches, device=str(stolen.device))
    if method == "statistics" and len(keyed) == 1:
        used.update(details[keyed[0].name])

    scores = {"plain": stolen.score_no_key(), "recovered": stolen.score_key(recovered)}
    if key is not None:
        scores["owner"] = stolen.score_key(key)
    per_tap = {}
    for tap in keyed:
        owner_key = None if key is None else CPKey(key[tap.name])
        per_tap[tap.name] = {**describe_match(CPKey(recovered[tap.name]), owner_key),
                             **details.get(tap.name, {})}
    result: dict[str, Any] = {
        "kind": "weight-matching",
        "model": manifest.name,
        "artifact": str(artifact_dir),
        "architecture": manifest.architecture,
        "protection": dict(manifest.protection),
        "tap": ",".join(t.name for t in keyed),
        "paper_number": keyed[0].paper_number if len(keyed) == 1 else None,
        "method": method,
        "reference": used,
        "data": str(data_dir),
        "split": stolen.split,
        "channels": sum(t.channels for t in keyed),
        "solver": SOLVER,
    }
    if key is not None:
        hits = sum(v["channels_recovered"] for v in per_tap.values())
        result.update({"channels_recovered": hits, "fraction_recovered": hits / result["channels"],
                       "exact": hits == result["channels"]})
    result.update({
        "per_tap": per_tap,
        "mIoU": {name: value["mIoU"] for name, value in scores.items()},
        "scores": scores,
        "seconds": round(time.perf_counter() - started, 3),
    })
    return result
