"""The Magnet loss (Rippel et al., ICLR 2016), stochastic batch form and full-set form.

For an example n with own cluster o(n), cluster variance sigma^2 and margin alpha,

    l_n = max(0, -log( exp(-||r_n - mu_o||^2 / 2sigma^2 - alpha)
                       / (sum_{c: class(c) != class(n)} exp(-||r_n - mu_c||^2 / 2sigma^2) + eps)
                       + eps ))

Both forms compute the ratio in log space, so it neither overflows nor turns into 0/0 when
every distance is large; the value equals the formula above (eps = 1e-8 as the original).

On a GPU a training step is a few milliseconds and the loss's kernels are small, so the batch
form waits for nothing: no host-to-device copy (a constant made on the host would make the
host wait for the forward pass), no data-dependent shape, and one matrix product where
scatter-adds would need atomics.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.cluster_head import squared_distances

EPS = 1e-8
LOG_EPS = math.log(EPS)


def magnet_from_scores(log_s: torch.Tensor, log_num: torch.Tensor,
                       blocked: torch.Tensor) -> torch.Tensor:
    """Per-example loss (N,) from the log scores -d^2/2sigma^2 (N, M) of M cluster means,
    the log numerator (N,) (alpha subtracted) and ``blocked`` (N, M), the clusters left out
    of the denominator (the example's own class, clusters absent from the batch)."""
    # log(sum_c exp(log_s) + eps) as one logsumexp: eps is one more column, exp(LOG_EPS)
    log_den = torch.logsumexp(F.pad(log_s.masked_fill(blocked, -math.inf), (0, 1),
                                    value=LOG_EPS), 1)
    return torch.relu(-torch.log((log_num - log_den).exp() + EPS))


def magnet_loss(emb: torch.Tensor, clusters: torch.Tensor, cluster_classes: torch.Tensor,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic Magnet loss of a batch.

    emb (N, D); clusters (N,) global cluster ids; cluster_classes (C*K,) class of every
    cluster. Returns the per-example losses (N,) and the batch variance sigma^2 (not detached:
    the original back-propagates through it).
    """
    # Every cluster gets a column and the clusters absent from the batch are left out of the
    # denominator: the same loss as over the batch's M clusters alone, with no data-dependent
    # shapes (torch.unique would wait for the GPU at every step).
    cluster_classes = cluster_classes.to(emb.device)
    members = (clusters[:, None] == torch.arange(len(cluster_classes), device=emb.device)
               ).to(emb.dtype)  # (N, C*K) one-hot
    counts = members.sum(0)  # (C*K,)
    means = (members.t() @ emb) / counts.clamp_min(1.0)[:, None]  # (C*K, D); 0 if absent
    # each example's own mean by the one-hot product (exact, and its backward is a product
    # too, where indexing's would sort the indices)
    own_dist = (emb - members @ means).pow(2).sum(1)  # (N,) exact, not the expanded form
    variance = own_dist.sum() / (len(emb) - 1)
    scale = -2.0 * variance
    blocked = (counts == 0)[None, :] | (cluster_classes[None, :]
                                        == cluster_classes[clusters][:, None])
    log_s = squared_distances(emb, means) / scale  # (N, C*K); the own column is blocked
    return magnet_from_scores(log_s, own_dist / scale - alpha, blocked), variance


def magnet_loss_full(emb: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                     cluster_classes: torch.Tensor, variance: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """Per-example Magnet loss (N,) against every centroid, as ClusTR reports it.

    The own cluster is the nearest centroid of the example's class; only other-class clusters
    enter the denominator (the original also counted same-class clusters, as exp(0) = 1).
    ``variance`` is a scalar or one value per cluster (C*K,).
    """
    sq_dist = squared_distances(emb, centers)  # (N, C*K)
    same = cluster_classes[None, :] == labels[:, None]
    own = sq_dist.masked_fill(~same, float("inf")).argmin(1)
    log_s = sq_dist / (-2.0 * variance)
    return magnet_from_scores(log_s, log_s.gather(1, own[:, None]).squeeze(1) - alpha, same)
