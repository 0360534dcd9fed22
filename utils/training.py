"""ClusTR training: Magnet-loss steps, the per-epoch cluster refresh, and the epoch metrics.

One epoch = ``steps_per_epoch`` Magnet batches, then ONE no-grad, eval-mode embedding pass
over the un-augmented training set whose embeddings serve the k-means refresh, sigma^2, the
reported training loss and the training accuracy; then one pass over the test set.
The variants' extra terms live in ``utils/consistency.py``, the "free" replays' perturbation
in ``utils/free_adversarial.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from datasets.data import ImageData, augment
from datasets.magnet_sampler import MagnetSampler
from models.cluster_head import ClusterHead
from models.resnet import ResNet18
from utils.clustering import Clusters, fit_clusters, kmeans_settings
from utils.consistency import ExtraTerms
from utils.embeddings import autocast, compute_embeddings, default_embed_batch, to_device
from utils.free_adversarial import FreePerturbation
from utils.magnet_loss import magnet_loss, magnet_loss_full
from utils.progress import progress


@dataclass
class TrainConfig:
    dataset: str
    K: int = 2
    m: int = 12
    d: int = 20
    L: int = 10
    normalize: bool = True
    alpha: float = 12.5
    seed: int = 111
    test_batch: int = 64
    embed_batch: int | None = None  # None: default_embed_batch(device)
    amp: bool = False
    consistency_lambda: float = 0.0  # QTRADES (0 = plain ClusTR)
    xent_lambda: float = 0.0
    mse_consistency: bool = False
    actual_trades: bool = False
    minibatch_replays: int = 0  # free adversarial training (0 = off)


@dataclass
class EpochMetrics:
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    components: dict = field(default_factory=dict)  # mean of each loss term over the steps


class ClusTRTrainer:
    """Owns the network, the optimiser, the clusters and the sampler of one training run."""

    def __init__(self, model: ResNet18, optimizer: torch.optim.Optimizer, train: ImageData,
                 test: ImageData, cfg: TrainConfig, device: torch.device):
        self.model, self.optimizer, self.train, self.test = model, optimizer, train, test
        self.cfg, self.device = cfg, device
        self.num_classes = train.num_classes
        self.sampler = MagnetSampler(train.labels, self.num_classes, cfg.K, cfg.m, cfg.d)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.clusters: Clusters | None = None
        self.train_embeddings: torch.Tensor | None = None
        self.extras = ExtraTerms(cfg.consistency_lambda, cfg.xent_lambda, cfg.mse_consistency,
                                 cfg.actual_trades, cfg.amp)
        self.free = FreePerturbation() if cfg.minibatch_replays > 0 else None
        # after_step(steps_done, totals) runs after every step (periodic resume saves)
        self.after_step = None

    def check_batch_shape(self) -> None:
        """Refuse m, L and K that the cluster structure cannot serve."""
        from utils.errors import UsageError

        total, other = self.num_classes * self.cfg.K, (self.num_classes - 1) * self.cfg.K
        if self.cfg.m > total:
            raise UsageError(f"--m {self.cfg.m} is larger than the {total} clusters "
                             f"({self.num_classes} classes x --k {self.cfg.K})")
        if self.cfg.m - 1 > other:
            raise UsageError(f"--m {self.cfg.m} needs {self.cfg.m - 1} impostor clusters of "
                             f"other classes but there are only {other}: lower --m or raise --k")
        if self.cfg.L > total:
            raise UsageError(f"--L {self.cfg.L} is larger than the {total} clusters "
                             f"({self.num_classes} classes x --k {self.cfg.K})")

    # -- clusters ---------------------------------------------------------------------------
    def refresh_clusters(self) -> torch.Tensor:
        """Embed the training set once, re-run k-means, hand the result to the sampler.

        Returns the embeddings (N, 512) so the caller can reuse them for the metrics.
        """
        batch = self.cfg.embed_batch or default_embed_batch(self.device)
        emb = compute_embeddings(self.model, self.train.images, batch, self.device,
                                 desc="embed train", amp=self.cfg.amp)
        n_init, max_iter = kmeans_settings(self.cfg.dataset)
        self.clusters = fit_clusters(emb, self.train.labels, self.num_classes, self.cfg.K,
                                     n_init, max_iter, self.cfg.seed)
        self.sampler.update_clusters(self.clusters.assignments, self.clusters.centers)
        return emb

    def head(self) -> ClusterHead:
        c = self.clusters
        return ClusterHead(c.centers, c.classes, c.variance, self.num_classes, self.cfg.L,
                           self.cfg.normalize)

    # -- one epoch --------------------------------------------------------------------------
    def train_epoch(self, desc: str = "train", start_step: int = 0,
                    totals: dict | None = None) -> dict:
        """Magnet steps over one epoch; returns the mean of every loss term per optimiser step.

        With free training each batch is replayed ``minibatch_replays`` times, one optimiser
        step per replay; the sampler records the losses of the last replay. A resumed run
        starts at ``start_step`` with the running ``totals`` of the steps done.
        """
        self.model.train()
        head = self.head().to(self.device)  # this epoch's clusters, for the extra terms
        classes = head.classes
        replays = max(1, self.cfg.minibatch_replays)
        totals: dict[str, float] = dict(totals or {})
        steps = self.sampler.steps_per_epoch()
        bar = progress(range(start_step, steps), desc=desc, leave=False)
        for step in bar:
            indices, cluster_ids = self.sampler.sample(self.generator)
            images = augment(self.train.images[indices], self.cfg.dataset, self.generator)
            x = to_device(images, self.device)
            cluster_ids = cluster_ids.to(self.device)
            for _ in range(replays):
                self.optimizer.zero_grad(set_to_none=True)
                x_in = self.free.perturb(x) if self.free else x
                terms, per_example = self.batch_terms(x_in, cluster_ids, classes, head)
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at step {step + 1}")
                loss.backward()
                self.optimizer.step()
                if self.free:
                    self.free.step(x)
                for name, value in terms.items():
                    totals[name] = totals.get(name, 0.0) + value.item()
            self.sampler.record_losses(indices, per_example)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.after_step is not None:
                self.after_step(step + 1, totals)
        return {name: total / (steps * replays) for name, total in totals.items()}

    def batch_terms(self, x: torch.Tensor, cluster_ids: torch.Tensor, classes: torch.Tensor,
                    head: ClusterHead) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """{'magnet', and the enabled 'consistency'/'xent'} of a batch, and the per-example
        Magnet losses (N,). Their sum is the training loss; plain ClusTR has 'magnet' alone.
        """
        with autocast(self.device, self.cfg.amp):
            emb = self.model(x).float()  # (N, 512)
        per_example, _ = magnet_loss(emb, cluster_ids, classes, self.cfg.alpha)
        terms = {"magnet": per_example.mean()}
        terms.update(self.extras.terms(self.model, head, x, emb, classes[cluster_ids],
                                       self.generator))
        return terms, per_example

    def run_epoch(self, start_step: int = 0, totals: dict | None = None) -> EpochMetrics:
        components = self.train_epoch(start_step=start_step, totals=totals)
        train_emb = self.refresh_clusters()
        train_loss, train_acc = self.metrics(train_emb, self.train.labels)
        test_emb = compute_embeddings(self.model, self.test.images, self.cfg.test_batch,
                                      self.device, desc="embed test", amp=self.cfg.amp)
        test_loss, test_acc = self.metrics(test_emb, self.test.labels)
        return EpochMetrics(train_loss, train_acc, test_loss, test_acc, components)

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run needs besides the network and the optimiser: the clusters, the
        sampler's per-example losses and the generator of batches and augmentation. Tensors
        and plain types only, so it loads with ``weights_only=True``."""
        c = self.clusters
        state = {"generator": self.generator.get_state(), "sampler": self.sampler.state_dict(),
                 "clusters": {"centers": c.centers, "classes": c.classes,
                              "assignments": c.assignments, "variance": c.variance}}
        if self.free is not None and self.free.delta is not None:
            state["free_delta"] = self.free.delta.detach().cpu()  # carried across batches
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.sampler.load_state_dict(state["sampler"])
        self.clusters = Clusters(**state["clusters"])
        self.sampler.update_clusters(self.clusters.assignments, self.clusters.centers)
        if self.free is not None and "free_delta" in state:
            self.free.delta = state["free_delta"].to(self.device)

    @torch.no_grad()
    def metrics(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """Full-set Magnet loss (training sigma^2) and nearest-cluster accuracy in percent."""
        head = self.head()
        losses = magnet_loss_full(emb, labels, head.centers, head.classes, head.variance,
                                  self.cfg.alpha)
        acc = (head.predict(emb) == labels).float().mean().item() * 100.0
        loss = losses.mean().item()
        return (loss if math.isfinite(loss) else float("nan")), acc
