"""The strong evaluation next to the paper's: strong attacks, one table, masking checks.

``--strong`` (PGD-CE and PGD-DLR on the proper logit) and ``--autoattack`` run after the
paper's PGD sweep, on the same test images (or ``--strong-subset N`` of them), and write
``attack_results_strong.csv``, ``diagnostics.json`` and ``robustness.png`` with every curve,
as docs/evaluation.md describes.
"""
from __future__ import annotations

import json
import logging
import os
import time

import torch

from base.io import write_text_atomic
from datasets.data import ImageData, balanced_subset
from utils.attacks.adaptive import adaptive_attacks, autoattack_unit, logit_dlr_loss
from utils.attacks.gradient_masking import GAP_THRESHOLD, gradient_summary, robustness_gaps
from utils.attacks.pgd import EPSILONS, STEP, logit_ce_loss, paper_loss
from utils.attacks.sweep import AttackContext, Outcome, predictions, sweep
from utils.eval.adversarial_store import save_adversarial
from utils.eval.eval_state import EvalState
from utils.eval.evaluation import AttackConfig, SweepResult, plot_robustness
from utils.outputs import files
from utils.outputs.results import write_csv

log = logging.getLogger("clustr")

DIAGNOSTIC_EPS = 8.0  # the random start of the gradient diagnostics, units of 1/255


def evaluate_strong(model, test: ImageData, paper: SweepResult, attack: AttackConfig,
                    out_dir: str, device, state=None) -> dict:
    """Strong attacks on the images the paper's sweep attacked, in batches of
    ``attack.attack_batch``; returns the diagnostics. ``state`` keeps their progress for
    ``--resume``."""
    device = torch.device(device)
    sub, pos = strong_images(test, attack.strong_subset, attack.seed)
    batch = attack.attack_batch
    ctx = AttackContext(model, sub, device, batch, attack.seed, state=state or EvalState(),
                        keep_adv=attack.save_adv)
    start = time.time()
    clean_pred = predictions(model, sub.images, attack.test_batch, device, logits=True)
    clean = clean_pred == sub.labels
    outcomes = [Outcome("clean", 0.0, clean, time.time() - start)]
    full = len(pos) == len(test)
    for r in paper.per_eps:
        outcomes.append(Outcome("paper-pgd", r.eps, r.pred[pos] == sub.labels,
                                r.seconds if full else float("nan")))
    if attack.strong:
        for pgd in adaptive_attacks(attack.iterations, attack.restarts):
            outcomes += sweep(ctx, pgd, EPSILONS, clean_pred)
    if attack.autoattack:
        log_path = os.path.join(out_dir, files.AUTOATTACK_LOG)
        outcomes += [autoattack_unit(ctx, eps, i, log_path)
                     for i, eps in enumerate(attack.autoattack_eps)]
    outcomes += worst_case(outcomes, clean)
    write_table(outcomes, len(sub), os.path.join(out_dir, files.STRONG_RESULTS))
    diagnostics = masking_diagnostics(attack, model, sub, outcomes, device, batch)
    # the paper's scores and the logit must agree on the clean predictions
    disagree = int((paper.clean_pred[pos] != clean_pred).sum())
    diagnostics["clean_prediction_disagreements"] = disagree
    if disagree:
        log.warning("WARNING: the logit's and the paper scores' arg-max differ on %d clean "
                    "image(s) (scores underflowing to 0?)", disagree)
    packages = sorted({o.package for o in outcomes if o.package})
    diagnostics["settings"]["autoattack_package"] = ", ".join(packages) or None
    write_text_atomic(os.path.join(out_dir, files.DIAGNOSTICS),
                      json.dumps(diagnostics, indent=2) + "\n")
    if attack.save_adv:
        save_adversarial(os.path.join(out_dir, files.ADVERSARIAL), model, test, paper,
                         sub, outcomes, batch, device)
    plot_all(paper, outcomes, len(sub), full, os.path.join(out_dir, files.PLOT))
    return diagnostics


def strong_images(test: ImageData, n: int | None, seed: int) -> tuple[ImageData, torch.Tensor]:
    """The images to attack and their positions in ``test``."""
    sub = balanced_subset(test, n, seed)
    where = {int(i): p for p, i in enumerate(test.indices.tolist())}
    return sub, torch.tensor([where[int(i)] for i in sub.indices], dtype=torch.long)


def worst_case(outcomes: list[Outcome], clean: torch.Tensor) -> list[Outcome]:
    """Per eps, robust only if correct when clean and robust to every attack run at it."""
    out = []
    for eps in sorted({o.eps for o in outcomes if o.eps > 0}):
        robust = clean.clone()
        for o in outcomes:
            if o.eps == eps:
                robust &= o.robust
        out.append(Outcome("worst-case", eps, robust, float("nan")))
    return out


def write_table(outcomes: list[Outcome], n: int, path: str) -> None:
    rows = [[f"{o.eps:g}", o.attack, f"{o.accuracy:.2f}", n,
             "" if o.seconds != o.seconds else f"{o.seconds:.1f}"]  # NaN: not measured here
            for o in sorted(outcomes, key=lambda o: o.eps)]
    write_csv(path, ["epsilon", "attack", "robust_accuracy", "examples", "seconds"], rows)


def masking_diagnostics(attack: AttackConfig, model, sub: ImageData, outcomes: list[Outcome],
                        device, batch: int) -> dict:
    losses = {"paper": paper_loss, "pgd-ce": logit_ce_loss, "pgd-dlr": logit_dlr_loss}
    grads = gradient_summary(model, sub, losses, batch, device, DIAGNOSTIC_EPS, attack.seed,
                             EPSILONS.index(DIAGNOSTIC_EPS))
    for point, stats in grads.items():
        log.info("input gradients at %s: %s", point, ", ".join(
            f"{name} {100 * s['zero_fraction']:.1f}% exactly zero (median l1 "
            f"{s['median_l1']:.3g})" for name, s in stats.items()))
    gaps, warnings = robustness_gaps(outcomes, GAP_THRESHOLD)
    for w in warnings:
        log.warning("WARNING: %s", w)
    return {
        "examples": len(sub),
        "image_indices": [int(i) for i in sub.indices],
        "settings": {"iterations": attack.iterations, "restarts": attack.restarts,
                     "step": STEP * 255, "seed": attack.seed,
                     "strong": bool(attack.strong), "autoattack": bool(attack.autoattack),
                     "autoattack_eps": list(attack.autoattack_eps) if attack.autoattack else [],
                     "L": getattr(getattr(model, "head", None), "L", None),
                     "normalize": getattr(getattr(model, "head", None), "normalize", None)},
        "input_gradients": grads,
        "gap_threshold": GAP_THRESHOLD,
        "paper_vs_strongest": gaps,
        "warnings": warnings,
    }


def plot_all(paper: SweepResult, outcomes: list[Outcome], n: int, full: bool, path: str) -> None:
    curves = {"paper PGD": [(0.0, paper.clean_acc)] + [(r.eps, r.accuracy)
                                                       for r in paper.per_eps]}
    suffix = "" if full else f" ({n} images)"
    clean = next(o.accuracy for o in outcomes if o.attack == "clean")
    for name in ("pgd-ce", "pgd-dlr", "autoattack", "worst-case"):
        points = [(o.eps, o.accuracy) for o in outcomes if o.attack == name]
        if points:
            curves[name + suffix] = [(0.0, clean)] + points
    plot_robustness(path, curves)
