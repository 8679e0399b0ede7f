"""`tiny`: a small encoder-decoder CNN of plain conv-BN-ReLU stages (no residuals, no skips).

It trains in seconds on a CPU at 64-128 px, which makes it the model of the demo and of fast tests.
Every stage output is read by exactly one plain convolution, so every stage is a CP tap.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class TinySegNet(nn.Module):
    """enc1..enc3 halve the resolution (widths w, 2w, 4w); dec1, dec2 double it back (2w, w)."""

    def __init__(self, num_classes: int, *, width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(*_conv_bn_relu(in_channels, w, stride=2))
        self.enc2 = nn.Sequential(*_conv_bn_relu(w, 2 * w, stride=2))
        self.enc3 = nn.Sequential(*_conv_bn_relu(2 * w, 4 * w, stride=2))
        self.dec1 = nn.Sequential(_upsample(), *_conv_bn_relu(4 * w, 2 * w))
        self.dec2 = nn.Sequential(_upsample(), *_conv_bn_relu(2 * w, w))
        self.classifier = nn.Conv2d(w, num_classes, 1)

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.dec2(self.dec1(self.enc3(self.enc2(self.enc1(x)))))
        logits = self.classifier(features)
        return {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_train(x)["out"]


def _upsample() -> nn.Module:
    return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
