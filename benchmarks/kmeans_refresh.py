"""The k-means part of the cluster refresh, with and without the one-thread limit.

    python -m benchmarks.kmeans_refresh                # the shared subset and weights
    python -m benchmarks.kmeans_refresh --repeats 7 --threads 2

Embeds the real training images once (eval mode, no augmentation: what the refresh embeds),
then times ``fit_clusters`` (per-class k-means with CIFAR-10's settings, assignments and
sigma^2) alternately with ``threads=1`` (the default) and ``None`` (scikit-learn chooses
its OpenMP and BLAS threads), and checks that both give the same centroids.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from base.errors import UsageError, exit_status
from base.progress import set_quiet
from utils.train import clustering
from utils.train.embeddings import compute_embeddings

from .machine import load_average, machine_info
from .timing import timed
from .workloads import build_model, default_data_dir, real_data, real_data_present

log = logging.getLogger("benchmarks")


def measure(emb: torch.Tensor, labels: torch.Tensor, num_classes: int, K: int, seed: int,
            repeats: int) -> dict:
    """Seconds of ``fit_clusters`` per setting (alternated, after one untimed fit of each)
    and the largest centroid difference between the two."""
    n_init, max_iter = clustering.kmeans_settings("cifar10")
    settings = {"one thread": 1, "scikit-learn's threads": None}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    centers = {}
    for round_ in range(1 + repeats):
        for name, threads in settings.items():
            fit, s = timed(lambda t=threads: clustering.fit_clusters(
                emb, labels, num_classes, K, n_init, max_iter, seed, t), torch.device("cpu"))
            centers[name] = (fit.centers, fit)
            if round_ > 0:
                seconds[name].append(s)
    (a, fa), (b, fb) = centers.values()
    return {"seconds": seconds, "max_centroid_difference": float((a - b).abs().max()),
            "max_float64_difference": float64_difference(emb, labels, num_classes, K, n_init,
                                                         max_iter, seed),
            "same_assignments": bool(torch.equal(fa.assignments, fb.assignments)),
            "same_variance": bool(torch.equal(fa.variance, fb.variance))}


def float64_difference(emb, labels, num_classes, K, n_init, max_iter, seed) -> float:
    """Largest difference between scikit-learn's float64 centroids with and without the
    limit (``fit_clusters`` stores them as float32, where one rounding may differ)."""
    from sklearn.cluster import KMeans

    x = emb.double().numpy()
    worst = 0.0
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten().numpy()
        fits = []
        for threads in (1, None):
            with clustering.threadpool_limits(limits=threads):
                fits.append(KMeans(n_clusters=K, init="k-means++", n_init=n_init,
                                   max_iter=max_iter, random_state=seed)
                            .fit(x[members]).cluster_centers_)
        worst = max(worst, float(abs(fits[0] - fits[1]).max()))
    return worst


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kmeans_refresh",
                                description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with cifar10-subset/ and weights/ (default $CLUSTR_DATA or "
                        "../shared/data)")
    p.add_argument("--train-size", type=int, default=None,
                   help="training images embedded (default: all of the subset)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--seed", type=int, default=111)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def run(args) -> dict:
    data_dir = args.data_dir or default_data_dir()
    if not real_data_present(data_dir):
        raise UsageError(f"no cifar10-subset/ and weights/resnet18_cifar10.pt under {data_dir}")
    if args.repeats < 1:
        raise UsageError("--repeats must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_quiet(True)
    train, _ = real_data(data_dir, args.train_size, 10, args.seed)
    model = build_model(train.num_classes, data_dir / "weights" / "resnet18_cifar10.pt",
                        torch.device("cpu"), args.seed)
    emb = compute_embeddings(model, train.images, 64, torch.device("cpu"))
    load = {"start": load_average()}
    res = measure(emb, train.labels, train.num_classes, args.k, args.seed, args.repeats)
    load["end"] = load_average()
    res.update(images=len(train), load=load, machine=machine_info(torch.device("cpu")))
    return res


def report(res: dict) -> str:
    m = res["machine"]
    lines = [f"k-means of the refresh on {res['images']} real training embeddings, "
             f"{m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} "
             f"({m['torch_threads']} threads); load average "
             + ", ".join(f"{k} {v:.2f}" for k, v in res["load"].items() if v is not None),
             "| setting | min | median | max | repeats |", "|---|---|---|---|---|"]
    for name, s in res["seconds"].items():
        s = sorted(s)
        lines.append(f"| {name} | {s[0]:.3f} s | {s[len(s) // 2]:.3f} s | {s[-1]:.3f} s "
                     f"| {len(s)} |")
    lines.append(f"largest centroid difference: {res['max_float64_difference']:.3g} in "
                 f"float64, {res['max_centroid_difference']:.3g} in the stored float32; "
                 f"assignments {'equal' if res['same_assignments'] else 'DIFFER'}, sigma^2 "
                 f"{'equal' if res['same_variance'] else 'differs'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    return exit_status(lambda: print(report(run(build_parser().parse_args(argv)))))


if __name__ == "__main__":
    os.environ.setdefault("CLUSTR_QUIET", "1")
    sys.exit(main())
