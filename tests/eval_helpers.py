"""Models shared by the attack and evaluation tests, built once per session.

* ``TinyNet``: a small CNN with BatchNorm and dropout (train mode would change its outputs
  and its running statistics), fast enough to attack thousands of times.
* ``real_*``: the shared CIFAR-10 ResNet18 and a cluster classifier built from it as the
  CLI builds one (per-class k-means, K = 2, L = 20), on a class-balanced slice of the real
  training set so that the tests stay fast.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn

from datasets.data import ImageData, balanced_subset, load_dataset, to_float
from models.checkpoint import load_weights
from models.resnet import ResNet18
from utils.attacks.pgd import PGD, AttackResult, kept, paper_loss, pgd_restart
from utils.train.clustering import KMeansSettings, fit_cluster_classifier

ROOT_DIR = Path(__file__).resolve().parents[1]
TRAIN_SLICE = 200  # training images the test cluster classifier is fitted on


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                nn.Dropout(0.5), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                nn.Flatten())
            self.linear = nn.Linear(8 * 8 * 8, num_classes)

    def forward(self, x):
        return self.linear(self.features(x))  # (N, C)

    def paper_scores(self, x):
        return self(x)

    @torch.no_grad()
    def predict(self, x):
        return self(x).argmax(1)


def edge_images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 32, 32) in [0, 1], with whole regions at 0, 1 and within 1e-4 of them, where
    an unclipped random start or step would leave the image range."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=gen)
    x[:, :, :8] = 0.0
    x[:, :, 8:16] = 1.0
    x[:, :, 16:20] = 1e-4
    x[:, :, 20:24] = 1.0 - 1e-4
    return x


@functools.cache
def real_test_data(subset_dir: str, n: int, seed: int = 0) -> ImageData:
    """The class-balanced subset of n test images that ``--test-subset n --seed seed``
    evaluates."""
    return balanced_subset(_real_test_set(subset_dir), n, seed)


@functools.cache
def _real_test_set(subset_dir: str) -> ImageData:
    return load_dataset("imagefolder", subset_dir, "test", workers=2)


@functools.cache
def real_backbone(weights: str) -> ResNet18:
    model = ResNet18(10)
    load_weights(model, weights)
    return model.eval()


@functools.cache
def real_cluster_classifier(subset_dir: str, weights: str):
    train = load_dataset("imagefolder", subset_dir, "train", workers=2)
    train = balanced_subset(train, TRAIN_SLICE, 0)
    return fit_cluster_classifier(real_backbone(weights), train,
                                  KMeansSettings.for_dataset("imagefolder", 2, seed=111), L=20,
                                  batch=100)


def images_of(data: ImageData) -> torch.Tensor:
    return to_float(data.images)


def pgd(model, x, y, eps, step, iterations, restarts, keys_fn, loss_fn=paper_loss,
        shrink=True, fooled_wins=False):
    """PGD with restarts on one batch of float images, merged by ``kept`` as the sweep
    merges them; ``keys_fn(restart)`` gives the start seeds. With ``fooled_wins`` each
    restart attacks only the examples still robust, ``keys_fn(restart, rows)`` giving theirs."""
    attack = PGD("test", loss_fn, iterations, 1, step, fooled_wins, shrink)
    n = len(x)
    best = AttackResult(torch.zeros_like(x), x.new_full((n,), -float("inf")), y.clone(),
                        torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long))
    for r in range(restarts):
        rows = best.correct.nonzero().flatten() if fooled_wins else torch.arange(n)
        if len(rows) == 0:
            break
        keys = keys_fn(r, rows) if fooled_wins else keys_fn(r)
        res = pgd_restart(model, x[rows], y[rows], eps, attack, keys)
        take = kept(best.loss[rows], res, fooled_wins)
        for name in ("delta", "loss", "pred", "steps"):
            getattr(best, name)[rows[take]] = getattr(res, name)[take].to(
                getattr(best, name).dtype)
        best.correct = best.pred == y
    return best


def quick_autoattack(monkeypatch, attacks: list[str], iterations: int) -> None:
    """Make ``run_autoattack`` build AutoAttack's custom version: ``attacks`` with
    ``iterations`` each, a quick run in place of the standard version."""
    from utils.attacks import adaptive

    def make(backend, model, eps, device, seed, log_path=None):
        key = "attacks_to_run" if backend.package == "autoattack" else "attacks"
        adversary = backend.module.AutoAttack(model, norm="Linf", eps=eps, version="custom",
                                              device=device, seed=seed, **{key: attacks})
        adversary.fab.n_iter = iterations
        for apgd in (adversary.apgd, adversary.apgd_targeted):
            # APGD derives its step-size checkpoints from n_iter at construction
            apgd.n_iter = apgd.n_iter_orig = iterations
            apgd.n_iter_2 = max(int(0.22 * iterations), 1)
            apgd.n_iter_min = max(int(0.06 * iterations), 1)
            apgd.size_decr = max(int(0.03 * iterations), 1)
        return adversary

    monkeypatch.setattr(adaptive, "make_adversary", make)
