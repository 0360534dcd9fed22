"""The honest evaluation next to the paper's: strong attacks, one table, masking checks.

``main_clustr.py --strong`` and/or ``--autoattack`` run, after the paper's PGD sweep and on
the same test images (or a fixed, seeded subset of them, ``--strong-subset N``):

* PGD-CE and PGD-DLR on the proper logit, on the paper's eps grid with its step,
  ``--iterations`` and ``--restarts`` (``utils.strong_attacks``);
* AutoAttack (standard) at ``--autoattack-eps`` (default 8/255);

and write, next to ``attack_results_ext.csv``:

* ``attack_results_strong.csv`` -- ``epsilon, attack, robust_accuracy, examples, seconds``
  for the clean images, the paper's PGD restricted to the same images, each strong attack,
  and ``worst-case`` (an example is robust only if every attack at that eps failed);
* ``diagnostics.json`` -- zero-gradient fractions under the paper's and the adaptive losses,
  the paper-versus-strongest gap per eps, and the warnings (also logged);
* ``robustness.png`` redrawn with every curve.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

from datasets.data import ImageData, balanced_subset
from utils import autoattack_backend, preemption
from utils.adversarial_store import ADVERSARIAL_FILE
from utils.attacks import logit_ce_loss, paper_loss
from utils.checkpoint import write_text_atomic
from utils.evaluation import EPSILONS, STEP, SweepResult, plot_robustness
from utils.masking import GAP_THRESHOLD, gradient_summary, robustness_gaps
from utils.results import write_csv
from utils.strong_attacks import (
    ADAPTIVE_LOSSES,
    AUTOATTACK_HINT,
    Outcome,
    adaptive_sweep,
    logit_dlr_loss,
    logit_predictions,
    run_autoattack,
)

log = logging.getLogger("clustr")

STRONG_CSV = "attack_results_strong.csv"
DIAGNOSTICS = "diagnostics.json"
AUTOATTACK_LOG = "autoattack_log.txt"  # the GitHub package's own log (log_path)
DIAGNOSTIC_EPS = 8.0  # the random start of the gradient diagnostics, units of 1/255


def add_strong_arguments(parser: argparse.ArgumentParser) -> None:
    from utils.train_setting import pos_float, pos_int

    g = parser.add_argument_group("honest evaluation (added by this project; off by default)")
    g.add_argument("--strong", action="store_true",
                   help="also attack the proper logit with PGD-CE and PGD-DLR on the paper's "
                        "eps grid, step, --iterations and --restarts; writes "
                        f"{STRONG_CSV} and {DIAGNOSTICS}")
    g.add_argument("--autoattack", action="store_true",
                   help="also run AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, "
                        "Square; needs pyautoattack; about 0.7 s per image on 2 CPU cores "
                        "for a non-robust model, more for a robust one)")
    g.add_argument("--autoattack-eps", type=pos_float, nargs="+", default=[8.0], metavar="E",
                   help="AutoAttack eps values, in units of 1/255")
    g.add_argument("--strong-subset", type=pos_int, default=None, metavar="N",
                   help="run the strong attacks on a seeded, class-balanced subset of N of "
                        "the evaluated test images; without it, all of them")


def check_strong_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse, at parse time (before any training), what the evaluation could not run."""
    if args.autoattack and not autoattack_backend.available():
        parser.error(AUTOATTACK_HINT)
    extras = [flag for flag, given in (("--strong-subset", args.strong_subset is not None),
                                       ("--autoattack-eps", args.autoattack_eps != [8.0]))
              if given]
    if extras and not (args.strong or args.autoattack):
        parser.error(f"{' and '.join(extras)} only apply with --strong or --autoattack")


def evaluate_strong(args, model, test: ImageData, paper: SweepResult, out_dir: str,
                    device, state=None) -> dict:
    """Strong attacks on the images the paper's sweep attacked; returns the diagnostics.
    ``state`` (``utils.eval_state.EvalState``) keeps their progress for ``--resume``."""
    sub, pos = _strong_images(test, args.strong_subset, args.seed)
    batch = args.test_batch
    start = time.time()
    clean_pred = logit_predictions(model, sub.images, batch, device)
    clean = clean_pred == sub.labels
    outcomes = [Outcome("clean", 0.0, clean, time.time() - start)]
    full = len(pos) == len(test)
    for r in paper.per_eps:
        outcomes.append(Outcome("paper-pgd", r.eps, r.adv_pred[pos] == sub.labels,
                                r.seconds if full else float("nan")))
    keep_adv = bool(getattr(args, "save_adv", False))
    if args.strong:
        for attack in ADAPTIVE_LOSSES:
            outcomes += adaptive_sweep(model, sub, attack, EPSILONS, args.iterations,
                                       args.restarts, args.seed, batch, device, clean=clean,
                                       state=state, keep_adv=keep_adv)
    if args.autoattack:
        for i, eps in enumerate(args.autoattack_eps):
            outcomes.append(autoattack_unit(model, sub, eps, i, args.seed, batch, device,
                                            state, keep_adv, out_dir))
    outcomes += worst_case(outcomes, clean)
    _write_table(outcomes, len(sub), os.path.join(out_dir, STRONG_CSV))
    diagnostics = _diagnostics(args, model, sub, outcomes, device)
    # the paper's scores and the logit must agree on the clean predictions
    disagree = int((paper.clean_pred[pos] != clean_pred).sum())
    diagnostics["clean_prediction_disagreements"] = disagree
    if disagree:
        log.warning("WARNING: the logit's and the paper scores' arg-max differ on %d clean "
                    "image(s) (scores underflowing to 0?)", disagree)
    packages = sorted({o.package for o in outcomes if o.package})
    diagnostics["settings"]["autoattack_package"] = ", ".join(packages) or None
    write_text_atomic(os.path.join(out_dir, DIAGNOSTICS), json.dumps(diagnostics, indent=2)
                      + "\n")
    if keep_adv:
        from utils.adversarial_store import save_adversarial
        save_adversarial(os.path.join(out_dir, ADVERSARIAL_FILE), model, test, paper,
                         sub, pos, outcomes, batch, device)
    _plot(paper, outcomes, len(sub), full, os.path.join(out_dir, "robustness.png"))
    return diagnostics


