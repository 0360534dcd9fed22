"""The seed's command end to end: 30 ClusTR epochs on 50,000 + 10,000 CIFAR-sized images,
then the paper's default sweep (20 steps x 10 restarts at 4 eps on the 10,000 test images).
Measured whole on CUDA, on synthetic images of that size (on a CPU it would take days)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from models.classifier import ClusterClassifier
from utils.attacks.batch_size import attack_batch
from utils.attacks.pgd import PGD
from utils.attacks.sweep import AttackContext
from utils.eval.evaluation import run_sweep

from .measures import timed
from .workloads import Setup, make_workload, synthetic_data

log = logging.getLogger("benchmarks")


@dataclass(frozen=True)
class SeedCommand:
    train_images: int = 50_000
    test_images: int = 10_000
    epochs: int = 30
    iterations: int = 20
    restarts: int = 10
    m: int = 12
    d: int = 20
    K: int = 2


def measure(setup: Setup, seed: SeedCommand = SeedCommand()) -> dict:
    """The seed's command run whole on ``setup``'s device, seed, autocast and k-means (its
    batch is the seed's): seconds of the training (with the initial cluster refresh) and of
    the sweep, with the attack batch ``utils.attacks.batch_size`` picks."""
    setup, device = replace(setup, m=seed.m, d=seed.d, K=seed.K), setup.device
    train = synthetic_data(seed.train_images, setup.seed)
    test = synthetic_data(seed.test_images, setup.seed + 1)
    epochs = []

    def training_run():
        w = make_workload(train, test, None, setup)
        for epoch in range(seed.epochs):
            epochs.append(timed(w.trainer.run_epoch, device)[1])
            log.info("seed command: epoch %d/%d %.1fs", epoch + 1, seed.epochs, epochs[-1])
        return w

    w, training = timed(training_run, device)
    model = ClusterClassifier(w.trainer.model, w.trainer.head()).to(device)
    batch = attack_batch(None, model, device, seed.test_images)
    result, sweep = timed(lambda: run_sweep(
        AttackContext(model, test, device, batch, setup.seed),
        PGD(iterations=seed.iterations, restarts=seed.restarts), 64), device)
    return {"kind": "measured", "epoch_samples": epochs, "training_s": training,
            "sweep_s": sweep, "total_s": training + sweep, "attack_batch": batch,
            "clean_acc": result.clean_acc, "seed": vars(seed)}
