"""The Magnet loss (Rippel et al., ICLR 2016), stochastic batch form and full-set form.

For an example n with own cluster o(n), cluster variance sigma^2 and margin alpha,

    l_n = max(0, -log( exp(-||r_n - mu_o||^2 / 2sigma^2 - alpha)
                       / (sum_{c: class(c) != class(n)} exp(-||r_n - mu_c||^2 / 2sigma^2) + eps)
                       + eps ))

Both forms compute the ratio in log space, so it neither overflows nor turns into 0/0 when
every distance is large; the value equals the formula above (eps = 1e-8 as the original).
"""
from __future__ import annotations

import math

import torch

from models.cluster_head import squared_distances

EPS = 1e-8


def magnet_from_distances(sq_dist: torch.Tensor, own: torch.Tensor, other_class: torch.Tensor,
                          variance: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-example loss (N,) from squared distances (N, M) to M cluster means.

    ``own`` (N,) indexes each example's own cluster, ``other_class`` (N, M) marks the clusters
    of other classes (the denominator), ``variance`` is a scalar or one value per cluster (M,).
    """
    log_s = -sq_dist / (2.0 * variance)  # (N, M)
    log_num = log_s.gather(1, own[:, None]).squeeze(1) - alpha
    neg_inf = torch.finfo(log_s.dtype).min
    log_den = torch.logaddexp(torch.logsumexp(log_s.masked_fill(~other_class, neg_inf), 1),
                              log_s.new_tensor(math.log(EPS)))
    ratio = (log_num - log_den).exp()
    return torch.relu(-torch.log(ratio + EPS))


def magnet_loss(emb: torch.Tensor, clusters: torch.Tensor, cluster_classes: torch.Tensor,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic Magnet loss of a batch.

    emb (N, D); clusters (N,) global cluster ids; cluster_classes (C*K,) class of every
    cluster. Returns the per-example losses (N,) and the batch variance sigma^2 (not detached:
    the original back-propagates through it).
    """
    # Every cluster gets a column and the clusters absent from the batch are masked out of
    # the denominator: the same loss as over the batch's M clusters alone, with no data-
    # dependent shapes (torch.unique would wait for the GPU at every step).
    cluster_classes = cluster_classes.to(emb.device)
    total = len(cluster_classes)
    counts = emb.new_zeros(total).index_add_(0, clusters, emb.new_ones(len(emb)))  # (C*K,)
    sums = emb.new_zeros(total, emb.shape[1]).index_add_(0, clusters, emb)
    means = sums / counts.clamp_min(1.0)[:, None]  # (C*K, D); 0 for an absent cluster
    sq_dist = squared_distances(emb, means)  # (N, C*K)
    own_dist = (emb - means[clusters]).pow(2).sum(1)
    variance = own_dist.sum() / (len(emb) - 1)
    sq_dist = sq_dist.scatter(1, clusters[:, None], own_dist[:, None])  # exact own distance
    other = (counts > 0)[None, :] & (cluster_classes[None, :] != cluster_classes[clusters][:, None])
    return magnet_from_distances(sq_dist, clusters, other, variance, alpha), variance


def magnet_loss_full(emb: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                     cluster_classes: torch.Tensor, variance: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """Per-example Magnet loss (N,) against every centroid, as ClusTR reports it.

    The own cluster is the nearest centroid of the example's class; only other-class clusters
    enter the denominator (the original also counted same-class clusters, as exp(0) = 1).
    """
    sq_dist = squared_distances(emb, centers)  # (N, C*K)
    same = cluster_classes[None, :] == labels[:, None]
    own = sq_dist.masked_fill(~same, float("inf")).argmin(1)
    return magnet_from_distances(sq_dist, own, ~same, variance, alpha)
