"""The paper's robustness evaluation: clean accuracy, then a PGD l-inf sweep over eps.

``load_eval_inputs`` rebuilds the checkpoint from disk into a fresh model (what was trained
is never what gets evaluated) and loads the test set, both as ``EvalConfig`` says;
``evaluate_model`` attacks it as ``AttackConfig`` says and writes ``attack_results_ext.csv``
(the original's schema), ``predictions_eps<E>.csv`` per eps, ``robustness.png`` and
``eval_summary.json`` (what was attacked: classifier, L, rule, attack settings, accuracies,
seconds per eps). The file names come from ``utils.outputs.files``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from base import preemption
from base.distributed import Dist
from base.errors import UsageError
from base.io import atomic_write, load_checkpoint, write_text_atomic
from base.progress import progress
from base.tensors import eval_mode, to_device
from datasets.data import ImageData, balanced_subset, check_same_classes, load_dataset, to_float
from models.checkpoint import backbone_from_state, has_clusters
from models.classifier import LinearClassifier, classifier_from_checkpoint
from utils.attacks.batch_size import attack_batch
from utils.attacks.pgd import (
    AttackResult,
    LossFn,
    keep_higher_loss,
    paper_loss,
    pgd_restart,
    start_keys,
)
from utils.eval.eval_state import EVAL_RESUME_FILE, EvalState, fingerprint
from utils.outputs import files
from utils.outputs.results import write_csv

log = logging.getLogger("clustr")

EPSILONS = (2.0, 8.0, 16.0, 25.5)  # in units of 1/255
STEP = 2.0 / 255


@dataclass
class EvalConfig:
    """What is evaluated: the test data and the classifier's inference settings."""

    dataset: str = "cifar10"
    data_root: str = "./data"
    workers: int = 4
    test_subset: int | None = None  # a seeded, class-balanced subset of the test set
    test_batch: int = 64
    seed: int = 111                 # the subset's draw
    L: int | None = None            # None: the checkpoint's own value
    normalize: bool | None = None   # None: the checkpoint's own normalize_probs
    baseline_input: str | None = None  # a file without cluster keys: "raw" or "normalized"


@dataclass
class AttackConfig:
    """How it is attacked: the paper's PGD sweep and, optionally, the honest evaluation."""

    iterations: int = 20
    restarts: int = 10
    seed: int = 111                 # the per-example random starts
    test_batch: int = 64            # the clean predictions
    attack_batch: int | None = None  # the attacks; None: utils.attacks.batch_size decides
    strong: bool = False            # PGD-CE and PGD-DLR on the logit
    autoattack: bool = False        # AutoAttack, standard version
    autoattack_eps: tuple[float, ...] = (8.0,)  # units of 1/255
    strong_subset: int | None = None  # the strong attacks on this many of the test images
    save_adv: bool = False          # keep the adversarial images that fooled the model

    @property
    def honest(self) -> bool:
        return self.strong or self.autoattack


def percent(correct: torch.Tensor) -> float:
    """Share of True in percent, in double precision (as the original's 100. * n / N)."""
    return 100.0 * int(correct.sum()) / len(correct) if len(correct) else 0.0


@dataclass
class EpsResult:
    eps: float                  # in units of 1/255
    adv_pred: torch.Tensor      # (N,) prediction under the kept perturbation
    linf: torch.Tensor          # (N,) l-inf norm of the kept perturbation (0 if not attacked)
    steps: torch.Tensor         # (N,) gradient steps of the kept perturbation
    seconds: float = 0.0
    # with --save-adv: (rows (k,) into the data set, images (k, 3, H, W)) that fooled it
    adv: tuple[torch.Tensor, torch.Tensor] | None = None

    def accuracy(self, labels: torch.Tensor) -> float:
        return percent(self.adv_pred == labels)


@dataclass
class SweepResult:
    labels: torch.Tensor
    indices: torch.Tensor
    clean_pred: torch.Tensor
    per_eps: list[EpsResult] = field(default_factory=list)

    @property
    def clean_acc(self) -> float:
        return percent(self.clean_pred == self.labels)


@torch.no_grad()
def predict_all(model, images: torch.Tensor, batch: int, device,
                dist: Dist | None = None) -> torch.Tensor:
    """Predictions (N,) in data-set order; each process predicts its shard."""
    dist = dist or Dist.single()
    lo, hi = dist.shard(len(images))
    out = [torch.empty(0, dtype=torch.long)]
    with eval_mode(model):
        for s in range(lo, hi, batch):
            out.append(model.predict(to_device(images[s:min(s + batch, hi)], device)).cpu())
    return dist.gather_rows(torch.cat(out), len(images))


