"""The measurements: training steps and epochs (R1, R2, R4, epoch phases) and the PGD sweep
with and without shrinking (R3). Each returns a plain dict for the report and the JSON."""
from __future__ import annotations

import logging

import torch

from base.tensors import to_device
from datasets.data import ImageData, augment
from models.classifier import ClusterClassifier
from utils.attacks.pgd import PGD
from utils.attacks.sweep import AttackContext
from utils.eval.evaluation import run_sweep
from utils.train.clustering import KMeansSettings, fit_cluster_classifier, fit_clusters
from utils.train.embeddings import compute_embeddings, default_embed_batch
from utils.train.magnet_loss import magnet_loss

from .timing import StepClock, median, median_call, spread, timed
from .workloads import Workload, build_model

log = logging.getLogger("benchmarks")


def measure_epochs(w: Workload, repeats: int) -> dict:
    """R1 and R2: ClusTR and CE epochs, alternated, one warm-up round then ``repeats`` timed.

    Epoch times are whole ``run_epoch`` calls (ClusTR: steps, embedding pass, k-means,
    metrics, test pass; CE: steps, test pass). Step times come from the same epochs, and
    each epoch's steps are also summed, so that the rest of the epoch (``rest_s``: what is
    not a step) is known epoch by epoch.
    """
    dev = w.device
    clocks = {"clustr": StepClock(w.trainer.optimizer, dev),
              "ce": StepClock(w.baseline.optimizer, dev)}
    runs = {"clustr": w.trainer.run_epoch, "ce": w.baseline.run_epoch}
    epochs: dict[str, list[float]] = {"clustr": [], "ce": []}
    step_sums: dict[str, list[float]] = {"clustr": [], "ce": []}
    for round_ in range(1 + repeats):
        for name in ("clustr", "ce"):
            clock = clocks[name]
            clock.record = round_ > 0
            before = len(clock.times)
            clock.start()
            _, seconds = timed(runs[name], dev)
            if round_ > 0:
                epochs[name].append(seconds)
                step_sums[name].append(sum(clock.times[before:]))
            log.info("%s epoch %s: %.2fs", name, "warm-up" if round_ == 0 else round_, seconds)
    for clock in clocks.values():
        clock.close()
    step = {name: median(clock.times) for name, clock in clocks.items()}
    epoch = {name: median(times) for name, times in epochs.items()}
    rest = {name: [e - s for e, s in zip(epochs[name], step_sums[name])] for name in epochs}
    return {
        "steps_per_epoch": w.trainer.sampler.steps_per_epoch(),
        "batch": w.trainer.cfg.m * w.trainer.cfg.d,
        "train_images": len(w.train), "test_images": len(w.test),
        "repeats": repeats,
        "step_s": step, "step_samples": {n: len(c.times) for n, c in clocks.items()},
        "step_spread": {n: spread(c.times) for n, c in clocks.items()},
        "epoch_s": epoch, "epoch_samples": epochs,
        "epoch_spread": {n: spread(t) for n, t in epochs.items()},
        "step_sum_s": {n: median(t) for n, t in step_sums.items()},
        "rest_s": {n: median(t) for n, t in rest.items()},
        "R1": step["clustr"] / step["ce"], "R2": epoch["clustr"] / epoch["ce"],
    }


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
    ce_test = [timed(w.baseline.test_accuracy, dev)[1] for _ in range(3)]
    return {"phases_s": phases, "kmeans_s": kmeans, "embeddings": emb,
            "ce_test_s": median(ce_test)}


def parts_residuals(epochs: dict, phases: dict) -> dict:
    """"Epoch - sum of its parts" for both epochs: the median of (epoch - its own steps)
    less the other parts timed apart (ClusTR: refresh, metrics, test pass; CE: test
    pass). Near zero when the parts add up; large when an epoch holds time no part
    shows (waits for the device, allocator, other processes)."""
    other = {"clustr": sum(s for name, s in phases["phases_s"].items()
                           if name != "training steps"),
             "ce": phases["ce_test_s"]}
    return {name: {"residual_s": epochs["rest_s"][name] - other[name],
                   "parts_s": epochs["step_sum_s"][name] + other[name],
                   "epoch_s": epochs["epoch_s"][name]} for name in other}


def measure_overheads(w: Workload, embeddings: torch.Tensor, clustr_step: float,
                      repeats: int) -> dict:
    """R4: what a ClusTR step adds to a plain step, timed part by part on the trainer's live
    state: drawing the batch, the Magnet loss forward and backward, recording the losses.
    The data path shared with CE training (indexing, augmentation, copy) is listed apart."""
    t, dev, cfg = w.trainer, w.device, w.trainer.cfg
    reps = max(20, 10 * repeats)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # leaves the trainer's draws alone
    indices, cluster_ids = t.sampler.sample(gen)
    emb = embeddings[indices].to(dev)
    classes = t.clusters.classes

    def loss_step():
        e = emb.clone().requires_grad_(True)
        per_example, _ = magnet_loss(e, cluster_ids.to(dev), classes.to(dev), cfg.alpha)
        per_example.mean().backward()
        return per_example

    losses = loss_step().detach()
    parts = {
        "sampler.sample": median_call(lambda: t.sampler.sample(gen), dev, reps),
        "magnet_loss forward + backward": median_call(loss_step, dev, reps),
        "sampler.record_losses": median_call(lambda: t.sampler.record_losses(indices, losses),
                                             dev, reps),
    }
    shared = {
        "index + augment": median_call(
            lambda: augment(w.train.images[indices], cfg.dataset, gen), dev, reps),
        "to_device": median_call(lambda: to_device(w.train.images[indices], dev), dev, reps),
    }
    added = sum(parts.values())
    return {"parts_s": parts, "shared_s": shared, "added_s": added,
            "R4": added / clustr_step}


