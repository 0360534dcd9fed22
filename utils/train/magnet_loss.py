"""The Magnet loss (Rippel et al., ICLR 2016), stochastic batch form and full-set form.

For an example n with own cluster o(n), cluster variance sigma^2 and margin alpha,

    l_n = max(0, -log( exp(-||r_n - mu_o||^2 / 2sigma^2 - alpha)
                       / (sum_{c: class(c) != class(n)} exp(-||r_n - mu_c||^2 / 2sigma^2) + eps)
                       + eps ))

Both forms compute the ratio in log space, so it neither overflows nor turns into 0/0 when
every distance is large; the value equals the formula above (eps = 1e-8 as the original).

On a GPU a training step is a few milliseconds, so the batch form waits for nothing: no
host-to-device copy (it would wait for the forward pass), no data-dependent shape, one matrix
product where scatter-adds would need atomics, and a gradient written out (``_BatchMagnet``)
instead of one autograd node per operation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.cluster_head import squared_distances

EPS = 1e-8
LOG_EPS = math.log(EPS)


def magnet_loss(emb: torch.Tensor, clusters: torch.Tensor, cluster_classes: torch.Tensor,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic Magnet loss of a batch. emb (N, D); clusters (N,) global cluster ids;
    cluster_classes (C*K,) class of every cluster. Returns the per-example losses (N,) and
    the batch variance sigma^2 (not detached: the original back-propagates through it)."""
    # Every cluster gets a column and the clusters absent from the batch are left out of the
    # denominator: the same loss as over the batch's M clusters alone, with no data-dependent
    # shapes (torch.unique would wait for the GPU at every step).
    cluster_classes = cluster_classes.to(emb.device)
    members = (clusters[:, None] == torch.arange(len(cluster_classes), device=emb.device)
               ).to(emb.dtype)  # (N, C*K) one-hot
    counts = members.sum(0)  # (C*K,)
    blocked = (counts == 0)[None, :] | (cluster_classes[None, :]
                                        == cluster_classes[clusters][:, None])
    return _BatchMagnet.apply(emb, members, counts, blocked, alpha)


class _BatchMagnet(torch.autograd.Function):
    """The batch form's arithmetic with its gradient written out: one autograd node whose
    backward is a few dozen kernels, where autograd recorded one node per operation."""

    @staticmethod
    def forward(ctx, emb, members, counts, blocked, alpha):
        means = (members.t() @ emb) / counts.clamp_min(1.0)[:, None]  # (C*K, D); 0 if absent
        # each example's own mean by the one-hot product: exact, and so is its distance
        own_diff = emb - members @ means  # (N, D)
        own_dist = own_diff.pow(2).sum(1)
        variance = own_dist.sum() / (len(emb) - 1)
        scale = -2.0 * variance
        sq_dist = squared_distances(emb, means)  # (N, C*K); the own column is blocked
        log_s = (sq_dist / scale).masked_fill(blocked, -math.inf)
        log_den = torch.logsumexp(F.pad(log_s, (0, 1), value=LOG_EPS), 1)  # log(sum + eps)
        ratio = (own_dist / scale - alpha - log_den).exp()
        loss = torch.relu(-torch.log(ratio + EPS))
        ctx.save_for_backward(emb, members, counts, means, own_diff, own_dist, scale, sq_dist,
                              log_s, log_den, ratio, loss)
        return loss, variance

    @staticmethod
    def backward(ctx, g_loss, g_variance):
        (emb, members, counts, means, own_diff, own_dist, scale, sq_dist, log_s, log_den,
         ratio, loss) = ctx.saved_tensors
        # through relu(-log(ratio + eps)) to z = log numerator - log denominator
        g_z = -(g_loss * ratio / (ratio + EPS)) * (loss > 0)  # (N,)
        # the denominator's softmax weights (0 where blocked); log_s = sq_dist / scale
        g_log_s = -g_z[:, None] * (log_s - log_den[:, None]).exp()  # (N, C*K)
        g_scale = -((g_log_s * sq_dist).sum() + (g_z * own_dist).sum()) / scale ** 2
        g_sq = g_log_s / scale * (sq_dist > 0)  # through clamp_min(0) where it was > 0
        # scale = -2 sigma^2, sigma^2 = sum(own_dist) / (N - 1)
        g_own = g_z / scale + (g_variance - 2.0 * g_scale) / (len(emb) - 1)
        g_own_diff = 2.0 * g_own[:, None] * own_diff  # (N, D)
        # sq_dist = |e|^2 - 2 e.mu + |mu|^2, own_diff = e - members @ mu
        g_emb = g_own_diff + 2.0 * (g_sq.sum(1, keepdim=True) * emb - g_sq @ means)
        g_means = 2.0 * (g_sq.sum(0)[:, None] * means - g_sq.t() @ emb) - members.t() @ g_own_diff
        # means = members^T emb / counts
        g_emb = g_emb + members @ (g_means / counts.clamp_min(1.0)[:, None])
        return g_emb, None, None, None, None


def magnet_loss_full(emb: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                     cluster_classes: torch.Tensor, variance: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """Per-example Magnet loss (N,) against every centroid, as ClusTR reports it. The own
    cluster is the nearest centroid of the example's class; only other-class clusters enter
    the denominator (the original also counted same-class clusters, as exp(0) = 1).
    ``variance`` is a scalar or one value per cluster (C*K,)."""
    sq_dist = squared_distances(emb, centers)  # (N, C*K)
    same = cluster_classes[None, :] == labels[:, None]
    own = sq_dist.masked_fill(~same, float("inf")).argmin(1)
    log_s = sq_dist / (-2.0 * variance)
    log_num = log_s.gather(1, own[:, None]).squeeze(1) - alpha
    # log(sum_c exp(log_s) + eps) as one logsumexp: eps is one more column, exp(LOG_EPS)
    log_den = torch.logsumexp(F.pad(log_s.masked_fill(same, -math.inf), (0, 1), value=LOG_EPS), 1)
    return torch.relu(-torch.log((log_num - log_den).exp() + EPS))
