"""ClusterClassifier: a ResNet18 and its cluster head as one ``nn.Module``.

``forward(x)`` takes images in [0, 1] (N, 3, H, W) and returns class logits (N, C): the
per-class log-sum-exp of -d^2/2sigma^2 over the counted clusters. Its arg-max is the paper's
prediction, and it is a proper logit, so AutoAttack, torchattacks or any other library can
attack it directly. The paper's own (bounded) class scores are ``paper_scores(x)``.

This is the one implementation of ClusTR inference: the CLI's evaluation rebuilds the same
class from the checkpoint file, so a model loaded here predicts what the CLI reports.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from base.io import load_checkpoint
from models.checkpoint import cluster_parts
from models.cluster_head import ClusterHead
from models.resnet import ResNet18


class ClusterClassifier(nn.Module):
    """Backbone (input normalisation inside) + cluster head (its state in buffers, so
    ``.to(device)`` moves it all); built in eval mode. ``class_names``: None where the
    checkpoint records none."""

    def __init__(self, backbone: ResNet18, head: ClusterHead, class_names: list[str] | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.class_names = list(class_names) if class_names is not None else None
        self.eval()

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 512-d embeddings the clusters live in."""
        return self.backbone(x)  # (N, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adaptive logits (N, C): finite for every class, the paper's arg-max."""
        return self.head.logits(self.backbone(x))  # (N, C)

    def paper_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The original's unnormalised class scores (what its PGD attacks)."""
        return self.head.paper_scores(self.backbone(x))  # (N, C), in [0, L]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's prediction: arg-max of the class scores, (N,)."""
        return self.head.predict(self.backbone(x))

    @classmethod
    def from_checkpoint(cls, ckpt, map_location="cpu", dataset: str | None = None,
                        L: int | None = None, normalize: bool | None = None
                        ) -> ClusterClassifier:
        """The classifier of a checkpoint (its path, or the loaded dict) of this project or of
        the original code, in eval mode on ``map_location``. ``L`` and ``normalize`` override
        the checkpoint's values; ``dataset`` (the input normalisation) too, else the recorded
        data set's, else CIFAR's (the original's checkpoints record none)."""
        ckpt = ckpt if isinstance(ckpt, dict) else load_checkpoint(ckpt, "cpu")
        model = cls(*cluster_parts(ckpt, dataset=dataset, L=L, normalize=normalize))
        return model.to(map_location)


class LinearClassifier(nn.Module):
    """A plain ResNet18 (its linear head) with the same interface, for baselines evaluated
    through ``--evaluate-ckpt``."""

    def __init__(self, backbone: ResNet18):
        super().__init__()
        self.backbone = backbone
        self.eval()

    @property
    def num_classes(self) -> int:
        return self.backbone.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.classify(x)  # (N, C)

    def paper_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.classify(x)  # the original attacks a baseline's logits

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(1)