def cluster_classifier(train: ImageData, weights, device: torch.device, K: int, L: int,
                       seed: int) -> ClusterClassifier:
    """The classifier the CLI evaluates: the network, per-class k-means (CIFAR-10 settings)
    on its un-augmented, eval-mode training embeddings, the L nearest clusters voting."""
    backbone = build_model(train.num_classes, weights, device, seed)
    return fit_cluster_classifier(backbone, train, KMeansSettings.for_dataset("cifar10", K, seed),
                                  L, batch=default_embed_batch(device), device=device).to(device)


def measure_pgd(model: ClusterClassifier, test: ImageData, device: torch.device,
                iterations: int, restarts: int, epsilons, batch: int, repeats: int,
                seed: int) -> dict:
    """R3: the paper's PGD sweep with the shrinking active set and with masking, alternated,
    after a small warm-up of each; robust accuracies and per-example disagreements."""
    def sweep(data, shrink, its=iterations, eps=epsilons):
        return run_sweep(AttackContext(model, data, device, batch, seed),
                         PGD(iterations=its, restarts=restarts, shrink=shrink), batch, eps)

    warm = test.take(slice(batch))
    for shrink in (True, False):
        sweep(warm, shrink, its=1, eps=epsilons[:1])
    seconds: dict[str, list[float]] = {"shrink": [], "mask": []}
    results = {}
    for r in range(repeats):
        for name, shrink in (("shrink", True), ("mask", False)):
            results[name], s = timed(lambda sh=shrink: sweep(test, sh), device)
            seconds[name].append(s)
            log.info("PGD sweep (%s) %d/%d: %.2fs", name, r + 1, repeats, s)
    a, b = results["shrink"], results["mask"]
    per_eps = []
    for ra, rb in zip(a.per_eps, b.per_eps):
        per_eps.append({"eps": ra.eps, "acc_shrink": ra.accuracy, "acc_mask": rb.accuracy,
                        "differ": int((ra.pred != rb.pred).sum())})
    med = {name: median(s) for name, s in seconds.items()}
    differ = sum(e["differ"] for e in per_eps)
    return {"images": len(test), "clean_acc": a.clean_acc, "iterations": iterations,
            "restarts": restarts, "eps_count": len(epsilons), "batch": batch,
            "attacked": int((a.clean_pred == a.labels).sum()),
            "seconds": med, "samples": seconds,
            "spread": {name: spread(s) for name, s in seconds.items()}, "per_eps": per_eps,
            "differ": differ,
            # at most one example per thousand may differ (float noise between batch shapes)
            "agree": differ * 1000 <= len(test) * len(per_eps),
            "R3": med["shrink"] / med["mask"]}


def profile_epoch(w: Workload, rows: int = 30) -> str:
    """torch.profiler tables of one ClusTR epoch (``run_epoch``): operators by self time,
    and the same grouped by the Python function that called them (the phases)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if w.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    with profile(activities=activities, with_stack=True) as prof:
        w.trainer.run_epoch()
    ops = prof.key_averages().table(sort_by=sort, row_limit=rows)
    stacks = prof.key_averages(group_by_stack_n=4).table(sort_by=sort, row_limit=rows)
    return (f"# one ClusTR epoch: operators by self time\n{ops}\n\n"
            f"# grouped by the 4 innermost Python frames\n{stacks}\n")


def embedding_batch_sweep(w: Workload, batches, repeats: int, images: int = 512) -> dict:
    """Seconds per image of the no-grad embedding pass (``compute_embeddings``) at several
    batch sizes, alternated, on the first ``images`` training images: the pass's batch size
    (``--embed-batch``, and ``--test-batch`` for the test pass) is a free choice."""
    t, dev = w.trainer, w.device
    x = w.train.images[:images]
    times: dict[int, list[float]] = {b: [] for b in batches}
    for round_ in range(1 + repeats):
        for b in batches:
            _, s = timed(lambda b=b: compute_embeddings(t.model, x, b, dev), dev)
            if round_ > 0:
                times[b].append(s / len(x))
    return {"images": len(x), "per_image_s": {b: median(v) for b, v in times.items()},
            "embed_batch": t.cfg.embed_batch or default_embed_batch(dev),
            "test_batch": t.cfg.test_batch}
