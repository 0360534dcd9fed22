"""The measurements, each a plain dict for the report and the JSON: training steps and
epochs (R1, R2, R4, the epoch by phases) and the PGD sweep with and without shrinking (R3);
and the clock they read, which waits for the device."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from statistics import fmean, median

import torch

from base.tensors import to_device
from datasets.data import ImageData, augment
from models.classifier import ClusterClassifier
from utils.attacks.pgd import EPSILONS, PGD
from utils.attacks.sweep import AttackContext
from utils.eval.evaluation import run_sweep
from utils.train.clustering import fit_clusters
from utils.train.magnet_loss import magnet_loss

from .workloads import Workload

log = logging.getLogger("benchmarks")
METHODS = ("clustr", "ce")


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), seconds) with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": median(values), "mean": fmean(values), "max": max(values)}


def median_call(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one untimed call."""
    fn()
    return median(timed(fn, device)[1] for _ in range(repeats))


@contextmanager
def step_times(optimizer: torch.optim.Optimizer, device: torch.device):
    """The wall times of the ``optimizer.step()`` calls made inside the block, stamped by a
    post-step hook so that the loop runs unchanged: a step runs from the previous step's end
    (the first from entering the block) to its own, sampling to bookkeeping included."""
    times: list[float] = []
    sync(device)
    last = time.perf_counter()

    def stamp(*_):
        nonlocal last
        sync(device)
        now = time.perf_counter()
        times.append(now - last)
        last = now

    handle = optimizer.register_step_post_hook(stamp)
    try:
        yield times
    finally:
        handle.remove()


def measure_epochs(w: Workload, repeats: int) -> dict:
    """R1 and R2: ClusTR and CE epochs (whole ``run_epoch`` calls), alternated, one warm-up
    round then ``repeats`` timed. The steps are timed within the same epochs and summed per
    epoch, so that the rest of each epoch (``rest_s``: what is not a step) is known too."""
    runs = dict(zip(METHODS, (w.trainer, w.baseline)))
    epochs, steps, step_sums = ({name: [] for name in METHODS} for _ in range(3))
    for round_ in range(1 + repeats):
        for name, r in runs.items():
            with step_times(r.optimizer, w.device) as times:
                seconds = timed(r.run_epoch, w.device)[1]
            if round_ > 0:
                epochs[name].append(seconds)
                steps[name] += times
                step_sums[name].append(sum(times))
            log.info("%s epoch %s: %.2fs", name, round_ or "warm-up", seconds)
    step = {name: median(times) for name, times in steps.items()}
    epoch = {name: median(times) for name, times in epochs.items()}
    return {"steps_per_epoch": w.trainer.steps_per_epoch(),
            "batch": w.trainer.cfg.m * w.trainer.cfg.d,
            "train_images": len(w.train), "test_images": len(w.test), "repeats": repeats,
            "step_s": step, "step_samples": {n: len(t) for n, t in steps.items()},
            "step_spread": {n: spread(t) for n, t in steps.items()},
            "epoch_s": epoch, "epoch_samples": epochs,
            "epoch_spread": {n: spread(t) for n, t in epochs.items()},
            "step_sum_s": {n: median(t) for n, t in step_sums.items()},
            "rest_s": {n: median(e - s for e, s in zip(epochs[n], step_sums[n]))
                       for n in METHODS},
            "R1": step["clustr"] / step["ce"], "R2": epoch["clustr"] / epoch["ce"]}


def epoch_phases(w: Workload) -> dict:
    """One more ClusTR epoch, phase by phase, with the calls ``ClusTRTrainer.run_epoch``
    makes; k-means is timed again on the refreshed embeddings to split the refresh."""
    t, dev, cfg = w.trainer, w.device, w.trainer.cfg
    phases = {}
    _, phases["training steps"] = timed(t.train_epoch, dev)
    emb, phases["refresh: embedding pass + k-means"] = timed(t.refresh_clusters, dev)
    _, kmeans = timed(lambda: fit_clusters(emb, w.train.labels, w.train.num_classes, t.kmeans),
                      dev)
    _, phases["train metrics (loss, accuracy)"] = timed(
        lambda: t.metrics(emb, w.train.labels), dev)
    test_emb, phases["test embedding pass"] = timed(
        lambda: t.embed(w.test.images, cfg.test_batch, "embed test"), dev)
    _, phases["test metrics"] = timed(lambda: t.metrics(test_emb, w.test.labels), dev)
    ce_test = median(timed(w.baseline.test_accuracy, dev)[1] for _ in range(3))
    return {"phases_s": phases, "kmeans_s": kmeans, "embeddings": emb, "ce_test_s": ce_test}


