"""The perturbation state of "free" adversarial training (Shafahi et al., NeurIPS 2019).

With ``--minibatch-replays M`` every batch is replayed M times (docs/usage.md); each replay
trains on x + delta, and its ONE backward gives both the optimiser step and delta's signed
step of eps. As the original, delta carries over from batch to batch and is zero at every
epoch's start; unlike it, delta carried to a new batch is first projected to that batch's
image range (docs/differences.md).
"""
from __future__ import annotations

import torch

from utils.attacks.pgd import project_linf
from utils.train.consistency import RADIUS


class FreePerturbation:
    """Owns delta (B, 3, H, W) across batches; ``perturb`` then ``step`` once per replay. A
    batch smaller than B uses and updates delta's leading rows only."""

    def __init__(self):
        self.delta: torch.Tensor | None = None  # (B, 3, H, W), B = the largest batch so far
        self._leaf: torch.Tensor | None = None  # this replay's delta, with its gradient

    def reset(self) -> None:
        """delta = 0 again (the start of an epoch)."""
        self.delta, self._leaf = None, None

    def current(self, x: torch.Tensor) -> torch.Tensor:
        """x + the delta after the last step, detached (for the sampler's loss forward)."""
        return (x if self.delta is None else x + self.delta[:len(x)]).detach()

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
        return project_linf(x.detach(), delta, RADIUS)

    def step(self, x: torch.Tensor) -> None:
        """After the training backward: delta takes a signed step of eps and is projected."""
        leaf, self._leaf = self._leaf, None
        if leaf is None or leaf.grad is None:
            raise RuntimeError("FreePerturbation.step needs perturb() and a backward first")
        n = len(leaf)
        new = project_linf(x.detach(), leaf.detach() + RADIUS * leaf.grad.sign(), RADIUS)
        self.delta[:n] = new
