"""Segmentation architectures by name, built locally (random init unless a local weights file is given).

Every model returns logits N x K x H x W from `forward(x)` and a dict from `forward_train(x)`:
{"out": logits} plus {"aux": aux logits} where the model has an auxiliary head (the FCN and
DeepLabv3 models, `aux_loss=True` by default), for training with an auxiliary loss.
`build_model` records `architecture`, `architecture_kwargs` (all of them, defaults included) and
`num_classes` on the model, which is what an artifact needs to rebuild it.

Architectures and their keyword arguments:
    tiny                            width=16, in_channels=3
    vit_seg                         image_size=(256, 256), patch_size=16, embed_dim=192, depth=4,
                                    num_heads=3, mlp_ratio=4.0, head_channels=256, in_channels=3, dropout=0.0
    fcn_resnet50, fcn_resnet101,
    deeplabv3_resnet50, deeplabv3_resnet101,
    deeplabv3_mobilenet_v3_large    aux_loss=True
    lraspp_mobilenet_v3_large       (none)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from seglock.models.architectures import torchvision_models as tvm
from seglock.models.architectures.tiny import TinySegNet
from seglock.models.architectures.vit import ViTSeg
from seglock.models.architectures.weights import load_backbone_weights, load_weights, read_state_dict
from seglock.models.errors import ModelError

__all__ = [
    "Architecture",
    "build_model",
    "get_architecture",
    "list_architectures",
    "read_state_dict",
]


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str  # "resnet", "mobilenet", "tiny" or "vit": the tap layout (seglock.models.taps)
    build: Callable[..., nn.Module]  # build(num_classes, **kwargs)
    has_backbone: bool  # a classification backbone's weights file can be loaded into `model.backbone`

    def defaults(self) -> dict[str, Any]:
        """The keyword arguments this architecture takes, with their defaults."""
        params = inspect.signature(self.build).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _tiny(num_classes: int, *, width: int = 16, in_channels: int = 3) -> nn.Module:
    return TinySegNet(num_classes, width=width, in_channels=in_channels)


def _vit_seg(
    num_classes: int,
    *,
    image_size: tuple[int, int] = (256, 256),
    patch_size: int = 16,
    embed_dim: int = 192,
    depth: int = 4,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    head_channels: int = 256,
    in_channels: int = 3,
    dropout: float = 0.0,
) -> nn.Module:
    return ViTSeg(
        num_classes,
        image_size=image_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        head_channels=head_channels,
        in_channels=in_channels,
        dropout=dropout,
    )


_ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("tiny", "tiny", _tiny, has_backbone=False),
        Architecture("fcn_resnet50", "resnet", tvm.fcn_resnet50, has_backbone=True),
        Architecture("fcn_resnet101", "resnet", tvm.fcn_resnet101, has_backbone=True),
        Architecture("deeplabv3_resnet50", "resnet", tvm.deeplabv3_resnet50, has_backbone=True),
        Architecture("deeplabv3_resnet101", "resnet", tvm.deeplabv3_resnet101, has_backbone=True),
        Architecture("deeplabv3_mobilenet_v3_large", "mobilenet", tvm.deeplabv3_mobilenet_v3_large, has_backbone=True),
        Architecture("lraspp_mobilenet_v3_large", "mobilenet", tvm.lraspp_mobilenet_v3_large, has_backbone=True),
        Architecture("vit_seg", "vit", _vit_seg, has_backbone=False),
    )
}


def list_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_architecture(name: str) -> Architecture:
    try:
        return _ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ModelError(f"unknown architecture {name!r}; known: {', '.join(list_architectures())}") from None


def build_model(
    name: str,
    num_classes: int,
    *,
    backbone_weights: str | os.PathLike[str] | None = None,
    weights: str | os.PathLike[str] | None = None,
    **arch_kwargs: Any,
) -> nn.Module:
    """Build `name` for `num_classes` classes; weights come only from the local files given."""
    arch = get_architecture(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    if backbone_weights is not None and not arch.has_backbone:
        raise ModelError(f"{name} has no pretrained backbone to load; pass weights= for the whole model")
    for path in (backbone_weights, weights):
        if path is not None and not os.path.isfile(path):
            raise ModelError(f"weights file {os.fspath(path)} does not exist")
    kwargs = _resolve_kwargs(arch, arch_kwargs)
    model = arch.build(num_classes, **kwargs)
    if backbone_weights is not None:
        load_backbone_weights(model.backbone, backbone_weights)
    if weights is not None:
        load_weights(model, weights)
    model.architecture = name
    model.architecture_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    model.num_classes = num_classes
    return model


def _resolve_kwargs(arch: Architecture, given: Mapping[str, Any]) -> dict[str, Any]:
    defaults = arch.defaults()
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        takes = ", ".join(defaults) or "no arguments"
        raise ModelError(f"{arch.name} takes no argument {unknown[0]!r}; it takes: {takes}")
    resolved = {**defaults, **given}
    for key, value in resolved.items():
        _check_kwarg(arch.name, key, value, defaults[key])
    return resolved


def _check_kwarg(arch: str, key: str, value: Any, default: Any) -> None:
    """The value has the default's type (manifests rebuild models from JSON, so check what they hold)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    elif isinstance(default, tuple):
        ok = (
            isinstance(value, (tuple, list))
            and len(value) == len(default)
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        )
    else:
        ok = True
    if not ok:
        raise ModelError(f"{arch} argument {key!r} must look like {default!r}, got {value!r}")
