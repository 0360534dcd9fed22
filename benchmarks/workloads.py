"""What the benchmarks time: data, the project's ``ClusTRTrainer`` built as ``main_clustr.py``
builds it, and a plain CE epoch (kuangliu/pytorch-cifar's ``train(); test()``) on the same
data path, so that the ratios isolate the sampler, the Magnet loss, the embedding pass,
k-means and the cluster metrics."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from base.errors import UsageError
from base.tensors import autocast, to_device
from datasets.data import ImageData, augment, balanced_subset, load_dataset
from models.checkpoint import load_weights
from models.resnet import ResNet18
from utils.train.embeddings import compute_embeddings
from utils.train.training import ClusTRTrainer, TrainConfig

WEIGHTS = Path("weights") / "resnet18_cifar10.pt"  # under the data folder
LR = 1e-4  # Adam, both networks


@dataclass(frozen=True)
class Setup:
    """Batches of ``m`` clusters x ``d`` examples, ``K`` clusters per class; ``amp``:
    bfloat16 autocast; ``kmeans_device``: k-means on ``device`` after the first refresh."""

    m: int
    d: int
    K: int
    seed: int
    device: torch.device
    amp: bool = False
    kmeans_device: bool = False


def synthetic_data(n: int, seed: int, num_classes: int = 10, modes: int = 2) -> ImageData:
    """``n`` CIFAR-shaped uint8 images (N, 3, 32, 32), classes balanced, no download. Each
    class has ``modes`` looks (a mean colour and a coarse 8x8 pattern) under pixel noise, so
    per-class k-means finds clusters as on real embeddings instead of isolating outliers."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    labels = (torch.arange(n) % num_classes)[order]
    mode = labels * modes + (torch.arange(n) // num_classes % modes)[order]  # (N,) balanced
    looks = num_classes * modes
    colour = torch.rand(looks, 3, 1, 1, generator=gen) * 160 + 40  # (C*M, 3, 1, 1)
    pattern = F.interpolate(torch.rand(looks, 1, 8, 8, generator=gen), size=(32, 32))
    base = colour + 80 * (pattern - 0.5)  # (C*M, 3, 32, 32)
    noise = torch.randn(n, 3, 32, 32, generator=gen) * 20
    images = (base[mode] + noise).clamp(0, 255).to(torch.uint8)
    return ImageData(images, labels, [f"class {c}" for c in range(num_classes)])


def load_data(kind: str, data_dir: Path | None, n_train: int, n_test: int, seed: int
              ) -> tuple[ImageData, ImageData, Path | None]:
    """(train, test, weights): seeded, class-balanced subsets of the shared CIFAR-10 images
    and its weights for ``kind`` "real"; synthetic images and no weights otherwise."""
    if kind != "real":
        return synthetic_data(n_train, seed), synthetic_data(n_test, seed + 1), None
    root, subsets = str(data_dir / "cifar10-subset"), []
    for split, n in (("train", n_train), ("test", n_test)):
        data = load_dataset("imagefolder", root, split, workers=2)
        if n > len(data):
            raise UsageError(f"{n} {split} images asked for but the real subset in {root} has "
                             f"{len(data)}: lower the size or use --data synthetic")
        subsets.append(balanced_subset(data, n, seed))
    return subsets[0], subsets[1], data_dir / WEIGHTS


def build_model(num_classes: int, weights: Path | None, device: torch.device,
                seed: int) -> ResNet18:
    """A ResNet18 as ``main_clustr.py`` builds it: given weights or a seeded random init,
    on ``device`` in channels_last."""
    torch.manual_seed(seed)
    model = ResNet18(num_classes)
    if weights is not None:
        load_weights(model, str(weights))
    return model.to(device, memory_format=torch.channels_last)


class CrossEntropyBaseline:
    """Plain CE training with ClusTR's batch size, augmentation, device copies and test
    pass: ``steps`` shuffled batches, then the test set through the linear head."""

    def __init__(self, model: ResNet18, train: ImageData, test: ImageData, cfg: TrainConfig,
                 steps: int, device: torch.device):
        self.model, self.train, self.test, self.cfg = model, train, test, cfg
        self.steps, self.device = steps, device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def run_epoch(self) -> tuple[float, float]:
        """(mean training loss, test accuracy %)."""
        self.model.train()
        batch, total = self.cfg.m * self.cfg.d, 0.0
        order = torch.randperm(len(self.train), generator=self.generator)
        for step in range(self.steps):
            indices = order[step * batch:(step + 1) * batch]
            images = augment(self.train.images[indices], self.cfg.dataset, self.generator)
            x = to_device(images, self.device)
            y = self.train.labels[indices].to(self.device, non_blocking=True)
            with autocast(self.device, self.cfg.amp):
                logits = self.model.classify(x).float()
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item()
        return total / self.steps, self.test_accuracy()

    @torch.no_grad()
    def test_accuracy(self) -> float:
        """The same no-grad embedding pass as ClusTR's test pass, then the linear layer."""
        emb = compute_embeddings(self.model, self.test.images, self.cfg.test_batch,
                                 self.device, desc="embed test", amp=self.cfg.amp)
        pred = self.model.linear(emb.to(self.device)).argmax(1).cpu()
        return (pred == self.test.labels).float().mean().item() * 100.0


@dataclass
class Workload:
    """One ClusTR trainer and one CE baseline on the same data, from the same weights."""

    train: ImageData
    test: ImageData
    trainer: ClusTRTrainer
    baseline: CrossEntropyBaseline
    device: torch.device


def make_workload(train: ImageData, test: ImageData, weights: Path | None,
                  setup: Setup) -> Workload:
    """Trainer (Adam, channels_last, its initial cluster refresh done) and baseline."""
    model = build_model(train.num_classes, weights, setup.device, setup.seed)
    ce_model = copy.deepcopy(model)
    # "imagefolder" = CIFAR-10's augmentation and k-means settings, for any CIFAR-shaped data
    cfg = TrainConfig(dataset="imagefolder", K=setup.K, m=setup.m, d=setup.d,
                      L=min(10, train.num_classes * setup.K), seed=setup.seed, amp=setup.amp)
    trainer = ClusTRTrainer(model, torch.optim.Adam(model.parameters(), lr=LR), train, test,
                            cfg, setup.device)
    trainer.check_batch_shape()
    trainer.refresh_clusters()
    cfg.kmeans_device = setup.kmeans_device  # the refreshes after this first one
    baseline = CrossEntropyBaseline(ce_model, train, test, cfg, trainer.steps_per_epoch(),
                                    setup.device)
    return Workload(train, test, trainer, baseline, setup.device)
