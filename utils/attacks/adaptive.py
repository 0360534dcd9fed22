"""Attacks that do not trust the paper's loss: adaptive PGD on the logit, and AutoAttack.

The paper's PGD maximises a cross-entropy on bounded cluster scores, which saturates far
from the clusters and so overstates robustness. The attacks here target
the classifier's proper logit, ``model(x)`` (per-class log-sum-exp of -d^2/2sigma^2 over the
counted clusters; same arg-max as the paper's scores):

* PGD with cross-entropy on the logit (``utils.attacks.pgd.logit_ce_loss``) and with the DLR
  margin loss (``logit_dlr_loss``), both through ``utils.attacks.pgd.pgd`` with the paper's step,
  iterations and early stopping, but with the per-example rule of AutoAttack across
  restarts: **fooled wins** (``pgd_fooled_wins``);
* AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square), through the optional
  ``pyautoattack`` package (``run_autoattack``).

An example counts as fooled when the logit's arg-max differs from its label.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from base.errors import UsageError
from base.progress import progress
from base.tensors import eval_mode, to_device
from datasets.data import ImageData
from utils.attacks.pgd import AttackResult, LossFn, logit_ce_loss, pgd, start_keys

log = logging.getLogger("clustr")

AUTOATTACK_HINT = ("--autoattack needs the optional package pyautoattack: "
                   "python -m pip install pyautoattack==0.2.0")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference-of-logits-ratio loss (Croce & Hein, 2020), per example: (N,).

    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), with z_pi1 >= z_pi2 >= ... the sorted
    logits. It is positive exactly when the example is misclassified and, being invariant to
    shifting and scaling the logits, cannot saturate the way a bounded score does. With two
    classes there is no third logit: the plain margin -(z_y - z_other) is used.
    """
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


def pgd_fooled_wins(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                    step: float, iterations: int, restarts: int,
                    keys_fn: Callable[[int, torch.Tensor], list[int]], loss_fn: LossFn,
                    shrink: bool = True) -> AttackResult:
    """``pgd`` with restarts kept by the rule "fooled wins".

    An example misclassified after any restart stays broken, with that restart's
    perturbation; the next restart attacks only the examples still robust (for those, the
    perturbation with the highest loss so far is kept). ``keys_fn(restart, rows)`` gives the
    start seeds of the examples at positions ``rows`` of ``x``, so an example's start never
    depends on which others are still in the batch.
    """
    n = len(x)
    best = AttackResult(delta=torch.zeros_like(x), loss=x.new_full((n,), -float("inf")),
                        pred=y.clone(), correct=torch.ones(n, dtype=torch.bool, device=x.device),
                        steps=torch.zeros(n, dtype=torch.long, device=x.device))
    for restart in range(restarts):
        rows = best.correct.nonzero().flatten()                         # still robust
        if len(rows) == 0:
            break
        res = pgd(model, x[rows], y[rows], eps, step, iterations, 1,
                  lambda _r, r=restart, rows=rows: keys_fn(r, rows), loss_fn, shrink)
        fooled = ~res.correct
        take = fooled | (res.loss >= best.loss[rows])
        best.delta[rows[take]] = res.delta[take]
        best.loss[rows[take]] = res.loss[take]
        best.steps[rows[take]] = res.steps[take]
        best.pred[rows[take]] = res.pred[take]
        best.correct[rows[fooled]] = False
    return best


@dataclass
class Outcome:
    """Per-example robustness of one attack at one eps, on a fixed set of examples."""

    attack: str
    eps: float                  # in units of 1/255; 0 for clean accuracy
    robust: torch.Tensor        # (N,) bool: correctly classified under the attack
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.robust.float().mean().item() * 100.0