def parts_residuals(epochs: dict, phases: dict) -> dict:
    """"Epoch - sum of its parts" (docs/benchmarking.md): the median of (epoch - its own
    steps) less the other parts timed apart (ClusTR: refresh, metrics, test pass; CE: test)."""
    other = {"clustr": sum(phases["phases_s"].values()) - phases["phases_s"]["training steps"],
             "ce": phases["ce_test_s"]}
    return {name: {"residual_s": epochs["rest_s"][name] - other[name],
                   "parts_s": epochs["step_sum_s"][name] + other[name],
                   "epoch_s": epochs["epoch_s"][name]} for name in METHODS}


def measure_overheads(w: Workload, embeddings: torch.Tensor, clustr_step: float,
                      repeats: int) -> dict:
    """R4: what a ClusTR step adds to a plain step, part by part on the trainer's live
    state: drawing the batch, the Magnet loss forward and backward, recording the losses.
    The data path shared with CE training (indexing, augmentation, copy) is listed apart."""
    t, dev, cfg = w.trainer, w.device, w.trainer.cfg
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # leaves the trainer's draws alone
    indices, cluster_ids = t.sampler.sample(gen)
    emb, classes = embeddings[indices].to(dev), t.clusters.classes

    def loss_step():
        e = emb.clone().requires_grad_(True)
        per_example, _ = magnet_loss(e, cluster_ids.to(dev), classes.to(dev), cfg.alpha)
        per_example.mean().backward()
        return per_example

    losses = loss_step().detach()
    parts = {"sampler.sample": lambda: t.sampler.sample(gen),
             "magnet_loss forward + backward": loss_step,
             "sampler.record_losses": lambda: t.sampler.record_losses(indices, losses)}
    shared = {"index + augment": lambda: augment(w.train.images[indices], cfg.dataset, gen),
              "to_device": lambda: to_device(w.train.images[indices], dev)}
    parts, shared = ({name: median_call(fn, dev, max(20, 10 * repeats))
                      for name, fn in calls.items()} for calls in (parts, shared))
    added = sum(parts.values())
    return {"parts_s": parts, "shared_s": shared, "added_s": added, "R4": added / clustr_step}


def measure_pgd(model: ClusterClassifier, test: ImageData, device: torch.device, attack: PGD,
                batch: int, repeats: int, seed: int) -> dict:
    """R3: the paper's sweep (``attack`` at each eps of ``EPSILONS``) with the shrinking
    active set and with masking, alternated after a small warm-up of each; the robust
    accuracies and how many predictions differ."""
    def sweep(data, shrink, eps=EPSILONS, iterations=attack.iterations):
        return run_sweep(AttackContext(model, data, device, batch, seed),
                         replace(attack, shrink=shrink, iterations=iterations), batch, eps)

    for shrink in (True, False):
        sweep(test.take(slice(batch)), shrink, eps=EPSILONS[:1], iterations=1)
    seconds, results = {"shrink": [], "mask": []}, {}
    for r in range(repeats):
        for name in seconds:
            results[name], s = timed(lambda: sweep(test, name == "shrink"), device)
            seconds[name].append(s)
            log.info("PGD sweep (%s) %d/%d: %.2fs", name, r + 1, repeats, s)
    a, b = results["shrink"], results["mask"]
    per_eps = [{"eps": x.eps, "acc_shrink": x.accuracy, "acc_mask": y.accuracy,
                "differ": int((x.pred != y.pred).sum())} for x, y in zip(a.per_eps, b.per_eps)]
    med = {name: median(s) for name, s in seconds.items()}
    differ = sum(e["differ"] for e in per_eps)
    return {"images": len(test), "clean_acc": a.clean_acc, "iterations": attack.iterations,
            "restarts": attack.restarts, "eps_count": len(EPSILONS), "batch": batch,
            "attacked": int((a.clean_pred == a.labels).sum()), "seconds": med,
            "samples": seconds, "spread": {n: spread(s) for n, s in seconds.items()},
            "per_eps": per_eps, "differ": differ,
            # at most one example per thousand may differ (float noise between batch shapes)
            "agree": differ * 1000 <= len(test) * len(per_eps), "R3": med["shrink"] / med["mask"]}

