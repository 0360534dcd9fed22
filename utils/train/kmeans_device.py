"""k-means on the training device (opt-in, ``--kmeans-device``): scikit-learn's algorithm.

Greedy k-means++ seeding, Lloyd's iterations, the same n_init and max_iter, the start of
least inertia kept, with nothing that waits for the host. Where it differs from
scikit-learn's (its random starts, no early stop, an empty cluster keeps its centre):
docs/usage.md, "k-means on the device".
"""
from __future__ import annotations

import math

import torch

from models.cluster_head import squared_distances


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k starting centres (k, D) of x (N, D), scikit-learn's greedy k-means++: the first
    uniformly, each further one the candidate of least potential among 2 + int(log k) drawn
    with probability proportional to the squared distance to the nearest centre so far."""
    trials = 2 + int(math.log(k))
    first = torch.randint(len(x), (1,), generator=generator, device=x.device)
    centers = [x[first]]  # (1, D) each
    closest = squared_distances(x, centers[0])[:, 0]  # (N,)
    for _ in range(1, k):
        cumulative = closest.double().cumsum(0)
        draws = torch.rand(trials, generator=generator, device=x.device,
                           dtype=torch.float64) * cumulative[-1]
        candidates = torch.searchsorted(cumulative, draws).clamp_max(len(x) - 1)  # (T,)
        to_candidates = torch.minimum(closest[None, :],
                                      squared_distances(x[candidates], x))  # (T, N)
        best = to_candidates.sum(1).argmin()
        closest = to_candidates[best]
        centers.append(x[candidates[best]][None])
    return torch.cat(centers)


def lloyd(x: torch.Tensor, centers: torch.Tensor, max_iter: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_iter`` Lloyd iterations from ``centers`` (k, D); the centres and their inertia
    (the sum of squared distances of every point to its nearest centre)."""
    arange = torch.arange(len(centers), device=x.device)
    for _ in range(max_iter):
        members = (squared_distances(x, centers).argmin(1)[:, None] == arange).to(x.dtype)
        counts = members.sum(0)[:, None]  # (k, 1)
        means = (members.t() @ x) / counts.clamp_min(1.0)
        centers = torch.where(counts > 0, means, centers)  # an empty cluster stays put
    return centers, squared_distances(x, centers).min(1).values.sum()


def kmeans(x: torch.Tensor, k: int, n_init: int, max_iter: int, seed: int) -> torch.Tensor:
    """Centroids (k, D) of x (N, D) on x's device: n_init k-means++ starts refined by
    max_iter Lloyd iterations each, the start of least inertia kept."""
    generator = torch.Generator(x.device).manual_seed(seed)
    best, best_inertia = None, None
    for _ in range(n_init):
        centers, inertia = lloyd(x, kmeans_plusplus(x, k, generator), max_iter)
        if best is None:
            best, best_inertia = centers, inertia
        else:  # chosen on the device: no wait for the host between starts
            best = torch.where(inertia < best_inertia, centers, best)
            best_inertia = torch.minimum(inertia, best_inertia)
    return best