@torch.no_grad()
def logit_predictions(model, images: torch.Tensor, batch: int, device) -> torch.Tensor:
    """Arg-max of ``model(x)`` for uint8 images, (N,) on the CPU."""
    out = []
    with eval_mode(model):
        for s in range(0, len(images), batch):
            out.append(model(to_device(images[s:s + batch], device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def adaptive_sweep(model, data: ImageData, attack: str, epsilons, iterations: int,
                   restarts: int, seed: int, batch: int, device,
                   eps_indices: list[int] | None = None, step: float = 2.0 / 255,
                   clean: torch.Tensor | None = None) -> list[Outcome]:
    """PGD with ``ADAPTIVE_LOSSES[attack]`` at every eps, on the examples correct when clean.

    ``eps_indices[e]`` is the position of ``epsilons[e]`` in the paper's grid: with the same
    seed, every example then starts each restart from the same point as in the paper's sweep,
    so the two attacks differ only in the loss and the restart rule.
    """
    device = torch.device(device)
    loss_fn = ADAPTIVE_LOSSES[attack]
    eps_indices = list(range(len(epsilons))) if eps_indices is None else eps_indices
    labels = data.labels
    if clean is None:
        clean = logit_predictions(model, data.images, batch, device) == labels
    attackable = clean.nonzero().flatten()
    outcomes = []
    for eps, e in zip(epsilons, eps_indices):
        start = time.time()
        robust = clean.clone()
        for s in progress(range(0, len(attackable), batch), desc=f"{attack} eps {eps:g}/255",
                          leave=False):
            rows = attackable[s:s + batch]
            x = to_device(data.images[rows], device)
            y = labels[rows].to(device)
            keys = data.indices[rows]
            res = pgd_fooled_wins(
                model, x, y, eps / 255, step, iterations, restarts,
                lambda r, sub, k=keys, ei=e: start_keys(seed, ei, r, k[sub.cpu()]), loss_fn)
            robust[rows] = res.correct.cpu()
        outcomes.append(Outcome(attack, eps, robust, time.time() - start))
        log.info("%s eps %g/255: %.2f%% robust on %d images (%.0fs)", attack, eps,
                 outcomes[-1].accuracy, len(labels), outcomes[-1].seconds)
    return outcomes


def import_autoattack():
    """``pyautoattack.AutoAttack``, or a UsageError with the install hint."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:
        raise UsageError(AUTOATTACK_HINT) from exc
    return AutoAttack


def run_autoattack(model, data: ImageData, eps: float, seed: int, batch: int, device,
                   version: str = "standard", attacks: list[str] | None = None,
                   iterations: int | None = None) -> Outcome:
    """AutoAttack l-inf at ``eps`` (units of 1/255) on ``model``'s logits, all of ``data``.

    AutoAttack's adversarial images are checked here, not trusted: an example counts as
    broken only if its returned image lies in the eps-ball and in [0, 1] and the model's
    logit arg-max on it is wrong. ``version='custom'`` with ``attacks`` and ``iterations``
    gives quick runs (tests); the reported evaluation uses the standard version.
    """
    AutoAttack = import_autoattack()
    device = torch.device(device)
    num_classes = data.num_classes
    if version == "standard" and num_classes < 4:
        raise UsageError(f"AutoAttack's standard version needs at least 4 classes (its "
                         f"targeted DLR loss uses the 4th logit); this data set has "
                         f"{num_classes}")
    kwargs = {"attacks": attacks} if version == "custom" else {}
    adversary = AutoAttack(model, norm="Linf", eps=eps / 255, version=version, device=device,
                           seed=seed, **kwargs)
    targets = min(9, num_classes - 1)  # standard uses 9 target classes: all of CIFAR-10's
    adversary.apgd_targeted.n_target_classes = targets
    adversary.fab.n_target_classes = targets
    if iterations is not None:
        adversary.fab.n_iter = iterations
        for apgd in (adversary.apgd, adversary.apgd_targeted):
            # APGD derives its step-size checkpoints from n_iter at construction
            apgd.n_iter = apgd.n_iter_orig = iterations
            apgd.n_iter_2 = max(int(0.22 * iterations), 1)
            apgd.n_iter_min = max(int(0.06 * iterations), 1)
            apgd.size_decr = max(int(0.03 * iterations), 1)
    x = to_device(data.images, device).contiguous()
    y = data.labels.to(device)
    start = time.time()
    with eval_mode(model), _forward_autoattack_log():
        x_adv, y_aa = adversary.run_standard_evaluation(x, y, batch_size=batch)
        robust = _verified_robust(model, x, x_adv, y, eps / 255, batch)
    outcome = Outcome("autoattack", eps, robust.cpu(), time.time() - start)
    if not torch.equal(robust.cpu(), (y_aa == y).cpu()):
        log.warning("AutoAttack's own count (%d robust) differs from the re-check of its "
                    "images (%d robust); the re-check is reported",
                    int((y_aa == y).sum()), int(robust.sum()))
    log.info("AutoAttack (%s) eps %g/255: %.2f%% robust on %d images (%.0fs)", version, eps,
             outcome.accuracy, len(y), outcome.seconds)
    return outcome


@torch.no_grad()
def _verified_robust(model, x, x_adv, y, eps: float, batch: int) -> torch.Tensor:
    """(N,) bool: not broken by ``x_adv`` (a valid, misclassified image breaks)."""
    linf = (x_adv - x).flatten(1).abs().amax(1)
    valid = (linf <= eps + 1e-6) & (x_adv.flatten(1).amin(1) >= 0) & \
        (x_adv.flatten(1).amax(1) <= 1)
    if not valid.all():
        log.warning("AutoAttack returned %d image(s) outside the eps-ball or [0, 1]; they "
                    "count as not broken", int((~valid).sum()))
    pred = torch.cat([model(x_adv[s:s + batch]).argmax(1) for s in range(0, len(x), batch)])
    return (pred == y) | ~valid


class _Forward(logging.Handler):
    def emit(self, record):
        log.info("AutoAttack: %s", record.getMessage())


@contextlib.contextmanager
def _forward_autoattack_log():
    """Show pyautoattack's progress lines (it logs them at DEBUG) in this project's log."""
    logger = logging.getLogger("auto-attack")
    saved = (logger.level, logger.propagate)
    handler = _Forward()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
