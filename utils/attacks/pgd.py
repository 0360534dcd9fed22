"""PGD l-inf with restarts, as the ClusTR paper evaluates, correct by construction.

* The model runs in eval mode; the caller's mode is restored afterwards.
* Gradients are taken with ``torch.autograd.grad`` on the input only: parameter ``.grad``
  is never touched.
* Every perturbation stays inside the eps-ball and keeps x + delta inside [0, 1] (the
  original's random start did not clip to the image range).
* At each step only the examples still classified correctly move; with ``shrink=True`` the
  others leave the batch (fewer forward/backward rows), with ``shrink=False`` they are masked.
* After each restart every example keeps the perturbation with the highest loss so far
  (the paper's rule, kept for faithfulness: that loss does not track
  misclassification, so a later restart can replace a successful perturbation).
* The random start of an example depends only on (seed, eps index, restart, example index):
  not on the batch it falls in, nor on the device.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from base.tensors import eval_mode

# loss_fn(model, x, y) -> (per-example loss (N,), class scores whose arg-max predicts (N, C))
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor],
                  tuple[torch.Tensor, torch.Tensor]]


def paper_loss(model, x, y):
    """The original's attacked quantity: cross-entropy on the bounded cluster class scores."""
    scores = model.paper_scores(x)
    return F.cross_entropy(scores, y, reduction="none"), scores


def logit_ce_loss(model, x, y):
    """Cross-entropy on the model's logits (``forward``)."""
    logits = model(x)
    return F.cross_entropy(logits, y, reduction="none"), logits


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


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float,
        iterations: int, restarts: int, keys_fn: Callable[[int], list[int]],
        loss_fn: LossFn = paper_loss, shrink: bool = True) -> AttackResult:
    """l-inf PGD with ``restarts`` random starts; ``keys_fn(restart)`` gives the start seeds.

    ``x`` (N, 3, H, W) in [0, 1]; returns, per example, the perturbation of the restart with
    the highest loss (ties go to the later restart, as in the original).
    """
    if restarts < 1 or iterations < 0:
        raise ValueError(f"pgd needs restarts >= 1 and iterations >= 0, got {restarts} and "
                         f"{iterations}")
    best = initial_best(x, y)
    for restart in range(restarts):
        keep_higher_loss(best, pgd_restart(model, x, y, eps, step, iterations,
                                           keys_fn(restart), loss_fn, shrink))
    best.correct = best.pred == y
    return best


def initial_best(x: torch.Tensor, y: torch.Tensor, with_delta: bool = True) -> AttackResult:
    """What ``pgd`` keeps before its first restart: no perturbation, loss -inf."""
    n, dev = len(x), x.device
    # the loss in x's dtype: restarts merge into it in place (a float64 test model included)
    return AttackResult(delta=torch.zeros_like(x) if with_delta else None,
                        loss=x.new_full((n,), -float("inf")),
                        pred=y.clone(), correct=torch.ones(n, dtype=torch.bool, device=dev),
                        steps=torch.zeros(n, dtype=torch.long, device=dev))


def pgd_restart(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                step: float, iterations: int, keys: list[int], loss_fn: LossFn = paper_loss,
                shrink: bool = True) -> AttackResult:
    """One restart of ``pgd``: random start from ``keys``, ascent, final loss and scores.
    A sweep that saves its progress after every restart calls this over all its batches."""
    with eval_mode(model):
        delta = random_start(x, eps, keys)
        delta, steps = _ascend(model, x, y, delta, eps, step, iterations, loss_fn, shrink)
        with torch.no_grad():
            loss, scores = loss_fn(model, x + delta, y)
    pred = scores.argmax(1)
    return AttackResult(delta, loss, pred, pred == y, steps)


def keep_higher_loss(best: AttackResult, res: AttackResult) -> torch.Tensor:
    """The paper's rule, in place: keep the highest loss so far (ties go to the later
    restart). ``best.delta`` may be None (not kept). Returns the mask of rows replaced."""
    better = res.loss >= best.loss
    if best.delta is not None:
        best.delta[better] = res.delta[better]
    best.loss = torch.where(better, res.loss, best.loss)
    best.pred = torch.where(better, res.pred, best.pred)
    best.steps = torch.where(better, res.steps, best.steps)
    return better


def _ascend(model, x, y, delta, eps, step, iterations, loss_fn, shrink):
    """Signed-gradient ascent from ``delta``; each step moves only the examples still
    classified correctly. Returns the final delta and the steps each example took."""
    steps = torch.zeros(len(x), dtype=torch.long, device=x.device)
    everyone = torch.arange(len(x), device=x.device)
    active = everyone  # rows still classified correctly at the last check
    for _ in range(iterations):
        if not shrink:
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
