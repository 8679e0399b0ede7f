"""FCN, DeepLabv3 and LR-ASPP from torchvision, built with no weights and wrapped to return logits.

`SegmentationNet` keeps torchvision's module names (`backbone`, `classifier`, `aux_classifier`),
so torchvision segmentation checkpoints load into it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import segmentation as tv_segmentation


class SegmentationNet(nn.Module):
    """backbone -> classifier (+ aux_classifier); logits upsampled to the input size.

    The backbone returns a dict of feature maps. A classifier reads `features["out"]`, or the
    whole dict when `classifier_reads_all` (LR-ASPP's head reads "low" and "high").
    """

    def __init__(
        self,
        backbone: nn.Module,
        classifier: nn.Module,
        aux_classifier: nn.Module | None = None,
        *,
        classifier_reads_all: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.classifier_reads_all = classifier_reads_all

    def _run(self, x: torch.Tensor, with_aux: bool) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        logits = self.classifier(features if self.classifier_reads_all else features["out"])
        result = {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
        if with_aux and self.aux_classifier is not None:
            aux = self.aux_classifier(features["aux"])
            result["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return result

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"out": logits, "aux": aux logits (when the model has an aux head)}."""
        return self._run(x, with_aux=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, with_aux=False)["out"]


def _wrap(builder: Callable[..., nn.Module], num_classes: int, **kwargs: object) -> SegmentationNet:
    net = builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    return SegmentationNet(net.backbone, net.classifier, getattr(net, "aux_classifier", None))


def fcn_resnet50(num_classes: int, *, aux_loss: bool = True) -> SegmentationNet:
    return _wrap(tv_segmentation.fcn_resnet50, num_classes, aux_loss=aux_loss)


def fcn_resnet101(num_classes: int, *, aux_loss: bool = True) -> SegmentationNet:
    return _wrap(tv_segmentation.fcn_resnet101, num_classes, aux_loss=aux_loss)


def deeplabv3_resnet50(num_classes: int, *, aux_loss: bool = True) -> SegmentationNet:
    return _wrap(tv_segmentation.deeplabv3_resnet50, num_classes, aux_loss=aux_loss)


def deeplabv3_resnet101(num_classes: int, *, aux_loss: bool = True) -> SegmentationNet:
    return _wrap(tv_segmentation.deeplabv3_resnet101, num_classes, aux_loss=aux_loss)


def deeplabv3_mobilenet_v3_large(num_classes: int, *, aux_loss: bool = True) -> SegmentationNet:
    return _wrap(tv_segmentation.deeplabv3_mobilenet_v3_large, num_classes, aux_loss=aux_loss)


def lraspp_mobilenet_v3_large(num_classes: int) -> SegmentationNet:
    net = tv_segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
    return SegmentationNet(net.backbone, net.classifier, classifier_reads_all=True)
