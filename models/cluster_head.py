"""Nearest-cluster inference: the cluster state and the scores ClusTR classifies with.

Cluster ``c*K + i`` belongs to class ``c``. For an embedding r and cluster c the *paper's*
score is s_c = exp(-||r - mu_c||^2 / 2 sigma_c^2); only the L highest-scoring clusters count
(all of them with ``normalize=False``, the original's ``--not-normalize``) and a class scores
the sum of its counted clusters. Those scores are bounded and vanish far from every cluster,
which is why the paper's cross-entropy on them masks gradients. ``logits`` is the same rule in
log space (per-class log-sum-exp of -d^2 / 2 sigma^2): same arg-max, finite everywhere.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ClusterHead(nn.Module):
    """Holds centroids (C*K, D), their classes (C*K,) and variances (C*K,) as buffers."""

    def __init__(self, centers: torch.Tensor, classes: torch.Tensor, variance: torch.Tensor,
                 num_classes: int, L: int = 10, normalize: bool = True):
        super().__init__()
        self.register_buffer("centers", centers.detach().float().clone())
        self.register_buffer("classes", classes.detach().long().clone())
        self.register_buffer("variance", variance.detach().float().reshape(-1).clone())
        self.num_classes = int(num_classes)
        self.L = int(L)
        self.normalize = bool(normalize)

    @property
    def num_clusters(self) -> int:
        return self.centers.shape[0]

    def extra_repr(self) -> str:
        return (f"clusters={self.num_clusters}, classes={self.num_classes}, L={self.L}, "
                f"normalize={self.normalize}")

    def cluster_log_scores(self, emb: torch.Tensor) -> torch.Tensor:
        """-||r - mu_c||^2 / 2 sigma_c^2 for every cluster: (N, C*K)."""
        sq_dist = squared_distances(emb, self.centers)
        return -sq_dist / (2.0 * self.variance)

    def counted_mask(self, log_scores: torch.Tensor) -> torch.Tensor:
        """(N, C*K) boolean mask of the clusters that vote: the L nearest, or all."""
        if not self.normalize or self.L >= log_scores.shape[1]:
            return torch.ones_like(log_scores, dtype=torch.bool)
        top = log_scores.topk(self.L, dim=1).indices
        return torch.zeros_like(log_scores, dtype=torch.bool).scatter_(1, top, True)

    def paper_scores(self, emb: torch.Tensor) -> torch.Tensor:
        """The original's unnormalised class scores: sums of exp(-d^2/2sigma^2), (N, C)."""
        log_scores = self.cluster_log_scores(emb)
        scores = log_scores.exp() * self.counted_mask(log_scores)
        out = scores.new_zeros(scores.shape[0], self.num_classes)
        return out.index_add_(1, self.classes, scores)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """Per-class log-sum-exp of -d^2/2sigma^2 over the counted clusters, (N, C). A class
        none of whose clusters is counted gets its nearest cluster's -d^2/2sigma^2, which is
        finite and no larger than any counted class's value, so the arg-max is the paper's
        while every class keeps a gradient. (One exception: far from every cluster,
        d^2/2sigma^2 > ~100, all the paper's float32 scores underflow to 0 and its arg-max
        degenerates to class 0, while these logits still rank the classes by distance.)"""
        log_scores = self.cluster_log_scores(emb)
        mask = self.counted_mask(log_scores)
        n, c = log_scores.shape[0], self.num_classes
        index = self.classes.expand(n, -1)
        neg_inf = torch.finfo(log_scores.dtype).min
        best_any = log_scores.new_full((n, c), neg_inf).scatter_reduce(
            1, index, log_scores, reduce="amax")
        counted = log_scores.masked_fill(~mask, neg_inf)
        best_counted = log_scores.new_full((n, c), neg_inf).scatter_reduce(
            1, index, counted, reduce="amax")
        # counted clusters per class (a float sum: CUDA has no scatter kernels for bool)
        has_counted = log_scores.new_zeros(n, c).index_add_(1, self.classes,
                                                            mask.to(log_scores.dtype)) > 0
        # log-sum-exp per class, shifted by the class's best counted value for stability
        shift = torch.where(has_counted, best_counted, best_any)
        rel = (log_scores - shift.gather(1, index)).exp() * mask
        sums = rel.new_zeros(n, c).index_add_(1, self.classes, rel)
        return torch.where(has_counted, shift + sums.clamp_min(1e-30).log(), best_any)

    def predict(self, emb: torch.Tensor) -> torch.Tensor:
        """The paper's rule: arg-max of the class scores (their normalisation by the sum
        does not change it), (N,)."""
        return self.paper_scores(emb).argmax(1)


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 for (N, D) and (M, D), (N, M), never negative."""
    return (a.pow(2).sum(1, keepdim=True) - 2.0 * a @ b.t() + b.pow(2).sum(1)).clamp_min(0.0)
