"""The perturbation state of "free" adversarial training (Shafahi et al., NeurIPS 2019).

With ``--minibatch-replays M`` every batch is replayed M times. Each replay trains on
x + delta, and the ONE backward of the training loss gives both the parameter gradients
(the optimiser step) and delta's gradient, with which delta takes a signed step of eps:

    delta <- project(delta + eps * sign(grad_delta))   (eps-ball, and x + delta in [0, 1])

As in the original: delta carries over from batch to batch within an epoch and is set to
zero at the start of every epoch (``reset``); the sampler records the per-example losses of
one extra no-grad forward of the *updated* network on x + the final delta, after the M
replays; the replays train on the Magnet loss alone (no consistency or cross-entropy term).
delta has the shape of a full batch (m*d examples); a smaller batch (a cluster with fewer
than d examples) uses and updates the leading rows only, so the rest keep their values for
the next full batch.

Kept on purpose: delta carried to a new batch is first projected to that batch's image
range, so every input is an image (the original carried it unchanged, so x + delta could
leave [0, 1] on the first replay of a batch).

Steps: as in the original, every replay is an optimiser step, and an epoch keeps its
``len(train set) // (m*d)`` batches, so it makes M times as many steps (and costs about M
times as much) as a plain epoch; the learning-rate milestones still count epochs.
"""
from __future__ import annotations

import torch

from utils.attacks.pgd import project_linf

EPS = 8.0 / 255


class FreePerturbation:
    """Owns delta (B, 3, H, W) across batches; ``perturb`` then ``step`` once per replay."""

    def __init__(self, eps: float = EPS):
        self.eps = eps
        self.delta: torch.Tensor | None = None  # (B, 3, H, W), B = the largest batch so far
        self._leaf: torch.Tensor | None = None  # this replay's delta, with its gradient

    def reset(self) -> None:
        """delta = 0 again (the start of an epoch)."""
        self.delta, self._leaf = None, None

    def current(self, x: torch.Tensor) -> torch.Tensor:
        """x + the delta after the last step, detached (for the sampler's loss forward)."""
        if self.delta is None:
            return x.detach()
        return (x + self.delta[:len(x)]).detach()

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """x + delta for this replay, with delta a leaf that collects its gradient."""
        n = len(x)
        if self.delta is None or self.delta.shape[1:] != x.shape[1:]:
            self.delta = torch.zeros_like(x, memory_format=torch.contiguous_format)
        elif n > len(self.delta):  # a larger batch than ever: grow with zeros
            extra = self.delta.new_zeros((n - len(self.delta),) + tuple(x.shape[1:]))
            self.delta = torch.cat([self.delta, extra])
        self._leaf = self.carried(x, self.delta[:n]).requires_grad_(True)
        return x + self._leaf

    def carried(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """delta carried over from another batch, made valid for these images."""
        return project_linf(x.detach(), delta, self.eps)

    def step(self, x: torch.Tensor) -> None:
        """After the training backward: delta takes a signed step of eps and is projected."""
        leaf, self._leaf = self._leaf, None
        if leaf is None or leaf.grad is None:
            raise RuntimeError("FreePerturbation.step needs perturb() and a backward first")
        n = len(leaf)
        new = project_linf(x.detach(), leaf.detach() + self.eps * leaf.grad.sign(), self.eps)
        self.delta[:n] = new
