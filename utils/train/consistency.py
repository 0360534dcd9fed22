"""The extra loss terms of ClusTR's variants: QTRADES consistency and cross-entropy on scores.

The flags and formulas are in docs/usage.md ("Training variants"), where the original differs
in docs/differences.md. The terms read the current epoch's clusters (a ``ClusterHead``), the
Magnet term the batch's own means. Decisions (the original is silent or differs):

* the clean side is a **fixed target** (detached): the term pulls the adversarial
  prediction toward the clean one;
* the adversary runs in **eval mode** with ``torch.autograd.grad`` on the input only, so no
  parameter ``.grad`` is written (the original's adversary gradients leaked into the step);
* every x' stays inside the 8/255 ball and [0, 1]; random starts come from the caller's CPU
  generator, so a run is reproducible on any device.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from base.errors import UsageError
from base.tensors import autocast, eval_mode
from models.cluster_head import ClusterHead
from models.resnet import normalization_for
from utils.attacks.pgd import project_linf

log = logging.getLogger("clustr")

RADIUS = 8.0 / 255  # l-inf radius of every training-time adversary (also free, pre-training)
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


def adversary_error(attack: str, steps: int, mse: bool, actual_trades: bool) -> str | None:
    """Why the QTRADES adversary's ``attack`` (in ATTACKS) and ``steps`` are refused, alone or
    with the other consistency flags; None where they are not."""
    if attack not in ATTACKS:
        return f"--consistency-attack {attack!r}: choose from {', '.join(ATTACKS)}"
    if steps < 1:
        return f"--consistency-steps {steps}: must be at least 1"
    if attack == "logit" and mse:
        return ("--consistency-attack logit attacks the class probabilities: it does not "
                "combine with --mse-consistency")
    if steps != 1 and actual_trades:
        return ("--consistency-steps sets the QTRADES adversary's steps: --actual-trades "
                "keeps the original's 10 steps of 0.03 normalised units")
    return None


def maximise(model: torch.nn.Module, x: torch.Tensor, objective: Callable[[torch.Tensor],
             torch.Tensor], start: torch.Tensor, step: float | torch.Tensor, steps: int,
             eps: float = RADIUS) -> torch.Tensor:
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
    """The variant terms of one training run (``cfg``: its ``TrainConfig``); ``terms(...)``
    is empty for plain ClusTR."""

    def __init__(self, cfg):
        self.consistency_lambda, self.xent_lambda = cfg.consistency_lambda, cfg.xent_lambda
        self.mse, self.actual_trades, self.amp = cfg.mse_consistency, cfg.actual_trades, cfg.amp
        # --actual-trades: 0.03 normalised units per channel, in pixels (1, 3, 1, 1)
        pixel_std = torch.as_tensor(normalization_for(cfg.dataset)[1]).float()
        self.trades_step = TRADES_STEP * pixel_std.view(1, -1, 1, 1)
        # the adversary's loop and the clean side's target (--as-original replaces both)
        self.maximise, self.clean_side = maximise, torch.Tensor.detach
        self.logit, self.steps = cfg.consistency_attack == "logit", cfg.consistency_steps
        error = adversary_error(cfg.consistency_attack, self.steps, self.mse, self.actual_trades)
        if error:
            raise UsageError(error)
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

    def target(self, head: ClusterHead, emb: torch.Tensor):
        """The clean class probabilities p (N, C), and the scores of the adversarial side
        they are compared with: the classifier's logit, or the paper's bounded scores."""
        if self.logit:
            return head.logits(emb).softmax(1), head.logits
        return class_probabilities(head, emb), head.paper_scores

    def consistency(self, model: torch.nn.Module, head: ClusterHead, x: torch.Tensor,
                    emb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The unweighted consistency divergence between x and its adversary, a scalar:
        TRADES's KL on the logit, else the paper's CE (also with --actual-trades: KL and CE
        differ by the entropy of p, constant in x')."""
        x_adv = self.adversary(model, head, x, emb, generator)
        with autocast(x.device, self.amp):
            emb_adv = model(x_adv).float()  # training mode, with the graph
        if self.mse:
            return F.mse_loss(emb_adv, self.clean_side(emb))
        p, scores = self.target(head, self.clean_side(emb))
        divergence = kl_divergence if self.logit else soft_cross_entropy
        return divergence(p, scores(emb_adv)).mean()

    def adversary(self, model: torch.nn.Module, head: ClusterHead, x: torch.Tensor,
                  emb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x' for the consistency term (float32, no autocast: it is an attack), from a
        uniform start in the ball (the original's rand=True), clipped."""
        x, target_emb = x.detach(), emb.detach()
        if self.mse:
            def objective(xa):
                return (model(xa) - target_emb).pow(2).mean(1)
        else:
            p, scores = self.target(head, target_emb)
            divergence = kl_divergence if self.logit or self.actual_trades else soft_cross_entropy

            def objective(xa):
                return divergence(p, scores(model(xa)))
        start = torch.empty(x.shape).uniform_(-RADIUS, RADIUS, generator=generator)
        step, steps = ((self.trades_step, TRADES_STEPS) if self.actual_trades else
                       (PGD_STEP, self.steps) if self.steps > 1 else (QTRADES_STEP, 1))
        return self.maximise(model, x, objective, start, step, steps)