def autoattack_unit(model, sub: ImageData, eps: float, i: int, seed: int, batch: int, device,
                    state, keep_adv: bool, out_dir: str) -> Outcome:
    """AutoAttack at one eps, saved as unit ``autoattack/<i>`` (it cannot be saved part-way:
    a stop request during it ends the run at once, to continue from the previous unit)."""
    key = f"autoattack/{i}"
    unit = state.get(key) if state is not None else None
    if unit is None or not unit.get("done"):
        with preemption.immediate():
            out = run_autoattack(model, sub, eps, seed, batch, device, keep_adv=keep_adv,
                                 log_path=os.path.join(out_dir, AUTOATTACK_LOG))
        unit = {"done": True, "robust": out.robust, "seconds": out.seconds,
                "package": out.package}
        if out.adv is not None:
            unit["adv_rows"], unit["adv_images"] = out.adv
        if state is not None:
            state.put(key, unit)
        preemption.point(f"autoattack-eps-{i}")
    adv = (unit["adv_rows"], unit["adv_images"]) if "adv_rows" in unit else None
    return Outcome("autoattack", eps, unit["robust"], unit["seconds"], adv, unit["package"])


def _strong_images(test: ImageData, n: int | None, seed: int) -> tuple[ImageData, torch.Tensor]:
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


def _write_table(outcomes: list[Outcome], n: int, path: str) -> None:
    rows = [[f"{o.eps:g}", o.attack, f"{o.accuracy:.2f}", n,
             "" if o.seconds != o.seconds else f"{o.seconds:.1f}"]  # NaN: not measured here
            for o in sorted(outcomes, key=lambda o: o.eps)]
    write_csv(path, ["epsilon", "attack", "robust_accuracy", "examples", "seconds"], rows)


def _diagnostics(args, model, sub: ImageData, outcomes: list[Outcome], device) -> dict:
    losses = {"paper": paper_loss, "pgd-ce": logit_ce_loss, "pgd-dlr": logit_dlr_loss}
    start_eps = DIAGNOSTIC_EPS if DIAGNOSTIC_EPS in EPSILONS else None
    grads = gradient_summary(model, sub, losses, args.test_batch, device, start_eps,
                             args.seed, EPSILONS.index(DIAGNOSTIC_EPS) if start_eps else 0)
    for point, stats in grads.items():
        log.info("input gradients at %s: %s", point, ", ".join(
            f"{name} {100 * s['zero_fraction']:.1f}% exactly zero (median l1 "
            f"{s['median_l1']:.3g})" for name, s in stats.items()))
    paper = {o.eps: o.robust for o in outcomes if o.attack == "paper-pgd"}
    strongest = {o.eps: (_worst_name(outcomes, o.eps), o.robust) for o in outcomes
                 if o.attack == "worst-case"}
    gaps, warnings = robustness_gaps(paper, strongest, GAP_THRESHOLD)
    for w in warnings:
        log.warning("WARNING: %s", w)
    return {
        "examples": len(sub),
        "image_indices": [int(i) for i in sub.indices],
        "settings": {"iterations": args.iterations, "restarts": args.restarts,
                     "step": STEP * 255, "seed": args.seed,
                     "strong": bool(args.strong), "autoattack": bool(args.autoattack),
                     "autoattack_eps": list(args.autoattack_eps) if args.autoattack else [],
                     "L": getattr(getattr(model, "head", None), "L", None),
                     "normalize": getattr(getattr(model, "head", None), "normalize", None)},
        "input_gradients": grads,
        "gap_threshold": GAP_THRESHOLD,
        "paper_vs_strongest": gaps,
        "warnings": warnings,
    }


def _worst_name(outcomes: list[Outcome], eps: float) -> str:
    names = [o.attack for o in outcomes if o.eps == eps and o.attack != "worst-case"]
    return "worst case of " + ", ".join(names)


def _plot(paper: SweepResult, outcomes: list[Outcome], n: int, full: bool, path: str) -> None:
    curves = {"paper PGD": [(0.0, paper.clean_acc)] + [(r.eps, r.accuracy(paper.labels))
                                                       for r in paper.per_eps]}
    suffix = "" if full else f" ({n} images)"
    clean = next(o.accuracy for o in outcomes if o.attack == "clean")
    for name in ("pgd-ce", "pgd-dlr", "autoattack", "worst-case"):
        points = [(o.eps, o.accuracy) for o in outcomes if o.attack == name]
        if points:
            curves[name + suffix] = [(0.0, clean)] + points
    plot_robustness(path, curves)
