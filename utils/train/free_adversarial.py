"""The perturbation state of "free" adversarial training (Shafahi et al., NeurIPS 2019).

With ``--minibatch-replays M`` every batch is replayed M times. Each replay trains on
x + delta, and the ONE backward of the training loss gives both the parameter gradients
(the optimiser step) and delta's gradient, with which delta takes a signed step of eps:

    delta <- project(delta + eps * sign(grad_delta))   (eps-ball, and x + delta in [0, 1])

delta is not reset between batches: it carries over to the next one, as in Free-AT. It
starts at zero and has the shape of a full batch (m*d examples); a smaller batch (a cluster
with fewer than d examples) uses and updates the leading rows only, so the rest keep their
values for the next full batch.

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

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """x + delta for this replay, with delta a leaf that collects its gradient."""
        n = len(x)
        if self.delta is None or self.delta.shape[1:] != x.shape[1:]:
            self.delta = torch.zeros_like(x, memory_format=torch.contiguous_format)
        elif n > len(self.delta):  # a larger batch than ever: grow with zeros
            extra = self.delta.new_zeros((n - len(self.delta),) + tuple(x.shape[1:]))
            self.delta = torch.cat([self.delta, extra])
        # carried over from another batch: make it valid for these images
        self._leaf = project_linf(x.detach(), self.delta[:n], self.eps).requires_grad_(True)
        return x + self._leaf

    def step(self, x: torch.Tensor) -> None:
        """After the training backward: delta takes a signed step of eps and is projected."""
        leaf, self._leaf = self._leaf, None
        if leaf is None or leaf.grad is None:
            raise RuntimeError("FreePerturbation.step needs perturb() and a backward first")
        n = len(leaf)
        new = project_linf(x.detach(), leaf.detach() + self.eps * leaf.grad.sign(), self.eps)
        self.delta[:n] = new
