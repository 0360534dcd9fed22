"""Gradient-masking diagnostics: does the paper's loss give the attack anything to follow?

Two symptoms, after the checks of AutoAttack's authors (``checks.py``):

* **Vanishing gradients.** The paper's class scores exp(-d^2/2sigma^2) underflow to exactly
  0 far from every cluster; the cross-entropy's input gradient is then exactly zero and
  sign-PGD cannot move (``gradient_summary``: the share of exactly-zero gradients per loss).
* **A robustness gap.** Where the loss saturates without vanishing, PGD wanders away from
  every cluster without crossing a decision boundary (``robustness_gaps``: the paper PGD's
  accuracy against the worst case of every attack on the same examples).
"""
from __future__ import annotations

import torch

from base.tensors import eval_mode, to_device
from datasets.data import ImageData
from utils.attacks.pgd import LossFn, random_start, start_keys

GAP_THRESHOLD = 5.0  # percentage points


def input_gradients(model, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """d loss_n / d x_n for every example (the model runs in eval mode: examples are
    independent, so one backward of the summed loss gives each example's own gradient)."""
    with eval_mode(model):
        x = x.detach().clone().requires_grad_(True)
        loss, _ = loss_fn(model, x, y)
        grad, = torch.autograd.grad(loss.sum(), x)
    return grad


def gradient_summary(model, data: ImageData, losses: dict[str, LossFn], batch: int, device,
                     start_eps: float | None = None, seed: int = 111,
                     eps_index: int = 0) -> dict:
    """``{point: {loss name: stats}}`` for the clean images and, with ``start_eps`` (units of
    1/255), at the first restart's random start of the sweeps at that eps. The stats: the
    fraction of examples whose input gradient is exactly zero, and its median l1 norm."""
    device = torch.device(device)
    points = {"clean": None}
    if start_eps is not None:
        points[f"random start {start_eps:g}/255"] = start_eps
    summary = {}
    for point, eps in points.items():
        grads = {name: [] for name in losses}
        for s in range(0, len(data), batch):
            x = to_device(data.images[s:s + batch], device)
            y = data.labels[s:s + batch].to(device)
            if eps is not None:
                keys = start_keys(seed, eps_index, 0, data.indices[s:s + batch])
                x = x + random_start(x, eps / 255, keys)
            for name, loss_fn in losses.items():
                grads[name].append(input_gradients(model, x, y, loss_fn).cpu())
        l1 = {name: torch.cat(g).flatten(1).abs().sum(1) for name, g in grads.items()}  # (N,)
        summary[point] = {name: {"zero_fraction": (n == 0).float().mean().item(),
                                 "median_l1": n.median().item()} for name, n in l1.items()}
    return summary


def robustness_gaps(outcomes, threshold: float = GAP_THRESHOLD) -> tuple[list[dict], list[str]]:
    """Per eps, the paper PGD's accuracy against the worst case's on the same examples, from
    the strong evaluation's ``Outcome``s. Returns one row per eps (accuracies in %, the gap
    in points, and how many examples only the paper's attack leaves robust) and a warning per
    eps whose gap exceeds ``threshold``."""
    paper = {o.eps: o.robust for o in outcomes if o.attack == "paper-pgd"}
    rows, warnings = [], []
    for worst in sorted((o for o in outcomes if o.attack == "worst-case" and o.eps in paper),
                        key=lambda o: o.eps):
        eps, robust = worst.eps, worst.robust
        name = "worst case of " + ", ".join(o.attack for o in outcomes
                                            if o.eps == eps and o.attack != "worst-case")
        p_acc = paper[eps].float().mean().item() * 100.0
        s_acc = robust.float().mean().item() * 100.0
        gap = p_acc - s_acc
        rows.append({"epsilon": eps, "paper_pgd": round(p_acc, 2), "strongest": round(s_acc, 2),
                     "strongest_attack": name, "gap": round(gap, 2),
                     "robust_to_paper_only": int((paper[eps] & ~robust).sum()),
                     "examples": len(robust)})
        if gap > threshold:
            warnings.append(
                f"eps {eps:g}/255: the paper's PGD leaves {p_acc:.2f}% robust but {name} "
                f"leaves {s_acc:.2f}% on the same {len(robust)} images ({gap:.1f} points "
                f"higher): the paper's protocol overstates robustness here (gradient masking)")
    return rows, warnings