def run_sweep(model, data: ImageData, epsilons=EPSILONS, iterations: int = 20,
              restarts: int = 10, seed: int = 111, batch: int = 64,
              device="cpu", loss_fn: LossFn = paper_loss,
              shrink: bool = True, dist: Dist | None = None, state: EvalState | None = None,
              keep_adv: bool = False, attack_batch: int | None = None) -> SweepResult:
    """Clean predictions, then PGD at each eps on the examples still classified correctly.

    Examples misclassified without attack count as non-robust (delta = 0 already fools
    them) and are not attacked, so the robust accuracy never exceeds the clean one. The
    original attacked them too and scored them at their random start. Each eps is attacked
    independently, as in the paper; the random starts depend on (seed, eps index, restart,
    example index), so the batch size does not change them, and neither does the number of
    processes: under torchrun each attacks its shard of the examples and the per-example
    results are gathered back in order on every process. ``batch`` is that of the clean
    predictions and, unless ``attack_batch`` is given, of the attack.

    Each restart runs over all the examples before the next one starts, so the progress
    can be saved in ``state`` after every restart (see ``utils.eval.eval_state``); with
    ``keep_adv`` the adversarial images that fooled the model are kept in the results.
    """
    device = torch.device(device)
    attack_batch = attack_batch or batch
    dist = dist or Dist.single()
    state = state or EvalState("", {}, write=False)
    model = model.to(device)
    labels = data.labels
    clean = predict_all(model, data.images, batch, device, dist)
    result = SweepResult(labels, data.indices, clean)
    attack_all = (clean == labels).nonzero().flatten()
    sweep = _Sweep(model, data, attack_all, iterations, restarts, seed, attack_batch or batch,
                   device, loss_fn, shrink, dist, state, keep_adv)
    for e, eps in enumerate(epsilons):
        result.per_eps.append(sweep.attack_eps(e, eps, clean))
        log.info("PGD eps %g/255: %.2f%% robust (%.0fs)", eps,
                 result.per_eps[-1].accuracy(labels), result.per_eps[-1].seconds)
        preemption.point(f"pgd-eps-{e}", dist.rank)
        if e + 1 < len(epsilons) and preemption.should_stop(dist):
            raise preemption.stop(f"after PGD eps {eps:g}/255")
    return result


