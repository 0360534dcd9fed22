"""The extra loss terms of ClusTR's variants: QTRADES consistency and cross-entropy on scores.

All of them read the cluster state of the current epoch (a ``ClusterHead``: centroids,
classes and the inference sigma^2), while the Magnet term uses the batch's own means. The
flags are described in docs/usage.md. QTRADES adds λ · CE(p, s(x')), with p the clean class
probabilities (the paper's class scores normalised to sum to one), s the paper's bounded
scores used as logits, as the original does, and x' its adversary. ``--actual-trades``
keeps the original's adversary: 10 steps on KL(p || softmax(s(x'))) of 0.03 *in normalised
units* (it attacked normalised images: 0.03 · std_c per channel in pixels); KL and CE differ
by the entropy of p, constant in x', so the training term stays λ · CE.

Decisions (written down because the original is silent or differs):

* The clean side is a **fixed target**: p (and the clean embedding of the MSE variant) is
  detached, so the term pulls the adversarial prediction toward the clean one.
* The adversary runs in **eval mode** with ``torch.autograd.grad`` on the input only, so no
  parameter ``.grad`` is written: the original's adversary gradients leaked into the step.
* Every x' stays inside the 8/255 ball around x and inside [0, 1]; random starts come from
  the caller's CPU generator, so a run is reproducible on any device.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from base.errors import UsageError
from base.tensors import autocast, eval_mode
from models.cluster_head import ClusterHead
from utils.attacks.pgd import project_linf

log = logging.getLogger("clustr")

EPS = 8.0 / 255            # radius of the consistency adversary's l-inf ball
QTRADES_STEP = 10.0 / 255  # one signed-gradient step of this size
TRADES_STEP = 0.03         # --actual-trades: step in normalised units (x 255 std_c in 1/255)
TRADES_STEPS = 10          # ... and number of steps, from a uniform start in the ball
PGD_STEP = 2.0 / 255       # --consistency-steps N > 1: N steps of this size
ATTACKS = ("paper", "logit")  # --consistency-attack: the scores the adversary and term use


def class_probabilities(head: ClusterHead, emb: torch.Tensor) -> torch.Tensor:
    """The paper's class scores divided by their sum, (N, C). Computed as a softmax over the
    counted clusters' -d^2/2sigma^2 summed per class, which equals scores / scores.sum(1)
    exactly but stays finite when every exp(-d^2/2sigma^2) underflows (where the plain ratio
    would be 0/0)."""
    log_scores = head.cluster_log_scores(emb)  # (N, C*K)
    counted = log_scores.masked_fill(~head.counted_mask(log_scores), -float("inf"))
    per_cluster = counted.softmax(1)  # (N, C*K), zero outside the counted clusters
    return per_cluster.new_zeros(len(emb), head.num_classes).index_add_(1, head.classes,
                                                                        per_cluster)


def soft_cross_entropy(target: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Per-example -sum_c target_c log softmax(scores)_c, (N,); >= 0 for a probability target."""
    return -(target * scores.log_softmax(1)).sum(1)


