"""Task heads: a linear classifier on pooled features; for dense tasks a small conv decoder or a PSPNet decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.tasks import TaskInfo


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
        self.in_dim = in_dim

    def forward(self, feats: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        if feats.dim() != 4:
            raise ValueError(f"dense heads need a feature map (B, C, h, w), got {tuple(feats.shape)}")
        y = self.net(feats)
        if out_size is not None and tuple(y.shape[-2:]) != tuple(out_size):
            y = F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)
        return F.normalize(y, dim=1) if self.normalize else y


class PSPHead(nn.Module):
    """PSPNet decoder (Zhao et al. 2017) for a dense task: pyramid pooling of the feature map to 1x1, 2x2, 3x3 and
    6x6 bins (each a 1x1 conv to ``in_dim / len(bins)`` channels, upsampled back), concatenated with the map, a
    3x3 conv-BN-ReLU to ``hidden`` channels, dropout 0.1, a 1x1 conv to the task's channels, then bilinear
    upsampling to the input size (x8 on ResNet-50-dilated). Normals are L2-normalised per pixel."""

    def __init__(self, in_dim: int, out_channels: int, hidden: int = 512, bins: tuple[int, ...] = (1, 2, 3, 6),
                 normalize: bool = False) -> None:
        super().__init__()
        branch = max(1, in_dim // len(bins))
        self.bins = tuple(bins)
        self.pyramid = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, branch, 1, bias=False), nn.BatchNorm2d(branch),
                          nn.ReLU())
            for b in self.bins)
        self.fuse = nn.Sequential(
            nn.Conv2d(in_dim + branch * len(self.bins), hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(), nn.Dropout2d(0.1), nn.Conv2d(hidden, out_channels, 1))
        self.normalize = normalize

    def forward(self, feats: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        if feats.dim() != 4:
            raise ValueError(f"the pspnet head needs a feature map (B, C, h, w), got {tuple(feats.shape)}")
        hw = feats.shape[-2:]
        pooled = [F.interpolate(level(feats), size=hw, mode="bilinear", align_corners=False)
                  for level in self.pyramid]
        y = self.fuse(torch.cat([feats, *pooled], dim=1))
        if out_size is not None and tuple(y.shape[-2:]) != tuple(out_size):
            y = F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)
        return F.normalize(y, dim=1) if self.normalize else y


HEADS = ("auto", "pspnet")


def make_head(task: TaskInfo, in_dim: int, hidden: int = 128, kind: str = "auto") -> nn.Module:
    """The head a task needs: classifier for classification; for segmentation/depth/normal the small conv
    decoder (``kind="auto"``) or the PSPNet decoder (``kind="pspnet"``)."""
    if kind not in HEADS:
        raise ValueError(f"unknown model.head {kind!r}; accepted: {', '.join(HEADS)}")
    spec = task.spec
    if not spec.dense:
        return ClassificationHead(in_dim, task.out_channels)
    if kind == "pspnet":
        return PSPHead(in_dim, task.out_channels, hidden, normalize=spec.unit_vectors)
    return DenseHead(in_dim, task.out_channels, hidden, normalize=spec.unit_vectors)
