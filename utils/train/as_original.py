"""``--as-original``: train exactly as the original code did, to measure what our rules change.

Each section below restores one row of docs/differences.md (its header, or for a one-line
rule a comment in ``adopt``, names the row); ``adopt`` hands them to a trainer once, in place
of the project's own. Random streams are
this project's (one seeded generator), not the original's numpy and torch global ones.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from base.errors import UsageError
from base.tensors import to_device
from datasets.data import augment
from datasets.magnet_sampler import MagnetSampler
from models.cluster_head import squared_distances
from utils.attacks.pgd import project_linf
from utils.train.clustering import nearest_own_cluster, variance_of
from utils.train.consistency import RADIUS
from utils.train.free_adversarial import FreePerturbation
from utils.train.magnet_loss import EPS as LOSS_EPS

EMBED_CHUNKS = 400  # compute_reps(model, data, 400): a DataLoader of batch ceil(N / 400)


def adopt(trainer) -> None:
    """Replace the trainer's own rules with the original's (``--as-original``)."""
    if trainer.dist.enabled:
        raise UsageError("--as-original runs in one process: its train-mode passes depend "
                         "on the batches, which torchrun would split")
    cfg = trainer.cfg
    old = trainer.sampler
    trainer.sampler = OriginalWeightSampler(old.labels, old.num_classes, cfg.K, cfg.m, cfg.d)
    if trainer.free is not None:
        trainer.free = UnclippedFreePerturbation()
    # row "QTRADES / --actual-trades adversary": its leaky loop; the clean side keeps its graph
    trainer.extras.maximise = leaky_train_mode_maximise(summed=cfg.actual_trades)
    trainer.extras.clean_side = lambda t: t
    # row "short batches": the DataLoader's drop_last trains only batches of all m*d rows
    trainer.keep_batch = lambda n: n == cfg.m * cfg.d
    passes = OriginalPasses(trainer)
    trainer.first_clusters, trainer.epoch_end = passes.first_clusters, passes.epoch_end


# -- row "passes in train mode" ---------------------------------------------------------------
class OriginalPasses:
    """The original's passes over the data sets, around the Magnet steps of one trainer: the
    first k-means and sigma^2 passes in train mode; after each epoch's last step the k-means
    refresh in eval mode, then the sigma^2 and training-loss pass and the test-loss pass in
    train mode (test images update BatchNorm's running statistics), then the accuracies in
    eval mode; training images augmented in every pass."""

    def __init__(self, trainer):
        self.t = trainer

    @torch.no_grad()
    def _embed(self, data, train_mode: bool, augmented: bool) -> torch.Tensor:
        """Embeddings (N, 512) on the CPU in the data set's order, computed in batches of
        ceil(N/400) in the order its files were stored in (``stored_rank``): the original
        reads CIFAR-10 in its official order, in which a train-mode batch mixes classes, and
        the shared image folder's file names keep that order (batch and row)."""
        t = self.t
        order = data.stored_rank.argsort()
        images = data.images[order]
        batch = max(1, math.ceil(len(images) / EMBED_CHUNKS))
        was_training, out = t.model.training, []
        t.model.train(train_mode)
        try:
            for start in range(0, len(images), batch):
                x = images[start:start + batch]
                if augmented:  # the original's training transform
                    x = augment(x, t.cfg.dataset, t.generator)
                out.append(t.model(to_device(x, t.device)).float().cpu())
        finally:
            t.model.train(was_training)
        return torch.cat(out)[order.argsort()]  # back to the data set's order

    def _variance_and_loss(self) -> float:
        """sigma^2 from a train-mode pass over the augmented training set (the original's
        ``compute_real_losses(..., compute_variance=True)``), and that pass's loss."""
        t, c = self.t, self.t.clusters
        emb = self._embed(t.train, train_mode=True, augmented=True)
        variance = variance_of(emb, c.centers,
                               nearest_own_cluster(emb, t.train.labels, c.centers, c.classes))
        t.clusters = replace(c, variance=variance)
        return self._loss(emb, t.train.labels)

    def _loss(self, emb: torch.Tensor, labels: torch.Tensor) -> float:
        c = self.t.clusters
        return loss_with_same_class_clusters(emb, labels, c.centers, c.classes, c.variance,
                                             self.t.cfg.alpha).mean().item()

    def first_clusters(self) -> None:
        """Before training: k-means on a train-mode pass, sigma^2 from another."""
        self.t.refresh_clusters(self._embed(self.t.train, train_mode=True, augmented=True))
        self._variance_and_loss()

    def epoch_end(self, refresh: bool) -> tuple[float, float, float, float]:
        """(train loss, train accuracy, test loss, test accuracy) as the original's log."""
        t = self.t
        if refresh:  # inside the last step, in eval mode, on augmented images
            t.refresh_clusters(self._embed(t.train, train_mode=False, augmented=True))
        train_loss = self._variance_and_loss()
        test_loss = self._loss(self._embed(t.test, True, False), t.test.labels)
        head = t.head()
        accs = []
        for data, augmented in ((t.train, True), (t.test, False)):
            emb = self._embed(data, train_mode=False, augmented=augmented)
            accs.append(100.0 * int((head.predict(emb) == data.labels).sum()) / len(data))
        return train_loss, accs[0], test_loss, accs[1]


# -- row "reported loss" ----------------------------------------------------------------------
def loss_with_same_class_clusters(emb: torch.Tensor, labels: torch.Tensor,
                                  centers: torch.Tensor, classes: torch.Tensor,
                                  variance: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-example full-set Magnet loss (N,) as the original reports it: the own cluster is
    the nearest of the example's class, and the denominator sums exp(-d^2/2sigma^2) over the
    other classes' clusters plus exp(0) = 1 for each cluster of its own class."""
    sq_dist = squared_distances(emb, centers)  # (N, C*K)
    same = classes[None, :] == labels[:, None]
    own = sq_dist.masked_fill(~same, float("inf")).argmin(1)
    log_s = -sq_dist / (2.0 * variance)
    log_num = log_s.gather(1, own[:, None]).squeeze(1) - alpha
    log_den = torch.logaddexp(torch.logsumexp(log_s.masked_fill(same, 0.0), 1),
                              log_s.new_tensor(math.log(LOSS_EPS)))
    return torch.relu(-torch.log((log_num - log_den).exp() + LOSS_EPS))


# -- row "QTRADES / --actual-trades adversary" ------------------------------------------------
def leaky_train_mode_maximise(summed: bool):
    """``consistency.maximise`` as the original's adversary: the model in the caller's
    (train) mode, ``model.zero_grad()`` then a backward of the objective at every step, so
    the last step's parameter gradients stay in ``.grad``. The objective is summed over the
    batch with ``summed`` (--actual-trades: ``KLDivLoss(size_average=False)``), else
    averaged (the cross-entropy and MSE criteria)."""
    def maximise(model, x, objective, start, step, steps, eps=RADIUS):
        x = x.detach()
        if isinstance(step, torch.Tensor):
            step = step.to(x.device, x.dtype)
        delta = project_linf(x, start.to(x.device, x.dtype), eps)
        for _ in range(steps):
            model.zero_grad()
            xa = (x + delta).requires_grad_(True)
            cost = objective(xa)
            (cost.sum() if summed else cost.mean()).backward()
            delta = project_linf(x, delta + step * xa.grad.sign(), eps)
        return (x + delta).detach()

    return maximise


# -- rows "weights kept across a refresh" and "weight 0" -------------------------------------
class OriginalWeightSampler(MagnetSampler):
    """The seed cluster drawn by weights that change only when a cluster's members are drawn:
    uniform before any loss, then each drawn cluster's mean known loss; a refresh keeps the
    weights. All weights 0 (every recorded loss 0), where the original's draw fails, draws
    uniformly among the non-empty clusters."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights: torch.Tensor | None = None  # (C*K,) float64, None: uniform

    def record_losses(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        super().record_losses(indices, losses)
        if self.weights is None:
            self.weights = torch.zeros(self.num_clusters, dtype=torch.float64)
        touched = self.assignments[indices.cpu()].unique()
        self.weights[touched] = self._loss_sum[touched] / self._loss_count[touched]

    def cluster_weights(self) -> torch.Tensor:
        if self.weights is None:
            return torch.full((self.num_clusters,), 1.0 / self.num_clusters)
        w = self.weights.float()
        if w.sum() <= 0:
            w = (self._counts > 0).float()
        return w / w.sum()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.weights is not None:
            state["weights"] = self.weights.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.weights = state["weights"].clone() if "weights" in state else None


# -- row "delta carried unclipped" ------------------------------------------------------------
class UnclippedFreePerturbation(FreePerturbation):
    """delta carried to a new batch as it is: x + delta may leave [0, 1] on its first
    replay (each replay's step still projects it, as the original's)."""

    def carried(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return delta.clone()
