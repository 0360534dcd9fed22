"""The workloads the benchmarks time: data, a ClusTR trainer, and a plain CE baseline.

The ClusTR side is the project's own ``ClusTRTrainer``, built as ``main_clustr.py`` builds it
(Adam, channels_last, an initial cluster refresh). The baseline is the plain cross-entropy
epoch of a CIFAR training script (kuangliu/pytorch-cifar ``train(); test()``) written with the
same data path (in-memory uint8 batches, the same augmentation and device copies), so the
ratios isolate what ClusTR adds: the sampler, the Magnet loss, the embedding pass, k-means
and the cluster metrics.
"""
from __future__ import annotations

import copy
import os
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

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def default_data_dir() -> Path:
    """``$CLUSTR_DATA``, else ``../shared/data`` next to the repository."""
    root = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("CLUSTR_DATA", root.parent / "shared" / "data"))


def real_data_present(data_dir: Path) -> bool:
    return ((data_dir / "cifar10-subset" / "train").is_dir()
            and (data_dir / "weights" / "resnet18_cifar10.pt").is_file())


def synthetic_data(n: int, seed: int, num_classes: int = 10, modes: int = 2) -> ImageData:
    """``n`` CIFAR-shaped uint8 images (N, 3, 32, 32), classes balanced, no download.

    Each class has ``modes`` looks (a mean colour and a coarse 8x8 pattern) under pixel
    noise, so every class splits into well-populated groups and per-class k-means finds
    clusters the way it does on real embeddings instead of isolating outliers.
    """
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
    return ImageData(images, labels, list(CIFAR10_CLASSES[:num_classes]))


def real_data(data_dir: Path, n_train: int | None, n_test: int | None, seed: int
              ) -> tuple[ImageData, ImageData]:
    """Seeded, class-balanced subsets of the shared CIFAR-10 images (train, test)."""
    root = str(data_dir / "cifar10-subset")
    train = load_dataset("imagefolder", root, "train", workers=2)
    test = load_dataset("imagefolder", root, "test", workers=2)
    for name, n, data in (("training", n_train, train), ("test", n_test, test)):
        if n and n > len(data):
            raise UsageError(f"{n} {name} images asked for but the real subset in {root} has "
                             f"{len(data)}: lower the size or use --data synthetic")
    return balanced_subset(train, n_train, seed), balanced_subset(test, n_test, seed)


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
    """Plain CE training of the same network: ``steps`` shuffled batches of ``batch`` images,
    then the test set evaluated through the linear head, each epoch."""

    def __init__(self, model: ResNet18, optimizer: torch.optim.Optimizer, train: ImageData,
                 test: ImageData, batch: int, steps: int, test_batch: int, dataset: str,
                 seed: int, device: torch.device, amp: bool):
        self.model, self.optimizer, self.train, self.test = model, optimizer, train, test
        self.batch, self.steps, self.test_batch = batch, steps, test_batch
        self.dataset, self.device, self.amp = dataset, device, amp
        self.generator = torch.Generator().manual_seed(seed)

    def train_epoch(self) -> float:
        """Mean training loss over the epoch's steps."""
        self.model.train()
        order = torch.randperm(len(self.train), generator=self.generator)
        total = 0.0
        for step in range(self.steps):
            indices = order[step * self.batch:(step + 1) * self.batch]
            images = augment(self.train.images[indices], self.dataset, self.generator)
            x = to_device(images, self.device)
            y = self.train.labels[indices].to(self.device, non_blocking=True)
            with autocast(self.device, self.amp):
                logits = self.model.classify(x).float()
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item()
        return total / self.steps

    @torch.no_grad()
    def test_accuracy(self) -> float:
        """Top-1 accuracy (%) of the linear head: the same no-grad embedding pass as
        ClusTR's test pass, then the linear layer."""
        emb = compute_embeddings(self.model, self.test.images, self.test_batch, self.device,
                                 desc="embed test", amp=self.amp)
        pred = self.model.linear(emb.to(self.device)).argmax(1).cpu()
        return (pred == self.test.labels).float().mean().item() * 100.0

    def run_epoch(self) -> tuple[float, float]:
        return self.train_epoch(), self.test_accuracy()


@dataclass
class Workload:
    """One ClusTR trainer and one CE baseline on the same data, from the same weights."""

    train: ImageData
    test: ImageData
    trainer: ClusTRTrainer
    baseline: CrossEntropyBaseline
    device: torch.device


def make_workload(train: ImageData, test: ImageData, weights: Path | None, m: int, d: int,
                  K: int, seed: int, device: torch.device, amp: bool,
                  lr: float = 1e-4) -> Workload:
    """Trainer (with its initial cluster refresh done) and baseline, ready for epochs."""
    model = build_model(train.num_classes, weights, device, seed)
    ce_model = copy.deepcopy(model)
    # "imagefolder" = CIFAR-10's augmentation and k-means settings, for any CIFAR-shaped data
    cfg = TrainConfig(dataset="imagefolder", K=K, m=m, d=d, L=min(10, train.num_classes * K),
                      seed=seed, amp=amp)
    trainer = ClusTRTrainer(model, torch.optim.Adam(model.parameters(), lr=lr), train, test,
                            cfg, device)
    trainer.check_batch_shape()
    trainer.refresh_clusters()
    steps = trainer.sampler.steps_per_epoch()
    baseline = CrossEntropyBaseline(ce_model, torch.optim.Adam(ce_model.parameters(), lr=lr),
                                    train, test, batch=m * d, steps=steps,
                                    test_batch=cfg.test_batch, dataset=cfg.dataset, seed=seed,
                                    device=device, amp=amp)
    return Workload(train, test, trainer, baseline, device)
