"""Learned key: recover a CP key by gradient descent on a relaxed permutation per keyed tap.

The stolen weights stay frozen. At each keyed tap the thief inserts a doubly-stochastic matrix
P = Sinkhorn(L / tau) (Sinkhorn-Knopp normalisation of exp(L / tau) in the log domain; Mena et al.
2018, "Learning latent permutations with Gumbel-Sinkhorn networks") and mixes the producer's
channels x'(j) = sum_i P[j, i] x(i), the relaxation of paper 000 eq. (7)'s x'(j) = x(K[j]). The
logits L of every tap are trained together on D' with the model's own loss while tau anneals
towards 0, which pushes each P towards a permutation; the result is rounded to the nearest
permutation with a linear assignment on -log P, and the stolen model is scored with that key.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from seglock.models.attacks.assignment import linear_assignment
from seglock.models.attacks.data import AttackError
from seglock.models.attacks.stolen import Stolen
from seglock.models.inputs import scaled_input
from seglock.models.metrics import IGNORE_INDEX
from seglock.models.protect import CPKey

__all__ = ["learned_key_attack", "sinkhorn"]

SINKHORN_ITERATIONS = 20


def sinkhorn(log_alpha: torch.Tensor, iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """A doubly-stochastic matrix from a square matrix of log-weights (alternate row and column normalisation)."""
    for _ in range(iterations):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=1, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=0, keepdim=True)
    return log_alpha.exp()


def learned_key_attack(
    stolen: Stolen,
    *,
    epochs: int = 30,
    batch_size: int = 8,
    lr: float = 0.1,
    tau_start: float = 1.0,
    tau_end: float = 0.03,
    progress: bool = True,
) -> dict[str, Any]:
    """Optimise one relaxed permutation per keyed tap on D' with the stolen weights frozen; score the rounded key."""
    started = time.perf_counter()
    keyed = stolen.keyed_taps
    if not keyed:
        raise AttackError(f"the learned-key attack needs a cp model: {stolen.manifest.name} is {stolen.manifest.mode}")
    model = stolen.copy_model().to(stolen.device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(stolen.seed + 7)
    logits = {tap.name: (0.01 * torch.randn(tap.channels, tap.channels, generator=generator)).to(stolen.device)
              .requires_grad_(True) for tap in keyed}
    optimizer = torch.optim.Adam(list(logits.values()), lr=lr)
    tau = {"value": tau_start}

    def mixer(name: str):
        def mix(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
            p = sinkhorn(logits[name] / tau["value"])
            return torch.einsum("ji,bi...->bj...", p, output)
        return mix

    @contextlib.contextmanager
    def relaxed() -> Iterator[None]:
        handles = [model.get_submodule(tap.producer).register_forward_hook(mixer(tap.name)) for tap in keyed]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    drop_last = len(stolen.train_part) > batch_size
    steps_per_epoch = len(stolen.train_part) // batch_size if drop_last else 1
    total = max(epochs * steps_per_epoch, 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="learned key", unit="step", leave=False, file=sys.stderr, disable=None)
    history = []
    step = 0
    try:
        with relaxed():
            for epoch in range(epochs):
                order = torch.Generator().manual_seed(stolen.seed * 1_000_003 + epoch)
                loader = DataLoader(stolen.train_part, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                                    generator=order)
                total_loss, seen = 0.0, 0
                for images, masks in loader:
                    tau["value"] = tau_start * (tau_end / tau_start) ** (step / max(total - 1, 1))
                    x = scaled_input(images.to(stolen.device), "none", stolen.manifest.normalization)
                    loss = F.cross_entropy(model(x), masks.to(stolen.device), ignore_index=IGNORE_INDEX)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    total_loss += loss.item() * images.shape[0]
                    seen += images.shape[0]
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{total_loss / seen:.3f}", tau=f"{tau['value']:.3f}")
                history.append({"epoch": epoch + 1, "train_loss": total_loss / max(seen, 1), "tau": tau["value"]})
    finally:
        if bar is not None:
            bar.close()

    recovered = {}
    sharpness = {}
    with torch.no_grad():
        for tap in keyed:
            p = sinkhorn(logits[tap.name] / tau["value"]).cpu().double()
            recovered[tap.name] = linear_assignment(-torch.log(p.clamp_min(1e-300)).numpy())
            sharpness[tap.name] = float(p.max(dim=1).values.mean())
    key = CPKey(recovered)
    scores = stolen.score_key(key)
    result: dict[str, Any] = {
        "kind": "learned-key",
        **stolen.describe(),
        "taps": [tap.name for tap in keyed],
        "epochs": epochs,
        "lr": lr,
        "tau": [tau_start, tau_end],
        "mean_row_max": sharpness,
        "mIoU": scores["mIoU"],
        "scores": {"recovered": scores},
        "history": history,
    }
    if stolen.key is not None:
        hits = {name: int(np.sum(recovered[name] == stolen.key[name])) for name in recovered}
        channels = {tap.name: tap.channels for tap in keyed}
        result["channels_recovered"] = hits
        result["fraction_recovered"] = sum(hits.values()) / sum(channels.values())
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result
