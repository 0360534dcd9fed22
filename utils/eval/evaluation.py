"""The paper's robustness evaluation: clean accuracy, then a PGD l-inf sweep over eps.

``load_eval_inputs`` rebuilds the checkpoint from disk into a fresh model (what was trained
is never what gets evaluated) and loads the test set, as ``EvalConfig`` says;
``evaluate_model`` attacks it as ``AttackConfig`` says and writes the paper's result files
(README.md's outputs table).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch

from base.cli import resume_field
from base.distributed import Dist
from base.errors import UsageError
from base.io import load_checkpoint, pyplot, save_figure, write_text_atomic
from datasets.data import ImageData, balanced_subset, check_same_classes, load_dataset
from models.checkpoint import backbone_from_state, has_clusters
from models.classifier import ClusterClassifier, LinearClassifier
from utils.attacks.pgd import EPSILONS, PGD, STEP
from utils.attacks.sweep import AttackContext, Outcome, percent, predictions, sweep
from utils.eval.eval_state import EvalState
from utils.outputs import files
from utils.outputs.results import write_csv

log = logging.getLogger("clustr")


# Fields declared with resume_field change the results: a resumed run must repeat them.
@dataclass
class EvalConfig:
    """What is evaluated: the test data and the classifier's inference settings."""

    dataset: str = resume_field("cifar10")
    data_root: str = "./data"
    workers: int = 4
    test_subset: int | None = resume_field(None)  # a seeded, class-balanced subset
    test_batch: int = resume_field(64, training=False)
    seed: int = resume_field(111)                 # the subset's draw
    L: int | None = resume_field(None)            # None: the checkpoint's own value
    # the normalisation rule; None: the checkpoint's own (normalize_probs)
    normalize: bool | None = resume_field(None, "normalize (--not-normalize)",
                                          argument="not_normalize")
    # a file without cluster keys: "raw" or "normalized" inputs
    baseline_input: str | None = resume_field(None)


@dataclass
class AttackConfig:
    """How it is attacked: the paper's PGD sweep and, optionally, the strong evaluation."""

    iterations: int = resume_field(20, training=False)
    restarts: int = resume_field(10, training=False)
    seed: int = resume_field(111)                 # the per-example random starts
    test_batch: int = resume_field(64, training=False)  # the clean predictions
    attack_batch: int | None = None  # the attacks; None: utils.attacks.batch_size decides
    strong: bool = resume_field(False)            # PGD-CE and PGD-DLR on the logit
    autoattack: bool = resume_field(False)        # AutoAttack, standard version
    autoattack_eps: tuple[float, ...] = resume_field((8.0,))  # units of 1/255
    strong_subset: int | None = resume_field(None)  # the strong attacks on so many images
    save_adv: bool = resume_field(False)  # keep the adversarial images that fooled the model


@dataclass
class SweepResult:
    labels: torch.Tensor
    indices: torch.Tensor
    clean_pred: torch.Tensor
    per_eps: list[Outcome] = field(default_factory=list)

    @property
    def clean_acc(self) -> float:
        return percent(self.clean_pred == self.labels)


def run_sweep(ctx: AttackContext, attack: PGD, test_batch: int = 64,
              epsilons=EPSILONS) -> SweepResult:
    """Clean predictions (in batches of ``test_batch``), then ``attack`` (the paper's PGD)
    at each eps, independently, on the examples still classified correctly (the others
    count as non-robust; the original attacked them too and scored them at their random
    start). ``utils.attacks.sweep`` runs it."""
    ctx.model = ctx.model.to(ctx.device)
    data = ctx.data
    clean = predictions(ctx.model, data.images, test_batch, ctx.device, ctx.dist)
    return SweepResult(data.labels, data.indices, clean, sweep(ctx, attack, epsilons, clean))


def load_eval_model(cfg: EvalConfig, ckpt_path: str):
    """A fresh model rebuilt from the file: ClusterClassifier, or LinearClassifier for a
    plain state_dict (evaluated through its linear head; inputs normalised, or raw with
    ``cfg.baseline_input == "raw"``). ``cfg.L`` and ``cfg.normalize`` win when given, else
    the file's values."""
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("dataset") not in (None, cfg.dataset):
        log.warning("%s was trained on %s but is evaluated on --dataset %s", ckpt_path,
                    ckpt["dataset"], cfg.dataset)
    if has_clusters(ckpt):
        model = ClusterClassifier.from_checkpoint(ckpt, dataset=cfg.dataset, L=cfg.L,
                                                  normalize=cfg.normalize)
        head = model.head
        if head.L > head.num_clusters:
            raise UsageError(f"--L {head.L} is larger than the checkpoint's "
                             f"{head.num_clusters} clusters: pass --L {head.num_clusters} or "
                             f"fewer")
        if cfg.baseline_input is not None:
            log.warning("--baseline-input applies to files without cluster keys only: "
                        "ignored for %s", ckpt_path)
        log.info("evaluating %s: %d clusters, L %d%s, %s%s", ckpt_path, head.num_clusters,
                 head.L, "" if cfg.L is not None else " (from the checkpoint)",
                 "L nearest" if head.normalize else "all clusters (--not-normalize)",
                 "" if cfg.normalize is not None else " (from the checkpoint)")
        return model
    raw = cfg.baseline_input == "raw"
    log.info("evaluating %s as a plain classifier through its linear head (no cluster keys), "
             "inputs %s", ckpt_path, "raw in [0, 1] (--baseline-input raw)" if raw else
             "normalised with the data set's mean and std (--baseline-input raw for a "
             "network that takes raw images)")
    backbone = backbone_from_state(ckpt, cfg.dataset)
    if raw:
        backbone.mean.zero_()
        backbone.std.fill_(1.0)
    return LinearClassifier(backbone)