class _Sweep:
    """The paper's PGD at one eps, restart after restart over all the attacked examples,
    its progress saved as unit ``pgd/<eps index>`` of the evaluation state."""

    def __init__(self, model, data, attack_all, iterations, restarts, seed, batch, device,
                 loss_fn, shrink, dist, state, keep_adv):
        self.model, self.data, self.attack_all = model, data, attack_all
        self.iterations, self.restarts, self.seed, self.batch = iterations, restarts, seed, batch
        self.device, self.loss_fn, self.shrink, self.dist = device, loss_fn, shrink, dist
        self.state, self.keep_adv = state, keep_adv
        self.lo, self.hi = dist.shard(len(attack_all))
        # every process runs as many batches as the largest shard, so all reach each safe
        # point (a collective under torchrun) together
        n, w = len(attack_all), dist.world_size
        largest = max((r + 1) * n // w - r * n // w for r in range(w))
        self.n_batches = -(-largest // batch)

    def _fresh(self) -> dict:
        n, rows = len(self.attack_all), self.attack_all
        unit = {"done": False, "restart": 0, "batch": 0, "seconds": 0.0,
                "loss": torch.full((n,), -float("inf")), "pred": self.data.labels[rows].clone(),
                "steps": torch.zeros(n, dtype=torch.long), "linf": torch.zeros(n)}
        if self.keep_adv:
            unit["delta"] = torch.zeros((n,) + tuple(self.data.images.shape[1:]))
        return unit

    def _save(self, key: str, unit: dict, restart: int, batch: int, seconds: float) -> dict:
        """Gather every process's rows (they updated only their own) and save."""
        n = len(self.attack_all)
        gathered = {k: self.dist.gather_rows(unit[k][self.lo:self.hi], n)
                    for k in ("loss", "pred", "steps", "linf", "delta") if k in unit}
        unit = dict(unit, **gathered, restart=restart, batch=batch, batch_size=self.batch,
                    seconds=seconds)
        self.state.put(key, unit)
        return unit

    def attack_eps(self, e: int, eps: float, clean: torch.Tensor) -> EpsResult:
        key = f"pgd/{e}"
        unit = self.state.get(key)
        if unit is not None and unit["done"]:
            return _eps_result(eps, unit)
        unit = unit or self._fresh()
        begin, before = time.perf_counter(), unit["seconds"]
        first_restart = unit["restart"]
        # a resume may attack in batches of another size: start again at the batch holding
        # the first example not yet done (re-attacking a done one gives it the same values)
        first_batch = unit["batch"] * unit.get("batch_size", self.batch) // self.batch
        for r in range(first_restart, self.restarts):
            bar = progress(range(first_batch if r == first_restart else 0, self.n_batches),
                           desc=f"PGD eps {eps:g}/255 restart {r + 1}/{self.restarts}",
                           leave=False)
            for b in bar:
                self._batch(unit, e, eps, r, b)
                preemption.point(f"pgd-batch-{e}-{r}-{b}", self.dist.rank)
                if b + 1 < self.n_batches and preemption.should_stop(self.dist):
                    self._save(key, unit, r, b + 1, before + time.perf_counter() - begin)
                    raise preemption.stop(f"in PGD eps {eps:g}/255, restart {r + 1}")
            unit = self._save(key, unit, r + 1, 0, before + time.perf_counter() - begin)
            preemption.point(f"pgd-restart-{e}-{r}", self.dist.rank)
            if r + 1 < self.restarts and preemption.should_stop(self.dist):
                raise preemption.stop(f"after PGD eps {eps:g}/255, restart {r + 1}")
        n = len(clean)
        adv, linf = clean.clone(), torch.zeros(n)
        steps = torch.zeros(n, dtype=torch.long)
        adv[self.attack_all], linf[self.attack_all] = unit["pred"], unit["linf"]
        steps[self.attack_all] = unit["steps"]
        done = {"done": True, "adv_pred": adv, "linf": linf, "steps": steps,
                "seconds": before + time.perf_counter() - begin}
        if self.keep_adv:
            fooled = (unit["pred"] != self.data.labels[self.attack_all]).nonzero().flatten()
            rows = self.attack_all[fooled]
            done["adv_rows"] = rows
            done["adv_images"] = (to_float(self.data.images[rows]) + unit["delta"][fooled]
                                  ).clamp(0.0, 1.0)
        self.state.put(key, done)
        return _eps_result(eps, done)

    def _batch(self, unit: dict, e: int, eps: float, r: int, b: int) -> None:
        """Restart ``r`` on this process's ``b``-th batch; the paper's rule merges it."""
        pos = torch.arange(self.lo + b * self.batch, min(self.lo + (b + 1) * self.batch,
                                                         self.hi))
        if len(pos) == 0:
            return
        rows = self.attack_all[pos]
        x = to_device(self.data.images[rows], self.device)
        y = self.data.labels[rows].to(self.device)
        res = pgd_restart(self.model, x, y, eps / 255, STEP, self.iterations,
                          start_keys(self.seed, e, r, self.data.indices[rows]), self.loss_fn,
                          self.shrink)
        dev = self.device
        best = AttackResult(delta=None, loss=unit["loss"][pos].to(dev),
                            pred=unit["pred"][pos].to(dev), correct=None,
                            steps=unit["steps"][pos].to(dev))
        better = keep_higher_loss(best, res).cpu()
        unit["loss"][pos], unit["pred"][pos] = best.loss.cpu(), best.pred.cpu()
        unit["steps"][pos] = best.steps.cpu()
        linf = res.delta.flatten(1).abs().amax(1).cpu()
        unit["linf"][pos] = torch.where(better, linf, unit["linf"][pos])
        if "delta" in unit:
            unit["delta"][pos[better]] = res.delta[better].float().cpu()


def _eps_result(eps: float, unit: dict) -> EpsResult:
    adv = ((unit["adv_rows"], unit["adv_images"]) if "adv_rows" in unit else None)
    return EpsResult(eps, unit["adv_pred"], unit["linf"], unit["steps"], unit["seconds"], adv)


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
        model = classifier_from_checkpoint(ckpt, dataset=cfg.dataset, L=cfg.L,
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


def describe(model) -> dict:
    """What was attacked: the classifier kind and, for clusters, the L and rule used."""
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


def eval_settings(cfg: EvalConfig, attack: AttackConfig) -> dict:
    """The settings that change the evaluation's results, named as their flags."""
    return {"dataset": cfg.dataset, "test_subset": cfg.test_subset, "seed": attack.seed,
            "iterations": attack.iterations, "restarts": attack.restarts,
            "test_batch": attack.test_batch, "L": cfg.L,
            "not_normalize": None if cfg.normalize is None else not cfg.normalize,
            "strong": attack.strong, "autoattack": attack.autoattack,
            "autoattack_eps": [float(e) for e in attack.autoattack_eps],
            "strong_subset": attack.strong_subset, "save_adv": attack.save_adv}


def open_eval_state(cfg: EvalConfig, attack: AttackConfig, ckpt_path: str, test: ImageData,
                    out_dir: str, device, dist: Dist | None = None, resume: bool = False,
                    after_training: bool = False) -> EvalState:
    """The evaluation's resume state: new, or with ``resume`` the saved one, checked
    against this run's settings, checkpoint and test images (nothing is written)."""
    dist = dist or Dist.single()
    return EvalState.open(os.path.join(out_dir, EVAL_RESUME_FILE),
                          fingerprint(eval_settings(cfg, attack), ckpt_path, test.images,
                                      test.labels, device, dist.world_size),
                          resume, write=dist.is_main,
                          fresh_if_checkpoint_changed=after_training)


def evaluate_model(model, test: ImageData, attack: AttackConfig, out_dir: str,
                   device: torch.device, ckpt_path: str, dataset: str,
                   dist: Dist | None = None, state: EvalState | None = None) -> SweepResult:
    """The paper's sweep (split over the processes under torchrun); the main process writes
    its files. The honest evaluation (``utils.eval.strong_evaluation``) follows on the
    same images when ``attack.honest``. The progress goes to ``state``
    (``utils.eval.eval_state``), which ``--resume`` continues from."""
    dist = dist or Dist.single()
    state = state or EvalState("", {}, write=False)
    state.save()  # from here on, --resume has an evaluation to continue
    batch = attack_batch(attack.attack_batch, model, device, len(test))
    log.info("attacks in batches of %d", batch)
    result = run_sweep(model, test, EPSILONS, attack.iterations, attack.restarts, attack.seed,
                       attack.test_batch, device, dist=dist, state=state,
                       keep_adv=attack.save_adv, attack_batch=batch)
    log.info("clean accuracy %.2f%% on %d test images", result.clean_acc, len(test))
    if not dist.is_main:
        return result
    setup = describe(model)
    write_results(result, out_dir, curve=setup["attack"])
    write_summary(os.path.join(out_dir, files.SUMMARY), result, dict(
        checkpoint=os.path.abspath(ckpt_path), dataset=dataset, test_images=len(test),
        **setup, iterations=attack.iterations, restarts=attack.restarts, step=STEP * 255,
        seed=attack.seed, attack_batch=batch, **{k: v for k, v in state.fingerprint.items()
                                                  if k in ("checkpoint_sha256", "test_sha256")}))
    return result


def write_results(result: SweepResult, out_dir: str, curve: str = "paper PGD") -> None:
    """``attack_results_ext.csv`` as the original's pandas file (``0.0``, ``2.0``, ...,
    ``25.5``; accuracy in percent), ``predictions_eps<E>.csv`` and ``robustness.png``."""
    rows = [[0.0, result.clean_acc]] + [[float(r.eps), r.accuracy(result.labels)]
                                        for r in result.per_eps]
    write_csv(os.path.join(out_dir, files.PAPER_RESULTS), ["epsilons", "test_set_accs"], rows)
    for r in result.per_eps:
        write_csv(os.path.join(out_dir, files.PREDICTIONS.format(eps=r.eps)),
                  ["index", "label", "clean_pred", "adv_pred", "linf", "steps"],
                  [[int(i), int(y), int(c), int(a), f"{float(n):.6f}", int(s)]
                   for i, y, c, a, n, s in zip(result.indices, result.labels,
                                               result.clean_pred, r.adv_pred, r.linf,
                                               r.steps)])
    plot_robustness(os.path.join(out_dir, files.PLOT), {curve: rows})


def write_summary(path: str, result: SweepResult, setup: dict) -> None:
    """``eval_summary.json``: what was evaluated and how (L and rule included), the
    accuracies and the seconds per eps."""
    summary = dict(setup, clean_acc=result.clean_acc,
                   robust_acc={f"{r.eps:g}": r.accuracy(result.labels) for r in result.per_eps},
                   seconds={f"{r.eps:g}": round(r.seconds, 2) for r in result.per_eps})
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")


def plot_robustness(path: str, curves: dict[str, list[tuple[float, float]]]) -> None:
    """Accuracy (%) against eps (x/255), one line per attack; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("eps (x/255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
