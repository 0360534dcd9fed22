"""The perturbation state of "free" adversarial training (Shafahi et al., NeurIPS 2019).

With ``--minibatch-replays M`` every batch is replayed M times. Each replay trains on
x + delta, and the ONE backward of the training loss gives both the parameter gradients
(the optimiser step) and delta's gradient, with which delta takes a signed step of eps:

    delta <- project(delta + eps * sign(grad_delta))   (eps-ball, and x + delta in [0, 1])

As in the original: delta carries over from batch to batch within an epoch and is zero at
the start of every epoch; the sampler records the losses of one extra no-grad forward of the
*updated* network on x + the final delta; the replays train on the Magnet loss alone; every
replay is an optimiser step, so an epoch makes M times as many steps as a plain one (the
learning-rate milestones still count epochs). Kept on purpose: delta carried to a new batch
is first projected to that batch's image range (the original's x + delta could leave
[0, 1] on the first replay of a batch).
"""
from __future__ import annotations

import torch

from utils.attacks.pgd import project_linf

EPS = 8.0 / 255


class FreePerturbation:
    """Owns delta (B, 3, H, W) across batches; ``perturb`` then ``step`` once per replay. A
    batch smaller than B uses and updates delta's leading rows only."""

    def __init__(self, eps: float = EPS):
        self.eps = eps
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
        return project_linf(x.detach(), delta, self.eps)

    def step(self, x: torch.Tensor) -> None:
        """After the training backward: delta takes a signed step of eps and is projected."""
        leaf, self._leaf = self._leaf, None
        if leaf is None or leaf.grad is None:
            raise RuntimeError("FreePerturbation.step needs perturb() and a backward first")
        n = len(leaf)
        new = project_linf(x.detach(), leaf.detach() + self.eps * leaf.grad.sign(), self.eps)
        self.delta[:n] = new
