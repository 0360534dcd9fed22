"""ClusTR training: Magnet-loss steps, the per-epoch cluster refresh, and the epoch metrics.

One epoch = ``steps_per_epoch`` Magnet batches, then ONE no-grad, eval-mode embedding pass
over the un-augmented training set whose embeddings serve the k-means refresh, sigma^2, the
reported training loss and the training accuracy; then one pass over the test set. The
variants live in ``consistency.py`` and ``free_adversarial.py``, the original's rules
(``--as-original``) in ``as_original.py``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from base.cli import resume_field
from base.distributed import Dist, own_rank, per_rank, rank_seed
from base.errors import UsageError
from base.progress import progress
from base.tensors import autocast, to_device
from datasets.data import ImageData, augment
from datasets.magnet_sampler import MagnetSampler
from models.cluster_head import ClusterHead
from models.resnet import ResNet18
from utils.train import as_original
from utils.train.clustering import Clusters, KMeansSettings, fit_clusters
from utils.train.consistency import ExtraTerms
from utils.train.embeddings import compute_embeddings_split, default_embed_batch
from utils.train.free_adversarial import FreePerturbation
from utils.train.magnet_loss import magnet_loss, magnet_loss_full

BAR_EVERY = 10  # steps between progress-bar loss updates
log = logging.getLogger("clustr")


# Fields declared with resume_field change what is trained: --resume must repeat them.
@dataclass
class TrainConfig:
    """What is trained, and how: the data, the Magnet batches and loss, the optimiser, the
    clusters and the variants."""

    dataset: str = resume_field()
    K: int = resume_field(2, argument="k")
    m: int = resume_field(12)
    d: int = resume_field(20)
    L: int = resume_field(10)
    # the normalisation rule: the L nearest clusters count (False: all of them)
    normalize: bool = resume_field(True, argument="not_normalize")
    alpha: float = resume_field(12.5)
    seed: int = resume_field(111)
    train_subset: int | None = resume_field(None)  # a seeded, class-balanced subset
    lr: float = resume_field(1e-4)  # Adam's
    milestones: tuple[int, ...] = resume_field((30, 60))  # MultiStepLR's (gamma 0.1)
    test_batch: int = 64
    embed_batch: int | None = None  # None: default_embed_batch(device)
    amp: bool = resume_field(False)
    consistency_lambda: float = resume_field(0.0)  # QTRADES (0 = plain ClusTR)
    xent_lambda: float = resume_field(0.0)
    mse_consistency: bool = resume_field(False)
    actual_trades: bool = resume_field(False)
    minibatch_replays: int = resume_field(0)  # free adversarial training (0 = off)
    kmeans_seed: int = resume_field(1)  # random_state of every k-means fit, as the original
    # k-means on the training device (utils/train/kmeans_device.py)
    kmeans_device: bool = resume_field(False)
    as_original: bool = resume_field(False)  # the original's rules (utils/train/as_original.py)
    consistency_attack: str = resume_field("paper")  # what QTRADES attacks (or "logit")
    consistency_steps: int = resume_field(1)  # its steps: 1 of 10/255 (the original) or N of 2/255
    # the original's --batch-size and --arch, accepted and ignored (a Magnet batch holds m x d
    # examples; the network is the CIFAR ResNet18): a resume repeats them with the command
    batch_size: int = resume_field(256)
    arch: str = resume_field("resnet18")


@dataclass
class EpochMetrics:
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    components: dict = field(default_factory=dict)  # mean of each loss term over the steps


class ClusTRTrainer:
    """Owns the network, the optimiser, the clusters and the sampler of one training run.
    Under torchrun every process holds the same clusters and sampler state; the training
    steps go through DistributedDataParallel, the embedding passes and adversaries do not."""

    def __init__(self, model: ResNet18, optimizer: torch.optim.Optimizer, train: ImageData,
                 test: ImageData, cfg: TrainConfig, device: torch.device,
                 dist: Dist | None = None):
        self.model, self.optimizer, self.train, self.test = model, optimizer, train, test
        self.cfg, self.device = cfg, device
        self.dist = dist or Dist.single()
        self.num_classes = train.num_classes
        self.sampler = MagnetSampler(train.labels, self.num_classes, cfg.K, cfg.m, cfg.d)
        # each process its own batches and augmentations; rank 0's are a single process's
        self.generator = torch.Generator().manual_seed(rank_seed(cfg.seed, self.dist.rank))
        self.train_model = self._wrap_ddp(model)
        self.kmeans = KMeansSettings.for_dataset(cfg.dataset, cfg.K, cfg.kmeans_seed,
                                                 device if cfg.kmeans_device else None)
        self.clusters: Clusters | None = None
        self.extras = ExtraTerms(cfg)
        self.free = FreePerturbation() if cfg.minibatch_replays > 0 else None
        if self.free and (cfg.consistency_lambda > 0 or cfg.xent_lambda > 0):
            log.warning("--consistency-lambda/--xent-lambda have no effect with "
                        "--minibatch-replays: free training uses the Magnet loss alone, as "
                        "the original")
        self.after_step = None  # after_step(steps done, totals()) after every step
        self._images: torch.Tensor | None = None  # the training set on the device
        # the rules where the original differs (docs/differences.md): the project's own,
        # or with --as-original the original's, chosen here once
        self.keep_batch = lambda n: True  # short batches are trained on
        self.first_clusters, self.epoch_end = self.refresh_clusters, self.eval_passes
        self.last_step_trained = True
        if cfg.as_original:
            as_original.adopt(self)

    def _wrap_ddp(self, model: ResNet18) -> torch.nn.Module:
        """The module the training steps call: DDP (gradients averaged over the processes)
        when a process group was joined, else the model itself. The linear head takes no part
        in the Magnet loss, at every step alike: ``static_graph`` lets DDP learn that once
        instead of walking the autograd graph each step (``find_unused_parameters``)."""
        if not self.dist.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, static_graph=True)

    def _sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics on every process. DDP broadcasts them before each
        forward, so after the last step each process holds its own update; the embedding
        passes (split over processes) and the saved checkpoint need one set."""
        if self.dist.enabled:
            for buf in self.model.buffers():
                buf.copy_(self.dist.broadcast(buf))

    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch(self.dist.world_size)

    def check_batch_shape(self) -> None:
        """Refuse m, L and K that the cluster structure cannot serve."""
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
    def refresh_clusters(self, emb: torch.Tensor | None = None) -> torch.Tensor:
        """k-means on the training embeddings ``emb`` (N, 512), by default one pass over the
        training set, handed to the sampler; returns the embeddings, which the metrics reuse."""
        if emb is None:
            batch = self.cfg.embed_batch or default_embed_batch(self.device)
            emb = self.embed(self.train.images, batch, "embed train")
        self.clusters = self._fit_once(emb)
        self.sampler.update_clusters(self.clusters.assignments, self.clusters.centers)
        return emb

    def embed(self, images: torch.Tensor, batch: int, desc: str) -> torch.Tensor:
        """Embeddings (N, 512) of a whole set; each process embeds its shard. Always in
        float32, also with ``amp`` (which speeds up the training steps only): the clusters,
        sigma^2 and the logged accuracies are then those the float32 evaluation sees."""
        return compute_embeddings_split(self.model, images, batch, self.device, self.dist,
                                        desc=desc, amp=False)

    def _fit_once(self, emb: torch.Tensor) -> Clusters:
        """k-means on the main process, its result broadcast, so every process holds the
        very same clusters and sigma^2. A failure there fails every process alike."""
        fit, error = None, None
        if self.dist.is_main:
            try:
                fit = fit_clusters(emb, self.train.labels, self.num_classes, self.kmeans)
            except (UsageError, FloatingPointError) as exc:
                error = exc
        if not self.dist.all_agree(error is None):
            if error is not None:
                raise error
            raise UsageError("k-means failed on the main process (see its message)")
        if not self.dist.enabled:
            return fit
        n_clusters = self.num_classes * self.cfg.K  # the other processes receive into zeros
        fit = fit or Clusters(torch.zeros(n_clusters, emb.shape[1]),
                              torch.zeros(n_clusters, dtype=torch.long),
                              torch.zeros(len(emb), dtype=torch.long), torch.zeros(n_clusters))
        return Clusters(*(self.dist.broadcast(t) for t in vars(fit).values()))

    def head(self) -> ClusterHead:
        c = self.clusters
        return ClusterHead(c.centers, c.classes, c.variance, self.num_classes, self.cfg.L,
                           self.cfg.normalize)

    # -- one epoch --------------------------------------------------------------------------
    def train_epoch(self, start_step: int = 0, totals: dict | None = None) -> dict:
        """Magnet steps over one epoch (free training: ``minibatch_replays`` optimiser steps
        per batch, see ``utils/train/free_adversarial.py``); returns the mean of every loss
        term per optimiser step. A resumed run starts at ``start_step`` with the running
        ``totals`` of the steps done. A batch ``keep_batch`` refuses (--as-original: a short
        one) is drawn, not trained on."""
        self.model.train()
        head = self.head().to(self.device)  # this epoch's clusters, for the extra terms
        replays = max(1, self.cfg.minibatch_replays)
        resumed = dict(totals or {})
        sums: dict[str, torch.Tensor] = {}  # this process's sums of the terms, on the device
        steps = self.steps_per_epoch()
        if self.free and start_step == 0:
            self.free.reset()  # the original sets delta to zero at every epoch's start
        bar = progress(range(start_step, steps), desc="train", leave=False)
        value = float("nan")
        for step in bar:
            indices, cluster_ids = self.sampler.sample(self.generator)
            self.last_step_trained = self.keep_batch(len(indices))
            if self.last_step_trained:
                value = self.train_batch(step, indices, cluster_ids, head, replays, sums)
            if (step + 1 - start_step) % BAR_EVERY == 0 or step + 1 == steps:
                bar.set_postfix(loss=f"{value:.4f}")
            if self.after_step is not None:
                self.after_step(step + 1, lambda: self._totals(resumed, sums))
        self._sync_buffers()
        return {name: total / (steps * replays)
                for name, total in self._totals(resumed, sums).items()}

    def train_batch(self, step: int, indices: torch.Tensor, cluster_ids: torch.Tensor,
                    head: ClusterHead, replays: int, sums: dict[str, torch.Tensor]) -> float:
        """The optimiser step(s) on one batch; adds its loss terms to ``sums`` and records
        its per-example losses in the sampler. Returns the last replay's loss."""
        x = self.batch_images(indices)
        cluster_ids = cluster_ids.to(self.device, non_blocking=True)
        classes = head.classes
        for _ in range(replays):
            self.optimizer.zero_grad(set_to_none=True)
            x_in = self.free.perturb(x) if self.free else x
            terms, per_example = self.batch_terms(x_in, cluster_ids, classes, head,
                                                  extras=not self.free)
            loss = sum(terms.values())
            loss.backward()
            # the step's one wait for the device (one copy back: the loss, then the
            # per-example losses the sampler needs), before the update, so a non-finite
            # loss never reaches the weights; on one process it ends all of them at once
            host = torch.cat([loss.detach().float()[None], per_example.detach().float()]).cpu()
            value, losses = float(host[0]), host[1:]
            finite = math.isfinite(value)
            if not self.dist.all_agree(finite):
                raise FloatingPointError(f"non-finite loss at step {step + 1}" +
                                         ("" if not finite else " on another process"))
            self.optimizer.step()
            if self.free:
                self.free.step(x)
            for name, term in terms.items():
                term = term.detach().double()
                sums[name] = sums[name] + term if name in sums else term
        if self.free:  # the sampler records the updated network's losses
            losses = self.free_losses(x, cluster_ids, classes).float().cpu()
        # every process records every process's batch: the sampler states stay equal
        self.sampler.record_losses(self.dist.gather_cat(indices.cpu()),
                                   self.dist.gather_cat(losses))
        return value

    def batch_images(self, indices: torch.Tensor) -> torch.Tensor:
        """The augmented float batch (N, 3, H, W) on the device, channels_last. The uint8
        training set stays there, so a step copies only the indices and the augmentation's
        draws (from the CPU generator): bit-identical to augmenting on the CPU."""
        stored = self.device_images()
        images = stored[indices.to(stored.device, non_blocking=True)]
        return to_device(augment(images, self.cfg.dataset, self.generator), self.device)

    def device_images(self) -> torch.Tensor:
        """The uint8 training images on the device (copied once; on a CPU, the tensor itself)."""
        if self._images is None or self._images.device != self.device:
            self._images = self.train.images.to(self.device)
        return self._images

    def _totals(self, resumed: dict[str, float], sums: dict[str, torch.Tensor]
                ) -> dict[str, float]:
        """The running sums of the loss terms over this epoch's steps: those done before a
        resume, plus this process's, averaged over the processes (one gather)."""
        names, out = list(sums), dict(resumed)
        if not names:
            return out
        local = torch.stack([sums[n] for n in names]).cpu()[None]  # (1, T) float64
        means = self.dist.gather_cat(local).mean(0) if self.dist.enabled else local[0]
        for name, m in zip(names, means.tolist()):
            out[name] = out.get(name, 0.0) + m
        return out

    @torch.no_grad()
    def free_losses(self, x: torch.Tensor, cluster_ids: torch.Tensor,
                    classes: torch.Tensor) -> torch.Tensor:
        """Per-example Magnet losses (N,) of the updated network on x + the final delta: the
        original's extra no-grad forward after the replays, in training mode (BatchNorm's
        running statistics take it too)."""
        with autocast(self.device, self.cfg.amp):
            emb = self.model(self.free.current(x)).float()
        return magnet_loss(emb, cluster_ids, classes, self.cfg.alpha)[0]

    def batch_terms(self, x: torch.Tensor, cluster_ids: torch.Tensor, classes: torch.Tensor,
                    head: ClusterHead, extras: bool = True
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """{'magnet', and the enabled 'consistency'/'xent'} of a batch (their sum is the
        training loss; a free replay, ``extras=False``, has 'magnet' alone), and the
        per-example Magnet losses (N,)."""
        with autocast(self.device, self.cfg.amp):
            emb = self.train_model(x).float()  # (N, 512)
        per_example, _ = magnet_loss(emb, cluster_ids, classes, self.cfg.alpha)
        terms = {"magnet": per_example.mean()}
        if not extras:
            return terms, per_example
        terms.update(self.extras.terms(self.model, head, x, emb, classes[cluster_ids],
                                       self.generator))
        return terms, per_example

    def run_epoch(self, start_step: int = 0, totals: dict | None = None) -> EpochMetrics:
        components = self.train_epoch(start_step, totals)
        return EpochMetrics(*self.epoch_end(self.last_step_trained), components)

    def eval_passes(self, refresh: bool = True) -> tuple[float, float, float, float]:
        """After the steps (every batch trained on, so always ``refresh``): the cluster
        refresh and the metrics from one eval-mode pass over the un-augmented training set,
        and one over the test set: (train loss, train accuracy, test loss, test accuracy)."""
        train_emb = self.refresh_clusters()
        train_loss, train_acc = self.metrics(train_emb, self.train.labels)
        test_emb = self.embed(self.test.images, self.cfg.test_batch, "embed test")
        test_loss, test_acc = self.metrics(test_emb, self.test.labels)
        return train_loss, train_acc, test_loss, test_acc

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run needs besides the network and the optimiser (tensors and plain
        types): the clusters, the sampler's losses, the batch and augmentation generator."""
        state = {"generator": self._generator_state(), "sampler": self.sampler.state_dict(),
                 "clusters": dict(vars(self.clusters))}
        if self.free is not None and self.free.delta is not None:
            # carried across batches; each process has its own, restored per rank
            state["free_delta"] = per_rank(self.dist, self.free.delta.detach().cpu())
        return state

    def load_state_dict(self, state: dict) -> None:
        self._set_generator_state(state["generator"])
        self.sampler.load_state_dict(state["sampler"])
        self.clusters = Clusters(**state["clusters"])
        self.sampler.update_clusters(self.clusters.assignments, self.clusters.centers)
        if self.free is not None and "free_delta" in state:
            self.free.delta = own_rank(self.dist, state["free_delta"]).to(self.device)

    def _generator_state(self) -> torch.Tensor:
        """This process's generator state (G,) alone, or every process's (world, G)."""
        own = self.generator.get_state()
        return self.dist.gather_cat(own[None]) if self.dist.enabled else own

    def _set_generator_state(self, saved: torch.Tensor) -> None:
        world = 1 if saved.dim() == 1 else len(saved)
        if world != self.dist.world_size:
            raise UsageError(f"the run was interrupted with {world} process(es) and continues "
                             f"with {self.dist.world_size}: resume with the same number")
        # a copy: set_state reads a row view from the start of its storage (rank 0's state)
        self.generator.set_state(saved.reshape(world, -1)[self.dist.rank].clone())

    @torch.no_grad()
    def metrics(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """Full-set Magnet loss (training sigma^2) and nearest-cluster accuracy in percent."""
        head = self.head()
        losses = magnet_loss_full(emb, labels, head.centers, head.classes, head.variance,
                                  self.cfg.alpha)
        acc = 100.0 * int((head.predict(emb) == labels).sum()) / len(labels)  # exact, as sweep
        loss = losses.mean().item()
        return (loss if math.isfinite(loss) else float("nan")), acc
