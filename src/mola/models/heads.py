"""Task heads: a linear classifier on pooled features, or a small conv decoder for dense tasks."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mola.data.base import TaskInfo


class ClassificationHead(nn.Module):
    """Global-average-pool (for feature maps) then Linear -> classes."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, feats: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        if feats.dim() == 4:
            feats = feats.mean(dim=(2, 3))
        elif feats.dim() == 3:
            feats = feats.mean(dim=1)
        return self.fc(feats)


class DenseHead(nn.Module):
    """3x3 conv-BN-ReLU, 1x1 conv to the task's channels, bilinear upsampling to the input size.

    Normals are L2-normalised per pixel so the head predicts unit vectors.
    """

    def __init__(self, in_dim: int, out_channels: int, hidden: int = 128, normalize: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_dim, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1),
        )
        self.normalize = normalize

    def forward(self, feats: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        if feats.dim() != 4:
            raise ValueError(f"dense heads need a feature map (B, C, h, w), got {tuple(feats.shape)}")
        y = self.net(feats)
        if out_size is not None and tuple(y.shape[-2:]) != tuple(out_size):
            y = F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)
        return F.normalize(y, dim=1) if self.normalize else y


def make_head(task: TaskInfo, in_dim: int, hidden: int = 128) -> nn.Module:
    """The head a task needs: classifier for classification, decoder for segmentation/depth/normal."""
    if task.kind == "classification":
        return ClassificationHead(in_dim, task.out_channels)
    return DenseHead(in_dim, task.out_channels, hidden, normalize=task.kind == "normal")
