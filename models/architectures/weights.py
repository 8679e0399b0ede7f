"""Local weight files (.safetensors, or a .pth state dict read with weights_only=True): never a download."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from seglock.models.errors import ModelError

_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Keys of a classification network's own head, which a segmentation backbone does not have.
_CLASSIFICATION_HEADS = ("fc.", "classifier.", "aux_classifier.")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file; a clear ModelError for a missing or unreadable one."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"weights file {path} is not a readable safetensors file ({exc})") from None
    if suffix not in _PICKLE_SUFFIXES:
        raise ModelError(f"weights file {path} is neither .safetensors nor a .pth state dict")
    try:
        # weights_only: a state dict is read without running arbitrary pickled code.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a bad file
        raise ModelError(f"weights file {path} is not a readable state dict ({type(exc).__name__})") from None
    return _unwrap_checkpoint(loaded, path)


def _unwrap_checkpoint(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return dict(loaded)
        for field in ("state_dict", "model"):
            if isinstance(loaded.get(field), Mapping):
                return _unwrap_checkpoint(loaded[field], path)
    raise ModelError(f"weights file {path} holds no state dict of tensors")


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a whole model's weights; every tensor must be there and fit."""
    state = _strip_prefix(read_state_dict(path), model.state_dict().keys(), ("", "module.", "model."))
    load_state_exactly(model, state, f"weights {path}")


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a classification network's (or a segmentation checkpoint's) weights into a backbone."""
    prefixes = ("", "backbone.", "features.", "module.")
    state = _strip_prefix(read_state_dict(path), backbone.state_dict().keys(), prefixes)
    load_state_exactly(backbone, state, f"backbone weights {path}", ignore=_CLASSIFICATION_HEADS)


def _strip_prefix(
    state: dict[str, torch.Tensor], expected: Iterable[str], prefixes: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The state under the prefix that names the most expected keys (checkpoints differ only in prefixes)."""
    wanted = set(expected)

    def stripped(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    return max((stripped(p) for p in prefixes), key=lambda s: len(wanted & s.keys()))


def load_state_exactly(
    module: nn.Module, state: dict[str, torch.Tensor], what: str, ignore: tuple[str, ...] = ()
) -> None:
    """Load every tensor of `module` from `state`; a ModelError saying what is missing, extra or misshapen."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(k for k in state.keys() - expected.keys() if not k.startswith(ignore))
    misshapen = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    problems = [
        f"{len(names)} {label} (e.g. {names[0]})"
        for names, label in ((missing, "missing"), (unexpected, "unexpected"), (misshapen, "of the wrong shape"))
        if names
    ]
    if problems:
        raise ModelError(f"{what} do not fit the model: " + ", ".join(problems))
    module.load_state_dict({k: state[k] for k in expected}, strict=True)
