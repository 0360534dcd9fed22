"""On the real CIFAR-10 subset with the real pretrained ResNet18 (skipped where absent)."""
import subprocess
import sys

import pytest
import torch

from datasets.data import load_dataset
from models.checkpoint import load_weights
from models.cluster_head import ClusterHead
from models.resnet import ResNet18
from tests.conftest import ROOT
from utils.train.clustering import KMeansSettings, fit_clusters
from utils.train.embeddings import compute_embeddings

pytestmark = pytest.mark.slow


def test_pretrained_clusters_score_at_least_90(real_subset, real_weights):
    model = ResNet18(10)
    load_weights(model, str(real_weights))
    cpu = torch.device("cpu")
    train = load_dataset("imagefolder", str(real_subset), "train")
    test = load_dataset("imagefolder", str(real_subset), "test")
    assert len(test) == 1017
    train_emb = compute_embeddings(model, train.images, 256, cpu)
    clusters = fit_clusters(train_emb, train.labels, 10,
                            KMeansSettings(2, n_init=1, max_iter=20, seed=111))
    head = ClusterHead(clusters.centers, clusters.classes, clusters.variance, 10, L=20)
    test_emb = compute_embeddings(model, test.images, 256, cpu)
    acc = (head.predict(test_emb) == test.labels).float().mean().item()
    linear = (model.linear(test_emb).argmax(1) == test.labels).float().mean().item()
    assert acc >= 0.90, acc
    assert linear >= 0.93, linear


def test_one_short_clustr_epoch_keeps_85(real_subset, real_weights, tmp_path):
    out = tmp_path / "exp"
    res = subprocess.run(
        [sys.executable, str(ROOT / "main_clustr.py"), "--checkpoint", str(out), "--dataset",
         "imagefolder", "--data-root", str(real_subset), "--pretrained-path", str(real_weights),
         "--epochs", "1", "--L", "20", "--train-subset", "1500", "--iterations", "1",
         "--restarts", "1", "--test-subset", "300"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    row = (out / "log.txt").read_text().splitlines()[1].split("\t")
    assert float(row[5]) >= 85.0, row


def real_trainer(real_subset, real_weights, **variant):
    """The real trainer on 40 training images with the shared weights, clusters fitted."""
    from datasets.data import balanced_subset
    from utils.train.training import ClusTRTrainer, TrainConfig

    train = balanced_subset(load_dataset("imagefolder", str(real_subset), "train"), 40, 0)
    test = balanced_subset(load_dataset("imagefolder", str(real_subset), "test"), 10, 0)
    model = ResNet18(10)
    load_weights(model, str(real_weights))
    cfg = TrainConfig(dataset="imagefolder", K=2, m=2, d=4, L=20, seed=3, **variant)
    trainer = ClusTRTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01), train, test,
                            cfg, torch.device("cpu"))
    trainer.refresh_clusters()
    return trainer


def test_real_actual_trades_adversary_is_the_originals(real_subset, real_weights):
    """The shared network on a real batch: our --actual-trades adversary equals the
    original's rule (normalised units, 0.03 steps, uniform start)."""
    from tests.train.test_variants import (
        EPS,
        a_batch,
        class_probabilities,
        original_trades_adversary,
    )

    trainer = real_trainer(real_subset, real_weights, consistency_lambda=1.0, actual_trades=True)
    # float64: in float32 the two unit systems' rounding flips the sign of near-zero input
    # gradients, and over 10 steps about 10% of the pixels then end elsewhere
    model = trainer.model.eval().double()
    x, _, head = a_batch(trainer)
    x, head = x.double(), head.double()
    with torch.no_grad():
        emb = model(x)
    gen_copy = torch.Generator().set_state(trainer.generator.get_state())
    ours = trainer.extras.adversary(model, head, x, emb, trainer.generator)
    u = torch.empty(x.shape).uniform_(-EPS, EPS, generator=gen_copy)
    theirs = original_trades_adversary(model, head, x, class_probabilities(head, emb), u)
    assert (ours - x).abs().max() > 4 / 255  # it moved
    assert (ours - theirs).abs().max() < 1e-7  # float32 constants; one step is 6e-3


def test_real_free_replays_give_the_sampler_the_originals_losses(real_subset, real_weights,
                                                                  monkeypatch):
    """The shared network, one real batch, M = 2: the sampler receives the updated
    network's Magnet losses on x + the final delta (the original's rule, restated)."""
    from tests.train.test_variants import EPS, spy_free_training
    from utils.train.magnet_loss import magnet_loss

    variant = dict(minibatch_replays=2, consistency_lambda=1.0)
    trainer = real_trainer(real_subset, real_weights, **variant)
    reference = real_trainer(real_subset, real_weights, **variant)
    monkeypatch.setattr(trainer, "steps_per_epoch", lambda: 1)
    seen, recorded = spy_free_training(monkeypatch, trainer)
    trainer.train_epoch()
    x, (indices, losses) = seen[0], recorded[0]
    ids = reference.sampler.assignments[indices]
    classes = reference.head().classes
    model, opt = reference.model.train(), reference.optimizer
    delta = torch.zeros_like(x)
    for _ in range(2):
        delta.requires_grad_(True)
        loss = magnet_loss(model(x + delta), ids, classes, reference.cfg.alpha)[0].mean()
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            delta = (delta + EPS * delta.grad.sign()).clamp(-EPS, EPS)
            delta = torch.max(torch.min(delta, 1 - x), -x)
        opt.step()
    with torch.no_grad():
        expected = magnet_loss(model(x + delta), ids, classes, reference.cfg.alpha)[0]
    assert torch.allclose(losses, expected, rtol=1e-4, atol=1e-4), (losses, expected)
