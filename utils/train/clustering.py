"""Per-class k-means over the training embeddings, and the inference variance.

scikit-learn's k-means, per class, with the original's settings (``KMeansSettings``) and one
``random_state`` for every class and refresh (``--kmeans-seed``). A cluster that k-means
leaves with fewer than 2 examples is filled from its class (``fill_small_clusters``), so a
refresh never stops a run. Each fit runs on one thread (``threadpool_limits(1)``): for a few
thousand 512-d points scikit-learn's OpenMP and BLAS teams on every core spend the fit
waiting for one another on a busy machine; the arithmetic, and so every centroid, is the same.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from base.errors import UsageError
from models.classifier import ClusterClassifier
from models.cluster_head import ClusterHead, squared_distances
from utils.train import kmeans_device
from utils.train.embeddings import compute_embeddings

log = logging.getLogger("clustr")


@dataclass
class Clusters:
    centers: torch.Tensor      # (C*K, D) float32
    classes: torch.Tensor      # (C*K,) int64, cluster c*K + i belongs to class c
    assignments: torch.Tensor  # (N,) int64 global cluster id of every training example
    variance: torch.Tensor     # (C*K,) float32, sigma^2 (one value, repeated per cluster)


@dataclass(frozen=True)
class KMeansSettings:
    """How every per-class k-means fit of a run goes: the same for every class and refresh."""

    K: int                                # clusters per class
    n_init: int                           # k-means++ starts
    max_iter: int                         # Lloyd iterations of each start
    seed: int = 1                         # random_state of every fit (--kmeans-seed)
    device: torch.device | None = None    # fit there (kmeans_device); None: scikit-learn

    @classmethod
    def for_dataset(cls, dataset: str, K: int, seed: int = 1,
                    device: torch.device | None = None) -> KMeansSettings:
        """The original's starts and iterations: 1 and 20 for CIFAR-10, 10 and 40 otherwise."""
        n_init, max_iter = (1, 20) if dataset in ("cifar10", "imagefolder") else (10, 40)
        return cls(K, n_init, max_iter, seed, device)


def check_class_sizes(labels: torch.Tensor, class_names: list[str], K: int) -> None:
    """Refuse a --k that k-means cannot serve, before the costly embedding pass: every class
    needs K clusters of at least 2 examples (the Magnet loss's minimum), so 2*K examples."""
    counts = torch.bincount(labels.cpu(), minlength=len(class_names))
    c = int(counts.argmin())
    n = int(counts[c])
    if n < K:
        raise UsageError(f"--k {K} is larger than the {n} training examples of class "
                         f"{class_names[c]!r}: lower --k or use more data")
    if n < 2 * K:
        raise UsageError(f"class {class_names[c]!r} has {n} training examples, too few for "
                         f"--k {K} clusters of at least 2 (needs {2 * K}): lower --k or use "
                         f"more data")


def fit_clusters(emb: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 kmeans: KMeansSettings) -> Clusters:
    """k-means on each class's embeddings separately: scikit-learn's on one thread, or
    ``utils.train.kmeans_device``'s on ``kmeans.device`` when given."""
    from sklearn.cluster import KMeans

    K = kmeans.K
    emb = emb.detach().float().cpu()
    if not torch.isfinite(emb).all():
        raise FloatingPointError("the network gives non-finite embeddings, so k-means cannot "
                                 "run")
    labels = labels.cpu()
    x = emb.numpy().astype(np.float64)
    centers = torch.empty(num_classes * K, emb.shape[1])
    for c in range(num_classes):  # k-means is per class by definition
        members = (labels == c).nonzero().flatten().numpy()
        if len(members) < K:
            raise UsageError(f"class {c} has {len(members)} training examples, fewer than "
                             f"--k {K}: lower --k or use more data")
        if kmeans.device is not None:
            centers[c * K:(c + 1) * K] = kmeans_device.kmeans(
                emb[members].to(kmeans.device), K, kmeans.n_init, kmeans.max_iter,
                kmeans.seed).cpu()
            continue
        with threadpool_limits(limits=1):  # no oversubscription (module doc)
            km = KMeans(n_clusters=K, init="k-means++", n_init=kmeans.n_init,
                        max_iter=kmeans.max_iter, random_state=kmeans.seed).fit(x[members])
        centers[c * K:(c + 1) * K] = torch.from_numpy(km.cluster_centers_).float()
    classes = torch.arange(num_classes).repeat_interleave(K)
    assignments = nearest_own_cluster(emb, labels, centers, classes)
    assignments = fill_small_clusters(emb, labels, centers, classes, assignments)
    return Clusters(centers, classes, assignments, variance_of(emb, centers, assignments))


def nearest_own_cluster(emb: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                        classes: torch.Tensor) -> torch.Tensor:
    """The global id (N,) of every example's nearest centroid of its own class."""
    sq_dist = squared_distances(emb, centers)
    sq_dist = sq_dist.masked_fill(classes[None, :] != labels[:, None], float("inf"))
    return sq_dist.argmin(1)


def variance_of(emb: torch.Tensor, centers: torch.Tensor,
                assignments: torch.Tensor) -> torch.Tensor:
    """sigma^2 = sum of squared distances to the assigned centroids / (N - 1), (C*K,)."""
    best = (emb - centers[assignments]).pow(2).sum(1)  # exact, not the expanded form
    return (best.sum() / (len(emb) - 1)).expand(len(centers)).clone()


def fill_small_clusters(emb: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                        classes: torch.Tensor, assignments: torch.Tensor,
                        minimum: int = 2) -> torch.Tensor:
    """Give every cluster ``minimum`` examples: a smaller one takes, one at a time, the
    example of its class nearest to its centroid among that class's clusters holding more
    than ``minimum``. Returns the (possibly) changed assignments (N,); warns when it moves
    any. Raises UsageError only where a class has fewer than minimum*K examples."""
    sizes = torch.bincount(assignments, minlength=len(centers))
    small = (sizes < minimum).nonzero().flatten().tolist()
    if not small:
        return assignments
    assignments = assignments.clone()
    moved = 0
    for c in small:
        cls = int(classes[c])
        while int(sizes[c]) < minimum:
            donors = (labels == cls) & (sizes[assignments] > minimum)  # (N,)
            if not donors.any():
                raise UsageError(f"class {cls} has too few training examples for every one "
                                 f"of its clusters to hold {minimum}: lower --k or use more "
                                 f"training data")
            cand = donors.nonzero().flatten()
            dist = (emb[cand] - centers[c]).pow(2).sum(1)
            pick = int(cand[dist.argmin()])
            sizes[assignments[pick]] -= 1
            assignments[pick] = c
            sizes[c] += 1
            moved += 1
    log.warning("k-means left cluster(s) %s with fewer than %d examples: moved %d example(s) "
                "of the same class, nearest to those centroids, into them", small, minimum,
                moved)
    return assignments


def fit_cluster_classifier(backbone, train, kmeans: KMeansSettings, L: int,
                           normalize: bool = True, batch: int = 256, device="cpu"):
    """The cluster classifier of a trained ResNet18, with no further training: the clusters
    and sigma^2 of one eval-mode pass over the un-augmented training set, as each epoch's
    refresh makes them (the one place that builds "pretrained network + k-means clusters")."""
    emb = compute_embeddings(backbone, train.images, batch, torch.device(device),
                             desc="embed train")  # (N, 512)
    c = fit_clusters(emb, train.labels, train.num_classes, kmeans)
    head = ClusterHead(c.centers, c.classes, c.variance, train.num_classes, L, normalize)
    return ClusterClassifier(backbone, head)