def kl_divergence(target: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Per-example KL(target || softmax(scores)), (N,), with 0 log 0 = 0."""
    log_target = target.clamp_min(1e-30).log()
    return (target * (log_target - scores.log_softmax(1))).sum(1)


@dataclass(frozen=True)
class Adversary:
    """What the QTRADES adversary attacks (``attack`` in ATTACKS) and its number of steps."""

    attack: str = "paper"
    steps: int = 1

    def __post_init__(self):
        if self.attack not in ATTACKS:
            raise UsageError(f"--consistency-attack {self.attack!r}: choose from "
                             f"{', '.join(ATTACKS)}")
        if self.steps < 1:
            raise UsageError(f"--consistency-steps {self.steps}: must be at least 1")


def adversary_conflict(adversary: Adversary, mse: bool, actual_trades: bool) -> str | None:
    """Why ``adversary`` cannot combine with the other consistency flags, or None."""
    if adversary.attack == "logit" and mse:
        return ("--consistency-attack logit attacks the class probabilities: it does not "
                "combine with --mse-consistency")
    if adversary.steps != 1 and actual_trades:
        return ("--consistency-steps sets the QTRADES adversary's steps: --actual-trades "
                "keeps the original's 10 steps of 0.03 normalised units")
    return None


def maximise(model: torch.nn.Module, x: torch.Tensor, objective: Callable[[torch.Tensor],
             torch.Tensor], start: torch.Tensor, step: float | torch.Tensor, steps: int,
             eps: float = EPS) -> torch.Tensor:
    """x' = x + delta maximising ``objective(x')`` (per example, (N,)) by signed gradients.
    ``start`` (N, 3, H, W) is the initial perturbation; it and every step are projected to
    the eps-ball and to [0, 1]. ``step`` is a float or a per-channel (1, 3, 1, 1) tensor. The
    model runs in eval mode and only the input gets a gradient, so parameter ``.grad`` is
    left exactly as it was."""
    x = x.detach()
    if isinstance(step, torch.Tensor):
        step = step.to(x.device, x.dtype)
    delta = project_linf(x, start.to(x.device, x.dtype), eps)
    with eval_mode(model):
        for _ in range(steps):
            d = delta.clone().requires_grad_(True)
            grad, = torch.autograd.grad(objective(x + d).sum(), d)
            delta = project_linf(x, d.detach() + step * grad.sign(), eps)
    return (x + delta).detach()


class ExtraTerms:
    """The variant terms of one training run; ``terms(...)`` is empty for plain ClusTR."""

    def __init__(self, consistency_lambda: float = 0.0, xent_lambda: float = 0.0,
                 mse_consistency: bool = False, actual_trades: bool = False,
                 amp: bool = False, pixel_std=(0.2023, 0.1994, 0.2010),
                 adversary: Adversary | None = None):
        self.consistency_lambda = float(consistency_lambda)
        self.xent_lambda = float(xent_lambda)
        self.mse = bool(mse_consistency)
        self.actual_trades = bool(actual_trades)
        self.amp = amp
        # --actual-trades: 0.03 normalised units per channel, in pixels (1, 3, 1, 1)
        self.trades_step = TRADES_STEP * torch.as_tensor(pixel_std).float().view(1, -1, 1, 1)
        # the adversary's loop and the clean side's target (--as-original replaces both)
        self.maximise, self.clean_side = maximise, torch.Tensor.detach
        adversary = adversary or Adversary()
        self.logit = adversary.attack == "logit"
        self.steps = adversary.steps
        conflict = adversary_conflict(adversary, self.mse, self.actual_trades)
        if conflict:
            raise UsageError(conflict)
        if (self.mse or self.actual_trades) and self.consistency_lambda == 0:
            log.warning("--mse-consistency/--actual-trades have no effect without "
                        "--consistency-lambda > 0")
        if (self.logit or self.steps > 1) and self.consistency_lambda == 0:
            log.warning("--consistency-attack/--consistency-steps have no effect without "
                        "--consistency-lambda > 0")

    def terms(self, model: torch.nn.Module, head: ClusterHead, x: torch.Tensor,
              emb: torch.Tensor, labels: torch.Tensor,
              generator: torch.Generator) -> dict[str, torch.Tensor]:
        """{'consistency': ..., 'xent': ...} for the enabled terms, weights applied. ``x``
        (N, 3, H, W) is the batch the model saw, ``emb`` (N, 512) its training-mode
        embeddings (with the graph), ``labels`` (N,) its classes."""
        out = {}
        if self.consistency_lambda > 0:
            out["consistency"] = self.consistency_lambda * self.consistency(
                model, head, x, emb, generator)
        if self.xent_lambda > 0:
            out["xent"] = self.xent_lambda * F.cross_entropy(head.paper_scores(emb), labels)
        return out

    def consistency(self, model: torch.nn.Module, head: ClusterHead, x: torch.Tensor,
                    emb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The unweighted consistency divergence between x and its adversary, a scalar."""
        x_adv = self.adversary(model, head, x, emb, generator)
        with autocast(x.device, self.amp):
            emb_adv = model(x_adv).float()  # training mode, with the graph
        if self.mse:
            return F.mse_loss(emb_adv, self.clean_side(emb))
        if self.logit:  # TRADES's KL on the classifier's logit, the clean side fixed
            p = head.logits(self.clean_side(emb)).softmax(1)
            return kl_divergence(p, head.logits(emb_adv)).mean()
        p = class_probabilities(head, self.clean_side(emb))  # fixed target
        return soft_cross_entropy(p, head.paper_scores(emb_adv)).mean()

    def adversary(self, model: torch.nn.Module, head: ClusterHead, x: torch.Tensor,
                  emb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x' for the consistency term (float32, no autocast: it is an attack)."""
        x = x.detach()
        target_emb = emb.detach()
        p = class_probabilities(head, target_emb)
        if self.mse:
            def objective(xa):
                return (model(xa) - target_emb).pow(2).mean(1)
        elif self.logit:
            p = head.logits(target_emb).softmax(1)

            def objective(xa):
                return kl_divergence(p, head.logits(model(xa)))
        elif self.actual_trades:
            def objective(xa):
                return kl_divergence(p, head.paper_scores(model(xa)))
        else:
            def objective(xa):
                return soft_cross_entropy(p, head.paper_scores(model(xa)))
        # both adversaries start uniformly in the ball (the original's rand=True), clipped
        start = torch.empty(x.shape).uniform_(-EPS, EPS, generator=generator)
        if self.actual_trades:
            return self.maximise(model, x, objective, start, self.trades_step, TRADES_STEPS)
        if self.steps > 1:
            return self.maximise(model, x, objective, start, PGD_STEP, self.steps)
        return self.maximise(model, x, objective, start, QTRADES_STEP, 1)
