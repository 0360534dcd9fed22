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
  ``autoattack`` (GitHub) or ``pyautoattack`` package (``run_autoattack``).

An example counts as fooled when the logit's arg-max differs from its label.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from base import preemption
from base.errors import UsageError
from base.progress import progress
from base.tensors import eval_mode, to_device
from datasets.data import ImageData, to_float
from utils.attacks.autoattack_backend import HINT, find_backend, make_adversary, run_adversary
from utils.attacks.pgd import AttackResult, LossFn, initial_best, logit_ce_loss, pgd, start_keys

log = logging.getLogger("clustr")

AUTOATTACK_HINT = HINT


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
    best = initial_best(x, y)
    for restart in range(restarts):
        fooled_wins_restart(model, x, y, best, eps, step, iterations,
                            lambda rows, r=restart: keys_fn(r, rows), loss_fn, shrink)
    return best


def fooled_wins_restart(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                        best: AttackResult, eps: float, step: float, iterations: int,
                        keys_fn: Callable[[torch.Tensor], list[int]], loss_fn: LossFn,
                        shrink: bool = True) -> None:
    """One restart of ``pgd_fooled_wins`` on the rows of ``best`` still robust, merged into
    ``best`` in place (``best.delta`` may be None: not kept)."""
    rows = best.correct.nonzero().flatten()                             # still robust
    if len(rows) == 0:
        return
    res = pgd(model, x[rows], y[rows], eps, step, iterations, 1,
              lambda _r: keys_fn(rows), loss_fn, shrink)
    fooled = ~res.correct
    take = fooled | (res.loss >= best.loss[rows])
    if best.delta is not None:
        best.delta[rows[take]] = res.delta[take]
    best.loss[rows[take]] = res.loss[take]
    best.steps[rows[take]] = res.steps[take]
    best.pred[rows[take]] = res.pred[take]
    best.correct[rows[fooled]] = False


@dataclass
class Outcome:
    """Per-example robustness of one attack at one eps, on a fixed set of examples."""

    attack: str
    eps: float                  # in units of 1/255; 0 for clean accuracy
    robust: torch.Tensor        # (N,) bool: correctly classified under the attack
    seconds: float = 0.0
    # with --save-adv: (rows (k,) into the data set, images (k, 3, H, W)) that fooled it
    adv: tuple[torch.Tensor, torch.Tensor] | None = None
    package: str = ""           # AutoAttack: the package and version that ran

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
                   clean: torch.Tensor | None = None, state=None,
                   keep_adv: bool = False) -> list[Outcome]:
    """PGD with ``ADAPTIVE_LOSSES[attack]`` at every eps, on the examples correct when clean.

    ``eps_indices[e]`` is the position of ``epsilons[e]`` in the paper's grid: with the same
    seed, every example then starts each restart from the same point as in the paper's sweep,
    so the two attacks differ only in the loss and the restart rule. Each restart runs over
    all the examples before the next, its progress saved in ``state`` (a
    ``utils.eval.eval_state.EvalState``) as unit ``<attack>/<eps index>``; with ``keep_adv`` the
    outcomes keep the adversarial images that fooled the model.
    """
    device = torch.device(device)
    eps_indices = list(range(len(epsilons))) if eps_indices is None else eps_indices
    labels = data.labels
    if clean is None:
        clean = logit_predictions(model, data.images, batch, device) == labels
    outcomes = []
    for eps, e in zip(epsilons, eps_indices):
        outcomes.append(_adaptive_eps(model, data, attack, eps, e, iterations, restarts, seed,
                                      batch, device, step, clean, state, keep_adv))
        log.info("%s eps %g/255: %.2f%% robust on %d images (%.0fs)", attack, eps,
                 outcomes[-1].accuracy, len(labels), outcomes[-1].seconds)
        preemption.point(f"{attack}-eps-{e}")
        if preemption.should_stop():
            raise preemption.stop(f"after {attack} eps {eps:g}/255")
    return outcomes


