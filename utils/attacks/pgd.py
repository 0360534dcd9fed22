"""The paper's attack: l-inf PGD on the cluster scores, its eps grid, step and restart rule.

Read top to bottom: the attacked loss (``paper_loss``), the sweep's ``EPSILONS`` and
``STEP``, the attack's settings (``PGD``), the random start, one restart (``pgd_restart``)
and the rule that merges restarts (``kept``). ``utils.attacks.sweep`` runs it over the test
set at every eps, saving its progress for ``--resume``.

The model runs in eval mode (the caller's mode is restored) and gradients are taken for the
input only. Every perturbation stays in the eps-ball with x + delta in [0, 1] (the
original's random start did not clip to the image range). The paper's restart rule is kept
for faithfulness although its loss does not track misclassification, so a later restart can
replace a successful perturbation. An example's random start depends only on (seed, eps
index, restart, example index): not on the batch it falls in, nor on the device.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from base.tensors import eval_mode

# loss_fn(model, x, y) -> (per-example loss (N,), class scores whose arg-max predicts (N, C))
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

EPSILONS = (2.0, 8.0, 16.0, 25.5)  # the paper's sweep, in units of 1/255
STEP = 2.0 / 255                   # its step, in pixel units


def paper_loss(model, x, y):
    """The original's attacked quantity: cross-entropy on the bounded cluster class scores."""
    scores = model.paper_scores(x)
    return F.cross_entropy(scores, y, reduction="none"), scores


def logit_ce_loss(model, x, y):
    """Cross-entropy on the model's logits (``forward``)."""
    logits = model(x)
    return F.cross_entropy(logits, y, reduction="none"), logits


@dataclass(frozen=True)
class PGD:
    """One PGD attack as the sweep runs it at each eps: loss, step, budget and restart rule.
    The defaults, with the evaluation's ``iterations`` and ``restarts``, are the paper's."""

    name: str = "pgd"           # names its units in the resume state and its log lines
    loss_fn: LossFn = paper_loss
    iterations: int = 20
    restarts: int = 10
    step: float = STEP
    fooled_wins: bool = False   # the restart rule (``kept``)
    shrink: bool = True         # drop the examples already fooled from the step's batch
    title: str = "PGD"          # in log lines and stop messages


@dataclass
class AttackResult:
    delta: torch.Tensor | None  # (N, 3, H, W) kept perturbation (None: not kept)
    loss: torch.Tensor        # (N,) loss of the kept perturbation
    pred: torch.Tensor        # (N,) arg-max of the loss's class scores under it
    correct: torch.Tensor     # (N,) bool, pred == y
    steps: torch.Tensor       # (N,) gradient steps applied to the kept perturbation


# devices on which the shrinking active set is padded to a power of two (see padded_rows)
PADDED_DEVICES = {"cuda"}


def random_start(x: torch.Tensor, eps: float, keys: list[int]) -> torch.Tensor:
    """Uniform noise in the eps-ball, one CPU generator per example key, clipped to [0, 1]."""
    noise = torch.empty(x.shape, dtype=torch.float32)
    gen = torch.Generator()
    for i, key in enumerate(keys):
        gen.manual_seed(key)
        noise[i].uniform_(-eps, eps, generator=gen)
    noise = noise.to(x.device, x.dtype)
    return (x + noise).clamp(0.0, 1.0) - x


def start_keys(seed: int, eps_index: int, restart: int, indices: torch.Tensor) -> list[int]:
    """Seeds of the per-example random starts: a deterministic mix, below 2**62."""
    base = ((seed * 1_000_003 + eps_index) * 10_007 + restart) * 1_000_000_007
    return [(base + int(i)) % (1 << 62) for i in indices.tolist()]


def pgd_restart(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                attack: PGD, keys: list[int]) -> AttackResult:
    """One restart: random start from ``keys``, ``attack.iterations`` signed-gradient steps,
    final loss and scores. ``utils.attacks.sweep`` runs it restart after restart over all
    the batches and merges each restart with ``kept``."""
    with eval_mode(model):
        delta = random_start(x, eps, keys)
        delta, steps = _ascend(model, x, y, delta, eps, attack)
        with torch.no_grad():
            loss, scores = attack.loss_fn(model, x + delta, y)
    pred = scores.argmax(1)
    return AttackResult(delta, loss, pred, pred == y, steps)


def kept(best_loss: torch.Tensor, res: AttackResult, fooled_wins: bool = False) -> torch.Tensor:
    """The restart rule: the (N,) mask of the examples that take this restart's perturbation.
    The paper's: the highest loss so far, ties to the later restart. ``fooled_wins`` (the
    adaptive attacks, as AutoAttack does): also every example this restart fools; such an
    example is not attacked again (``utils.attacks.sweep`` skips it)."""
    take = res.loss >= best_loss
    return take | ~res.correct if fooled_wins else take


def _ascend(model, x, y, delta, eps, attack: PGD):
    """Signed-gradient ascent from ``delta``; each step moves only the examples still
    classified correctly. Returns the final delta and the steps each example took."""
    steps = torch.zeros(len(x), dtype=torch.long, device=x.device)
    everyone = torch.arange(len(x), device=x.device)
    active = everyone  # rows still classified correctly at the last check
    loss_fn, step = attack.loss_fn, attack.step
    for _ in range(attack.iterations):
        if not attack.shrink:
            rows, movable = everyone, None
        elif x.device.type in PADDED_DEVICES:
            rows, movable = padded_rows(active, len(x))
        else:
            rows, movable = active, None
        d = delta[rows].requires_grad_(True)
        loss, scores = loss_fn(model, x[rows] + d, y[rows])
        still = scores.argmax(1) == y[rows]
        if movable is not None:
            still &= movable
        if not still.any():
            break
        # gradient with respect to the input only: parameter .grad is never touched
        grad, = torch.autograd.grad(loss.sum(), d)
        moved = rows[still]
        delta[moved] = project_linf(x[moved], d.detach()[still] + step * grad[still].sign(), eps)
        steps[moved] += 1
        active = moved
    return delta, steps


def padded_rows(active: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``active`` padded with other rows to the next power of two (at most ``n``), and the
    mask of the active ones. On a GPU every new batch shape costs a kernel selection, so the
    shrinking set keeps to a few shapes; the padding rows are evaluated but never moved."""
    size = min(n, 1 << max(len(active) - 1, 0).bit_length())
    if size == len(active):
        return active, None
    others = torch.ones(n, dtype=torch.bool, device=active.device)
    others[active] = False
    pad = others.nonzero().flatten()[:size - len(active)]
    movable = torch.zeros(size, dtype=torch.bool, device=active.device)
    movable[:len(active)] = True
    return torch.cat([active, pad]), movable


def project_linf(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Into the eps-ball, then so that x + delta stays in [0, 1]."""
    delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(0.0, 1.0) - x


def in_threat_model(x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> torch.Tensor:
    """(N,) bool: ``x_adv`` in the eps-ball around ``x`` (up to 1e-6 of float rounding) and in
    [0, 1]; what an attack's returned images are checked against before they count."""
    flat = x_adv.flatten(1)
    return (((flat - x.flatten(1)).abs().amax(1) <= eps + 1e-6) & (flat.amin(1) >= 0)
            & (flat.amax(1) <= 1))