def attacked_setup(model) -> dict:
    """What was attacked: the classifier kind and, for clusters, the L and the normalisation
    rule used."""
    if isinstance(model, LinearClassifier):
        raw = bool((model.backbone.std == 1).all() and (model.backbone.mean == 0).all())
        return {"classifier": "linear head", "attack": "PGD, cross-entropy on the logits",
                "baseline_input": "raw" if raw else "normalized"}
    return {"classifier": "clusters", "L": model.head.L,
            "normalize_probs": model.head.normalize,
            "attack": "paper PGD, cross-entropy on the cluster class scores"}


def load_eval_inputs(cfg: EvalConfig, ckpt_path: str):
    """The model and the test set, loaded (and so checked) before any result is written."""
    model = load_eval_model(cfg, ckpt_path)
    test = load_dataset(cfg.dataset, cfg.data_root, "test", workers=cfg.workers)
    test = balanced_subset(test, cfg.test_subset, cfg.seed, flag="--test-subset")
    if model.num_classes != test.num_classes:
        raise UsageError(f"{ckpt_path} classifies {model.num_classes} classes but the "
                         f"{cfg.dataset} test set has {test.num_classes}: pass the --dataset "
                         f"(and --data-root) it was trained on")
    if getattr(model, "class_names", None):  # labels are folder positions: names must agree
        check_same_classes(model.class_names, test.classes, f"{ckpt_path}'s classes {{}} and "
                           f"the test set's {{}}", "pass the --data-root it was trained on, "
                           "or name the class folders as the checkpoint does")
    return model, test


def evaluate_model(model, test: ImageData, attack: AttackConfig, out_dir: str,
                   device: torch.device, about: dict, dist: Dist | None = None,
                   state: EvalState | None = None) -> SweepResult:
    """The paper's sweep (split over the processes under torchrun), in batches of
    ``attack.attack_batch`` (settled by ``main_clustr.evaluate``); the main process writes
    its files, ``eval_summary.json`` headed by ``about`` (checkpoint and data set). The
    progress goes to ``state``, which ``--resume`` continues from."""
    dist, state = dist or Dist.single(), state or EvalState()
    state.save()  # from here on, --resume has an evaluation to continue
    batch = attack.attack_batch
    log.info("attacks in batches of %d", batch)
    ctx = AttackContext(model, test, torch.device(device), batch, attack.seed, dist, state,
                        attack.save_adv)
    result = run_sweep(ctx, PGD(iterations=attack.iterations, restarts=attack.restarts),
                       attack.test_batch)
    log.info("clean accuracy %.2f%% on %d test images", result.clean_acc, len(test))
    if not dist.is_main:
        return result
    setup = attacked_setup(model)
    write_results(result, out_dir, curve=setup["attack"])
    write_summary(os.path.join(out_dir, files.SUMMARY), result, dict(
        about, test_images=len(test),
        **setup, iterations=attack.iterations, restarts=attack.restarts, step=STEP * 255,
        seed=attack.seed, attack_batch=batch, **{k: v for k, v in state.fingerprint.items()
                                                  if k in ("checkpoint_sha256", "test_sha256")}))
    return result


def write_results(result: SweepResult, out_dir: str, curve: str = "paper PGD") -> None:
    """``attack_results_ext.csv`` as the original's pandas file (``0.0``, ``2.0``, ...,
    ``25.5``; accuracy in percent), ``predictions_eps<E>.csv`` and ``robustness.png``."""
    rows = [[0.0, result.clean_acc]] + [[float(r.eps), r.accuracy] for r in result.per_eps]
    write_csv(os.path.join(out_dir, files.PAPER_RESULTS), ["epsilons", "test_set_accs"], rows)
    for r in result.per_eps:
        write_csv(os.path.join(out_dir, files.PREDICTIONS.format(eps=r.eps)),
                  ["index", "label", "clean_pred", "adv_pred", "linf", "steps"],
                  [[int(i), int(y), int(c), int(a), f"{float(n):.6f}", int(s)]
                   for i, y, c, a, n, s in zip(result.indices, result.labels,
                                               result.clean_pred, r.pred, r.linf,
                                               r.steps)])
    plot_robustness(os.path.join(out_dir, files.PLOT), {curve: rows})


def write_summary(path: str, result: SweepResult, setup: dict) -> None:
    """``eval_summary.json``: what was evaluated and how (L and normalisation rule
    included), the accuracies and the seconds per eps."""
    summary = dict(setup, clean_acc=result.clean_acc,
                   robust_acc={f"{r.eps:g}": r.accuracy for r in result.per_eps},
                   seconds={f"{r.eps:g}": round(r.seconds, 2) for r in result.per_eps})
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")


def plot_robustness(path: str, curves: dict[str, list[tuple[float, float]]]) -> None:
    """Accuracy (%) against eps (x/255), one line per attack; written atomically."""
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    for name, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("eps (x/255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    save_figure(fig, path)
