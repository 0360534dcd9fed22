"""Attacks that do not trust the paper's loss: adaptive PGD on the logit, and AutoAttack.

The paper's PGD maximises a cross-entropy on bounded cluster scores, which saturates far
from the clusters and so overstates robustness. The attacks here target the classifier's
proper logit ``model(x)`` (same arg-max as the paper's scores): PGD with cross-entropy and
with the DLR margin loss, run by ``utils.attacks.sweep`` with the paper's step, iterations
and early stopping but AutoAttack's rule across restarts (**fooled wins**), and AutoAttack,
standard version, from either package (``utils.attacks.autoattack_backend``).
"""
from __future__ import annotations

import logging
import time

import torch

from base import preemption
from base.errors import UsageError
from base.tensors import eval_mode, to_device
from utils.attacks.autoattack_backend import find_backend, make_adversary, run_adversary
from utils.attacks.pgd import PGD, LossFn, in_threat_model, logit_ce_loss
from utils.attacks.sweep import AttackContext, Outcome, predictions, unpack

log = logging.getLogger("clustr")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference-of-logits-ratio loss (Croce & Hein, 2020), per example (N,):
    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), z_pi1 >= z_pi2 >= ... the sorted
    logits. Positive exactly when the example is misclassified and, invariant to shifting and
    scaling the logits, it cannot saturate the way a bounded score does. With two classes
    there is no third logit: the plain margin -(z_y - z_other) is used."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)                       # (N,)
    others = logits.scatter(1, y[:, None], -float("inf"))
    margin = z_y - others.amax(1)                                       # (N,)
    if logits.shape[1] < 3:
        return -margin
    top = logits.topk(3, dim=1).values                                  # (N, 3)
    return -margin / (top[:, 0] - top[:, 2] + 1e-12)


def logit_dlr_loss(model, x, y):
    """DLR on the model's logits (``forward``); the logits' arg-max decides fooled."""
    logits = model(x)
    return dlr_loss(logits, y), logits


# name -> loss_fn(model, x, y) -> (per-example loss, logits); attacks on the proper logit
ADAPTIVE_LOSSES: dict[str, LossFn] = {"pgd-ce": logit_ce_loss, "pgd-dlr": logit_dlr_loss}


def adaptive_attacks(iterations: int, restarts: int) -> list[PGD]:
    """PGD-CE and PGD-DLR on the logit with the paper's step and budget, restarts merged
    by the rule "fooled wins"."""
    return [PGD(name, loss, iterations, restarts, fooled_wins=True, title=name)
            for name, loss in ADAPTIVE_LOSSES.items()]


def autoattack_unit(ctx: AttackContext, eps: float, i: int, log_path: str | None) -> Outcome:
    """AutoAttack at one eps, saved as unit ``autoattack/<i>`` (it cannot be saved part-way:
    a stop request during it ends the run at once, to continue from the previous unit)."""
    key = f"autoattack/{i}"
    unit = ctx.state.get(key)
    if unit is None or not unit.get("done"):
        with preemption.immediate():
            out = run_autoattack(ctx, eps, log_path)
        unit = {"done": True, "pred": out.pred, "seconds": out.seconds,
                "package": out.package}
        if out.adv is not None:
            unit["adv_rows"], unit["adv_images"] = out.adv
        ctx.state.put(key, unit)
        preemption.point(f"autoattack-eps-{i}")
    return unpack("autoattack", eps, unit, ctx.data.labels)


def run_autoattack(ctx: AttackContext, eps: float, log_path: str | None = None) -> Outcome:
    """AutoAttack l-inf, standard version, at ``eps`` (units of 1/255) on the logits of
    ``ctx.model``, all of ``ctx.data`` (``Outcome.package`` names the package used). Its
    images are checked, not trusted: an example counts as broken only if its returned image
    lies in the eps-ball and in [0, 1] and the logit's arg-max on it is wrong."""
    model, data, batch, device = ctx.model, ctx.data, ctx.batch, torch.device(ctx.device)
    backend = find_backend()
    if data.num_classes < 4:
        raise UsageError(f"AutoAttack's standard version needs at least 4 classes (its "
                         f"targeted DLR loss uses the 4th logit); this data set has "
                         f"{data.num_classes}")
    adversary = make_adversary(backend, _Watched(model), eps / 255, device, ctx.seed, log_path)
    targets = min(9, data.num_classes - 1)  # standard uses 9 target classes: all of CIFAR-10's
    adversary.apgd_targeted.n_target_classes = targets
    adversary.fab.n_target_classes = targets
    x = to_device(data.images, device).contiguous()
    y = data.labels.to(device)
    start = time.time()
    with eval_mode(model):
        x_adv = run_adversary(backend, adversary, x, y, batch)
        pred = _verified_pred(model, x, x_adv, y, eps / 255, batch)
    robust = pred == y
    adv = None
    if ctx.keep_adv:
        rows = (~robust).nonzero().flatten()
        adv = (rows.cpu(), x_adv[rows].detach().float().cpu())
    outcome = Outcome("autoattack", eps, robust.cpu(), time.time() - start, adv,
                      backend.name(), pred.cpu())
    log.info("AutoAttack (standard, %s) eps %g/255: %.2f%% robust on %d images (%.0fs)",
             backend.name(), eps, outcome.accuracy, len(y), outcome.seconds)
    return outcome


class _Watched(torch.nn.Module):
    """The model as AutoAttack sees it; each forward passes a named point of the run (the
    tests stop a run in the middle of AutoAttack there)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        preemption.point("autoattack-forward")
        return self.model(x)


@torch.no_grad()
def _verified_pred(model, x, x_adv, y, eps: float, batch: int) -> torch.Tensor:
    """(N,) prediction on ``x_adv``; the label where ``x_adv`` is not a valid image."""
    valid = in_threat_model(x, x_adv, eps)
    if not valid.all():
        log.warning("AutoAttack returned %d image(s) outside the eps-ball or [0, 1]; they "
                    "count as not broken", int((~valid).sum()))
    pred = predictions(model, x_adv, batch, x.device, logits=True).to(y.device)
    return torch.where(valid, pred, y)
