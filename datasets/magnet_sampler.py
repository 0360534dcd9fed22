"""The Magnet loss batch sampler: a seed cluster, its nearest impostors, d examples each.

State, refreshed by the training loop once per epoch: ``assignments`` (N,) each example's
global cluster id (class*K + i), ``centers`` (C*K, D) for finding impostors, and ``losses``
(N,) each example's last loss, NaN until it has one.

The seed cluster is drawn with probability proportional to the mean known loss of its
examples. Before any loss is known the draw is uniform; a cluster none of whose examples has
a loss yet gets the mean of the known cluster losses, so it is neither starved nor favoured.
Each cluster's sum and count of known losses are kept up to date in ``record_losses``
(O(batch) per step, instead of scanning all N examples) and recounted from scratch whenever
the assignments or the losses are replaced.
"""
from __future__ import annotations

import torch


class MagnetSampler:
    def __init__(self, labels: torch.Tensor, num_classes: int, K: int, m: int, d: int):
        self.labels = labels.cpu()
        self.num_classes, self.K, self.m, self.d = num_classes, K, m, d
        self.cluster_classes = torch.arange(num_classes).repeat_interleave(K)  # (C*K,)
        self.losses = torch.full((len(labels),), float("nan"))
        self.assignments = None
        self.centers = None

    @property
    def num_clusters(self) -> int:
        return self.num_classes * self.K

    def steps_per_epoch(self, world_size: int = 1) -> int:
        """One pass over the training set: each of ``world_size`` processes draws its own
        m*d batch per step, so the effective batch is world_size*m*d."""
        return max(1, len(self.labels) // (world_size * self.m * self.d))

    def update_clusters(self, assignments: torch.Tensor, centers: torch.Tensor) -> None:
        """Take new cluster assignments (N,) and centroids (C*K, D)."""
        self.assignments = assignments.cpu().long()
        self.centers = centers.detach().cpu().float()
        # examples grouped by cluster: members of cluster c are order[start[c]:start[c+1]]
        self._order = self.assignments.argsort(stable=True)
        self._counts = counts = torch.bincount(self.assignments, minlength=self.num_clusters)
        self._start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        # nearest other-class centroids of every cluster, computed once per refresh
        dist = torch.cdist(self.centers, self.centers)
        same = self.cluster_classes[:, None] == self.cluster_classes[None, :]
        impostors = dist.masked_fill(same, float("inf")).argsort(1)[:, : self.m - 1]
        # the same as Python lists, read at every step without a tensor operation
        self._impostors, self._count_list = impostors.tolist(), counts.tolist()
        self._start_list = self._start.tolist()
        self._recount_losses()

    def _recount_losses(self) -> None:
        """Per-cluster sum (float64, so that step updates do not drift) and count of the
        known losses, from scratch."""
        known = ~self.losses.isnan()
        a = self.assignments[known]
        self._loss_sum = torch.zeros(self.num_clusters, dtype=torch.float64).index_add_(
            0, a, self.losses[known].double())
        self._loss_count = torch.bincount(a, minlength=self.num_clusters)

    def record_losses(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Store the per-example losses (B,) of the examples ``indices`` (B,). An example
        listed twice (drawn by two processes in the same step) keeps its last loss, so every
        process, given the same gathered lists, holds the same state."""
        indices = indices.cpu()
        new = losses.detach().float().cpu()
        if len(indices.unique()) != len(indices):
            pos = torch.arange(len(indices))
            last = torch.full((len(self.losses),), -1, dtype=torch.long).scatter_reduce(
                0, indices, pos, reduce="amax")
            keep = last[indices] == pos
            indices, new = indices[keep], new[keep]
        if self.assignments is not None:
            old = self.losses[indices]
            a = self.assignments[indices]
            old_known, new_known = ~old.isnan(), ~new.isnan()
            delta = (torch.where(new_known, new, 0.0).double()
                     - torch.where(old_known, old, 0.0).double())
            self._loss_sum.index_add_(0, a, delta)
            self._loss_count.index_add_(0, a, new_known.long() - old_known.long())
        self.losses[indices] = new

    def cluster_weights(self) -> torch.Tensor:
        """Seed-cluster probabilities (C*K,), proportional to each cluster's mean loss."""
        count = self._loss_count
        has = count > 0
        if not has.any():
            return torch.full((self.num_clusters,), 1.0 / self.num_clusters)
        total = self._loss_sum
        mean = torch.where(has, total / count.clamp_min(1), (total[has] / count[has]).mean())
        mean = mean.float() * (self._counts > 0)  # an empty cluster is never the seed
        if mean.sum() <= 0:
            mean = (self._counts > 0).float()
        return mean / mean.sum()

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: example indices (<= m*d,) and their global cluster ids."""
        seed = int(torch.multinomial(self.cluster_weights(), 1, generator=generator))
        clusters = [seed, *self._impostors[seed]]  # m clusters, never the data set
        picked, sizes = [], []
        for c in clusters:  # the generator draws what it always drew, in the same order
            take = torch.randperm(self._count_list[c], generator=generator)[: self.d]
            picked.append(take + self._start_list[c])
            sizes.append(len(take))
        ids = torch.tensor(clusters).repeat_interleave(torch.tensor(sizes))
        return self._order[torch.cat(picked)], ids

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.losses = state["losses"].clone().float()
        if self.assignments is not None:
            self._recount_losses()
