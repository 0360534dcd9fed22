"""ClusterClassifier: a ResNet18 and its cluster head as one ``nn.Module``.

``forward(x)`` takes images in [0, 1] (N, 3, H, W) and returns class logits (N, C): the
per-class log-sum-exp of -d^2/2sigma^2 over the counted clusters. Its arg-max is the paper's
prediction, and it is a proper logit, so AutoAttack, torchattacks or any other library can
attack it directly. The paper's own (bounded) class scores are ``paper_scores(x)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.cluster_head import ClusterHead
from models.resnet import ResNet18


class ClusterClassifier(nn.Module):
    def __init__(self, backbone: ResNet18, head: ClusterHead):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.eval()

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (N, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.logits(self.backbone(x))  # (N, C)

    def paper_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.paper_scores(self.backbone(x))  # (N, C), in [0, L]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.paper_scores(x).argmax(1)

    @classmethod
    def from_checkpoint(cls, path: str, map_location="cpu", dataset: str | None = None,
                        L: int | None = None, normalize: bool | None = None
                        ) -> ClusterClassifier:
        """Rebuild the classifier from a checkpoint of this project or of the original code.

        ``L`` and ``normalize`` override the checkpoint's values; ``dataset`` picks the input
        normalisation where the checkpoint does not record it (the original's do not).
        """
        from utils.checkpoint import classifier_from_checkpoint, load_checkpoint

        return classifier_from_checkpoint(load_checkpoint(path, map_location), dataset=dataset,
                                          L=L, normalize=normalize)