def _adaptive_eps(model, data, attack, eps, e, iterations, restarts, seed, batch, device,
                  step, clean, state, keep_adv) -> Outcome:
    key = f"{attack}/{e}"
    unit = state.get(key) if state is not None else None
    if unit is not None and unit["done"]:
        return Outcome(attack, eps, unit["robust"], unit["seconds"], _adv_of(unit))
    attackable = clean.nonzero().flatten()
    n = len(attackable)
    if unit is None:
        unit = {"done": False, "restart": 0, "batch": 0, "seconds": 0.0,
                "loss": torch.full((n,), -float("inf")), "pred": data.labels[attackable].clone(),
                "correct": torch.ones(n, dtype=torch.bool),
                "steps": torch.zeros(n, dtype=torch.long)}
        if keep_adv:
            unit["delta"] = torch.zeros((n,) + tuple(data.images.shape[1:]))
    begin, before = time.perf_counter(), unit["seconds"]
    n_batches = -(-n // batch)

    def save(restart: int, b: int) -> None:
        unit.update(restart=restart, batch=b, seconds=before + time.perf_counter() - begin)
        if state is not None:
            state.put(key, unit)

    first_restart, first_batch = unit["restart"], unit["batch"]
    for r in range(first_restart, restarts):
        bar = progress(range(first_batch if r == first_restart else 0, n_batches),
                       desc=f"{attack} eps {eps:g}/255 restart {r + 1}/{restarts}", leave=False)
        for b in bar:
            pos = torch.arange(b * batch, min((b + 1) * batch, n))
            _adaptive_batch(model, data, attack, unit, attackable[pos], pos, eps, e, r, seed,
                            iterations, step, device)
            if b + 1 < n_batches and preemption.should_stop():
                save(r, b + 1)
                raise preemption.stop(f"in {attack} eps {eps:g}/255, restart {r + 1}")
        save(r + 1, 0)
        preemption.point(f"{attack}-restart-{e}-{r}")
        if r + 1 < restarts and preemption.should_stop():
            raise preemption.stop(f"after {attack} eps {eps:g}/255, restart {r + 1}")
    robust = clean.clone()
    robust[attackable] = unit["correct"]
    done = {"done": True, "robust": robust, "seconds": before + time.perf_counter() - begin}
    if keep_adv:
        fooled = (~unit["correct"]).nonzero().flatten()
        done["adv_rows"] = attackable[fooled]
        done["adv_images"] = (to_float(data.images[attackable[fooled]])
                              + unit["delta"][fooled]).clamp(0.0, 1.0)
    if state is not None:
        state.put(key, done)
    return Outcome(attack, eps, robust, done["seconds"], _adv_of(done))


def _adaptive_batch(model, data, attack, unit, rows, pos, eps, e, r, seed, iterations, step,
                    device) -> None:
    """Restart ``r`` of the fooled-wins PGD on one batch (``rows`` of the data set,
    ``pos`` in the unit's arrays), merged into the unit."""
    x = to_device(data.images[rows], device)
    y = data.labels[rows].to(device)
    keys = data.indices[rows]
    best = AttackResult(delta=unit["delta"][pos].to(device) if "delta" in unit else None,
                        loss=unit["loss"][pos].to(device), pred=unit["pred"][pos].to(device),
                        correct=unit["correct"][pos].to(device),
                        steps=unit["steps"][pos].to(device))
    fooled_wins_restart(model, x, y, best, eps / 255, step, iterations,
                        lambda sub, k=keys: start_keys(seed, e, r, k[sub.cpu()]),
                        ADAPTIVE_LOSSES[attack])
    for name in ("loss", "pred", "correct", "steps") + (("delta",) if "delta" in unit else ()):
        unit[name][pos] = getattr(best, name).cpu()


def _adv_of(unit: dict):
    return (unit["adv_rows"], unit["adv_images"]) if "adv_rows" in unit else None


def run_autoattack(model, data: ImageData, eps: float, seed: int, batch: int, device,
                   version: str = "standard", attacks: list[str] | None = None,
                   iterations: int | None = None, keep_adv: bool = False,
                   log_path: str | None = None) -> Outcome:
    """AutoAttack l-inf at ``eps`` (units of 1/255) on ``model``'s logits, all of ``data``,
    from the GitHub ``autoattack`` package when installed, else ``pyautoattack``
    (``utils.attacks.autoattack_backend``; ``Outcome.package`` names the one used).

    AutoAttack's adversarial images are checked here, not trusted: an example counts as
    broken only if its returned image lies in the eps-ball and in [0, 1] and the model's
    logit arg-max on it is wrong. ``version='custom'`` with ``attacks`` and ``iterations``
    gives quick runs (tests); the reported evaluation uses the standard version.
    """
    backend = find_backend()
    device = torch.device(device)
    num_classes = data.num_classes
    if version == "standard" and num_classes < 4:
        raise UsageError(f"AutoAttack's standard version needs at least 4 classes (its "
                         f"targeted DLR loss uses the 4th logit); this data set has "
                         f"{num_classes}")
    adversary = make_adversary(backend, _Watched(model), eps / 255, version, device, seed,
                               attacks, log_path)
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
    with eval_mode(model):
        x_adv = run_adversary(backend, adversary, x, y, batch)
        robust = _verified_robust(model, x, x_adv, y, eps / 255, batch)
    adv = None
    if keep_adv:
        rows = (~robust).nonzero().flatten()
        adv = (rows.cpu(), x_adv[rows].detach().float().cpu())
    outcome = Outcome("autoattack", eps, robust.cpu(), time.time() - start, adv,
                      backend.describe())
    log.info("AutoAttack (%s, %s) eps %g/255: %.2f%% robust on %d images (%.0fs)", version,
             backend.describe(), eps, outcome.accuracy, len(y), outcome.seconds)
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
