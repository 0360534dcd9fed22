"""The CIFAR ResNet18 of the original ClusTR code, with the input normalisation inside.

The parameter names (``conv1.weight``, ``layer1.0.shortcut.0.weight``, ``linear.*``, ...)
are exactly the original's, so weight files move between the two code bases unchanged.
The per-channel mean and std are *non-persistent* buffers: they move with ``.to(device)``
but never appear in ``state_dict()``. Callers therefore feed images in [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
SVHN_MEAN = (0.4378, 0.4439, 0.4729)
SVHN_STD = (0.1980, 0.2011, 0.1971)

EMBEDDING_DIM = 512


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """``forward(x)`` maps images in [0, 1] (N, 3, 32, 32) to embeddings (N, 512).
    ``classify(x)`` goes on through the linear head (used for pre-training, for plain
    classifiers given to ``--evaluate-ckpt`` and for weight compatibility)."""

    def __init__(self, num_classes: int = 10, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, planes in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if i == 1 else 2
            blocks = [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.linear = nn.Linear(EMBEDDING_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return out.flatten(1)  # (N, 512)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self(x))  # (N, C)


def normalization_for(dataset: str) -> tuple[tuple, tuple]:
    """The (mean, std) the original uses: SVHN's own, CIFAR's for everything else."""
    return (SVHN_MEAN, SVHN_STD) if dataset == "svhn" else (CIFAR_MEAN, CIFAR_STD)
