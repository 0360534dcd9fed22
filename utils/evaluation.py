"""The paper's robustness evaluation: clean accuracy, then a PGD l-inf sweep over eps.

``evaluate_checkpoint`` reloads the checkpoint from disk into a fresh model (what was
trained is never what gets evaluated), attacks the test set and writes
``attack_results_ext.csv`` (the original's schema), ``predictions_eps<E>.csv`` per eps and
``robustness.png``.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from datasets.data import ImageData, balanced_subset, load_dataset
from models.resnet import ResNet18
from utils.attacks import LossFn, paper_loss, pgd, start_keys
from utils.checkpoint import (
    backbone_from_state,
    classifier_from_checkpoint,
    has_clusters,
    load_checkpoint,
)
from utils.embeddings import eval_mode, to_device
from utils.progress import progress
from utils.results import write_csv

log = logging.getLogger("clustr")

EPSILONS = (2.0, 8.0, 16.0, 25.5)  # in units of 1/255
STEP = 2.0 / 255


class LinearClassifier(torch.nn.Module):
    """A plain ResNet18 classifier (linear head) with the interface the attacks use."""

    def __init__(self, backbone: ResNet18):
        super().__init__()
        self.backbone = backbone
        self.eval()

    def forward(self, x):
        return self.backbone.classify(x)

    def paper_scores(self, x):
        return self.backbone.classify(x)

    @torch.no_grad()
    def predict(self, x):
        return self(x).argmax(1)


@dataclass
class EpsResult:
    eps: float                  # in units of 1/255
    adv_pred: torch.Tensor      # (N,) prediction under the kept perturbation
    linf: torch.Tensor          # (N,) l-inf norm of the kept perturbation (0 if not attacked)
    steps: torch.Tensor         # (N,) gradient steps of the kept perturbation
    seconds: float = 0.0

    def accuracy(self, labels: torch.Tensor) -> float:
        return (self.adv_pred == labels).float().mean().item() * 100.0


@dataclass
class SweepResult:
    labels: torch.Tensor
    indices: torch.Tensor
    clean_pred: torch.Tensor
    per_eps: list[EpsResult] = field(default_factory=list)

    @property
    def clean_acc(self) -> float:
        return (self.clean_pred == self.labels).float().mean().item() * 100.0


@torch.no_grad()
def predict_all(model, images: torch.Tensor, batch: int, device) -> torch.Tensor:
    out = []
    with eval_mode(model):
        for s in range(0, len(images), batch):
            out.append(model.predict(to_device(images[s:s + batch], device)).cpu())
    return torch.cat(out)


def run_sweep(model, data: ImageData, epsilons=EPSILONS, iterations: int = 20,
              restarts: int = 10, seed: int = 111, batch: int = 64,
              device="cpu", loss_fn: LossFn = paper_loss,
              shrink: bool = True) -> SweepResult:
    """Clean predictions, then PGD at each eps on the examples still classified correctly.

    Examples misclassified without attack leave the batch and count as non-robust, so the
    robust accuracy never exceeds the clean one.
    """
    device = torch.device(device)
    model = model.to(device)
    labels = data.labels
    clean = predict_all(model, data.images, batch, device)
    result = SweepResult(labels, data.indices, clean)
    attack = (clean == labels).nonzero().flatten()
    for e, eps in enumerate(epsilons):
        start = time.time()
        adv = clean.clone()
        linf = torch.zeros(len(labels))
        steps = torch.zeros(len(labels), dtype=torch.long)
        for s in progress(range(0, len(attack), batch), desc=f"PGD eps {eps:g}/255",
                          leave=False):
            rows = attack[s:s + batch]
            x = to_device(data.images[rows], device)
            y = labels[rows].to(device)
            keys = data.indices[rows]
            res = pgd(model, x, y, eps / 255, STEP, iterations, restarts,
                      lambda r, k=keys, ei=e: start_keys(seed, ei, r, k), loss_fn, shrink)
            with torch.no_grad():
                _, scores = loss_fn(model, x + res.delta, y)
            adv[rows] = scores.argmax(1).cpu()
            linf[rows] = res.delta.flatten(1).abs().amax(1).cpu()
            steps[rows] = res.steps.cpu()
        result.per_eps.append(EpsResult(eps, adv, linf, steps, time.time() - start))
        log.info("PGD eps %g/255: %.2f%% robust (%.0fs)", eps,
                 result.per_eps[-1].accuracy(labels), time.time() - start)
    return result


def load_eval_model(args, ckpt_path: str):
    """A fresh model rebuilt from the file: ClusterClassifier, or LinearClassifier for a
    plain state_dict (evaluated through its linear head, as the original does for
    baselines)."""
    ckpt = load_checkpoint(ckpt_path)
    if has_clusters(ckpt):
        normalize = None if args.not_normalize is None else not args.not_normalize
        model = classifier_from_checkpoint(ckpt, dataset=args.dataset, L=args.L,
                                           normalize=normalize)
        log.info("evaluating %s: %d clusters, L %d, %s", ckpt_path, model.head.num_clusters,
                 model.head.L, "L nearest" if model.head.normalize else "all clusters")
        return model
    log.info("evaluating %s as a plain classifier through its linear head (no cluster keys)",
             ckpt_path)
    return LinearClassifier(backbone_from_state(ckpt, args.dataset))


def evaluate_checkpoint(args, ckpt_path: str, out_dir: str, device: torch.device) -> SweepResult:
    model = load_eval_model(args, ckpt_path)
    test = load_dataset(args.dataset, args.data_root, "test", workers=args.workers)
    test = balanced_subset(test, args.test_subset, args.seed)
    result = run_sweep(model, test, EPSILONS, args.iterations, args.restarts, args.seed,
                       args.test_batch, device)
    log.info("clean accuracy %.2f%% on %d test images", result.clean_acc, len(test))
    write_results(result, out_dir)
    if getattr(args, "strong", False) or getattr(args, "autoattack", False):
        from utils.strong_evaluation import evaluate_strong  # stronger attacks, same images
        evaluate_strong(args, model, test, result, out_dir, device)
    return result


def write_results(result: SweepResult, out_dir: str) -> None:
    rows = [[0, result.clean_acc]] + [[f"{r.eps:g}", r.accuracy(result.labels)]
                                      for r in result.per_eps]
    write_csv(os.path.join(out_dir, "attack_results_ext.csv"), ["epsilons", "test_set_accs"],
              rows)
    for r in result.per_eps:
        write_csv(os.path.join(out_dir, f"predictions_eps{r.eps:g}.csv"),
                  ["index", "label", "clean_pred", "adv_pred", "linf", "steps"],
                  [[int(i), int(y), int(c), int(a), f"{float(n):.6f}", int(s)]
                   for i, y, c, a, n, s in zip(result.indices, result.labels,
                                               result.clean_pred, r.adv_pred, r.linf,
                                               r.steps)])
    plot_robustness(os.path.join(out_dir, "robustness.png"),
                    {"paper PGD": [(0.0, result.clean_acc)] + [(r.eps, r.accuracy(
                        result.labels)) for r in result.per_eps]})


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
    ax.legend()
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), "." + os.path.basename(path)
                       + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
