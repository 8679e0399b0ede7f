"""`vit_seg`: a SETR-naive segmenter (paper 003 serves SETR) small enough for tests.

Patch embedding (a patch x patch convolution with the same stride), a learned position
embedding, pre-norm transformer encoder layers, a final LayerNorm, the tokens reshaped to a
feature map, then conv1x1-BN-ReLU-conv1x1 and a bilinear upsample to the input size.
The position embedding fixes the input size: it is part of the configuration.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from seglock.models.errors import ModelError


class TokensToMap(nn.Module):
    """N x L x D tokens -> N x D x h x w feature map (a module so that its output can be tapped)."""

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, _, d = tokens.shape
        return tokens.transpose(1, 2).reshape(n, d, *self.grid)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an N x C x H x W map (each pixel normalised on its own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ViTSeg(nn.Module):
    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        height, width = (int(s) for s in image_size)
        if height % patch_size or width % patch_size:
            raise ModelError(f"vit_seg image_size {height}x{width} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ModelError(f"vit_seg embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.image_size = (height, width)
        grid = (height // patch_size, width // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(
            embed_dim,
            num_heads,
            dim_feedforward=int(embed_dim * mlp_ratio),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.to_map = TokensToMap(grid)
        # The encoder's final norm works on the map, so the `encoder` tap sits before it (a channel-wise layer).
        self.norm = ChannelLayerNorm(embed_dim)
        self.head = nn.Sequential(
            nn.Conv2d(embed_dim, head_channels, 1, bias=False),
            nn.BatchNorm2d(head_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(head_channels, num_classes, 1),
        )

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if tuple(x.shape[-2:]) != self.image_size:
            h, w = self.image_size
            raise ModelError(f"vit_seg was built for {h}x{w} inputs, got {x.shape[-2]}x{x.shape[-1]}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        features = self.norm(self.to_map(self.encoder(tokens)))
        logits = self.head(features)
        return {"out": F.interpolate(logits, size=self.image_size, mode="bilinear", align_corners=False)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_train(x)["out"]
