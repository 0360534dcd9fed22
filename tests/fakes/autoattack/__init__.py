"""A stand-in for the AutoAttack authors' GitHub package (fra31/auto-attack), which is not on
PyPI and so cannot be installed here. It has that package's documented call signature:

    AutoAttack(model, norm='Linf', eps=.3, seed=None, verbose=True, attacks_to_run=[],
               version='standard', is_tf_model=False, device='cuda', log_path=None)
    run_standard_evaluation(x_orig, y_orig, bs=250, return_labels=False) -> x_adv

records every call (JSON lines in $FAKE_AUTOATTACK_CALLS) and returns a plausible result:
one signed-gradient step of eps on the cross-entropy of the logits (FGSM), in the ball and
in [0, 1]. Tests only.
"""
import json
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

__version__ = "0.1-fake"


def _record(**call):
    path = os.environ.get("FAKE_AUTOATTACK_CALLS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(call) + "\n")


class AutoAttack:
    def __init__(self, model, norm="Linf", eps=.3, seed=None, verbose=True,
                 attacks_to_run=[],  # noqa: B006 (the GitHub package's own default)
                 version="standard", is_tf_model=False, device="cuda", log_path=None):
        self.model, self.norm, self.epsilon, self.seed = model, norm, eps, seed
        self.version, self.device, self.log_path = version, device, log_path
        self.attacks_to_run = ["apgd-ce", "apgd-t", "fab-t", "square"]
        self.apgd = SimpleNamespace(n_target_classes=9, n_iter=100)
        self.apgd_targeted = SimpleNamespace(n_target_classes=9, n_iter=100)
        self.fab = SimpleNamespace(n_target_classes=9, n_iter=100)
        _record(call="AutoAttack", norm=norm, eps=eps, seed=seed, version=version,
                device=str(device), log_path=log_path, positional_model=True)

    def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False):
        _record(call="run_standard_evaluation", n=len(x_orig), bs=bs,
                return_labels=return_labels, apgd_t_targets=self.apgd_targeted.n_target_classes)
        x = x_orig.clone().requires_grad_(True)
        loss = F.cross_entropy(self.model(x), y_orig)
        grad, = torch.autograd.grad(loss, x)
        x_adv = (x_orig + self.epsilon * grad.sign()).clamp(0.0, 1.0).detach()
        with torch.no_grad():
            y_adv = self.model(x_adv).argmax(1)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(f"robust accuracy: {(y_adv == y_orig).float().mean().item():.2%}\n")
        return (x_adv, y_adv) if return_labels else x_adv
