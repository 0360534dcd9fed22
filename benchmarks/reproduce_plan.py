"""What the reproduction report runs (``benchmarks.reproduce``): its rows, budgets and calls,
each a command of this project with its arguments, run from the repository root."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from base.cli import ArgParser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {
    "pretrained": "pretrained ResNet18 + k-means clusters (epoch 0, no training)",
    "ce": "plain cross-entropy ResNet18 (the starting weights, linear head)",
    "clustr": "ClusTR",
    "qtrades": "ClusTR+QTRADES (λ=12.5, L=20 in training)",
    "qtrades-l8": "ClusTR+QTRADES (λ=8, L=10 in training)",
    "qtrades-original": "ClusTR+QTRADES as the original trains it (--as-original, λ=12.5)",
    "qtrades-logit": "ClusTR+QTRADES, logit adversary (λ=12.5)",
    "free": "ClusTR+Free",
    "fgsm": "cross-entropy FGSM adversarial training (fast AT, one-cycle)",
}
# the main_clustr.py training flags of each ClusTR row, beyond the shared ones
TRAINING = {"clustr": [], "qtrades": ["--consistency-lambda", "12.5"],
            "qtrades-l8": ["--consistency-lambda", "8"],
            "qtrades-original": ["--consistency-lambda", "12.5", "--as-original"],
            "qtrades-logit": ["--consistency-lambda", "12.5", "--consistency-attack", "logit"],
            "free": []}
RESULT_FILES = ("attack_results_ext.csv", "attack_results_strong.csv")


@dataclass(frozen=True)
class Budget:
    """What one report trains and attacks; ``None`` images: all of them."""

    name: str
    epochs: int                 # ClusTR and its variants, and the FGSM baseline
    train_images: int | None
    test_images: int | None     # the paper's sweep and the clean accuracy
    strong_images: int          # PGD-CE, PGD-DLR, AutoAttack: fixed, class-balanced
    curve_images: int           # the per-epoch curves (paper's PGD and --strong, 1 restart)
    iterations: int
    restarts: int
    replays: int = 8            # M of ClusTR+Free
    epochs_l8: int | None = None  # the λ = 8 row (only at paper: the original README's 25)
    chosen: str = ""            # how the budget was chosen


BUDGETS = {
    "smoke": Budget("smoke", 1, 480, 20, 10, 10, 2, 1, replays=2,
                    chosen="a toy budget that checks the pipeline; its numbers mean nothing"),
    "quick": Budget("quick", 1, None, 100, 100, 50, 20, 1,
                    chosen="the budget of the report of 2026-12-01: one epoch, 100 images"),
    "paper": Budget("paper", 30, None, None, 1000, 200, 20, 10, epochs_l8=25,
                    chosen="the original's settings (its utils/train_settings.py and README: "
                           "30 epochs, PGD 20 iterations × 10 restarts at evaluation; the "
                           "λ = 8 row 25 epochs)"),
}
CPU_BASE = Budget("cpu", 1, None, 500, 500, 100, 20, 1)


def rows_of(b: Budget) -> list[str]:
    return [r for r in ROWS if r != "qtrades-l8" or b.epochs_l8]


def row_epochs(b: Budget, row: str, train_count: int) -> tuple[int, int | None]:
    """(epochs, training images) of one trained row. ClusTR+Free replays each batch M times,
    so, as free adversarial training is run, it makes epochs / M passes (rounded, at least
    one); below M epochs, one pass over epochs / M of the images (class-balanced)."""
    if row != "free":
        return (b.epochs_l8 if row == "qtrades-l8" else b.epochs), b.train_images
    if b.epochs >= b.replays:
        return max(1, round(b.epochs / b.replays)), b.train_images
    return 1, math.ceil(train_count * b.epochs / b.replays)


@dataclass
class Step:
    key: str                    # row/train, row/eval, row/curve/E
    argv: list[str]             # after "python", run from the repository root
    outputs: list[str]          # files it leaves when it finished
    folder: str | None = None   # main_clustr.py's --checkpoint (its --resume state)
    kind: str = "main"          # main | clusters | pretrain


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m benchmarks.reproduce",
                  description="The reproduction report (docs/reproducing.md).")
    p.add_argument("--budget", choices=[*BUDGETS, "cpu"], default="quick",
                   help="smoke (pipeline check), quick (one epoch), cpu (the most the measured "
                        "costs fit in 90 minutes on 2 idle cores), paper (the original's)")
    p.add_argument("--measure", action="store_true", help="train one epoch per row, attack "
                   "a few images: write the costs --budget cpu is chosen from (--costs)")
    p.add_argument("--costs", default="docs/results/cpu_costs.json", help="--measure's output")
    p.add_argument("--measure-images", type=int, default=40, help="images --measure attacks")
    p.add_argument("--data", default="../shared/data", help="has cifar10-subset/ and weights/")
    p.add_argument("--dataset", default="imagefolder", help="(imagefolder)")
    p.add_argument("--data-root", help="(DATA/cifar10-subset)")
    p.add_argument("--pretrained-path",
                   help="the starting weights (DATA/weights/resnet18_cifar10.pt)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), help="(all of the budget's)")
    p.add_argument("--work", help="folder of the runs (reproduce_runs/BUDGET)")
    p.add_argument("--out", help="(docs/results/REPRODUCTION_BUDGET.md)")
    p.add_argument("--device", default="auto", help="passed to every call (auto)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every call")
    p.add_argument("--resume", action="store_true", help="continue the report in --work: "
                   "reuse its finished calls, continue the stopped one")
    p.add_argument("--render-only", action="store_true",
                   help="only rewrite --out from the calls finished in --work")
    return p


class Paths:
    """The report's inputs and folders, relative to the repository root."""

    def __init__(self, args):
        self.data_root = rel(args.data_root or os.path.join(args.data, "cifar10-subset"))
        self.weights = rel(args.pretrained_path or os.path.join(args.data, "weights",
                                                                "resnet18_cifar10.pt"))
        name = "measure" if args.measure else args.budget
        self.work = rel(args.work or os.path.join("reproduce_runs", name))
        self.out = rel(args.out or f"docs/results/REPRODUCTION_{name}.md")

    def __call__(self, *parts) -> str:
        return os.path.join(self.work, *parts)


def rel(path: str) -> str:
    return path if os.path.isabs(path) else os.path.relpath(os.path.abspath(path), REPO)


def at(path: str) -> str:
    """A path relative to the repository root, from any working folder."""
    return os.path.join(REPO, path)


def training_count(args, paths: Paths) -> int:
    """Training images of the data set, as the loader lists them."""
    known = {"cifar10": 50000, "cifar100": 50000, "svhn": 73257}
    if args.dataset in known:
        return known[args.dataset]
    from torchvision.datasets import ImageFolder

    return len(ImageFolder(os.path.join(REPO, paths.data_root, "train")).samples)


def plan(args, b: Budget, paths: Paths, train_count: int) -> list[Step]:
    """Every call of the report, in order: the pretrained clusters (ClusTR at epoch 0) where
    a row needs them, per row its training and its evaluation, then the curves (epoch 0 of
    the ClusTR rows is the pretrained clusters, of the FGSM baseline the plain network)."""
    data = ["--dataset", args.dataset, "--data-root", paths.data_root, "--seed", "111",
            "--device", args.device, "--quiet"]
    attack = ["--iterations", str(b.iterations), "--L", "20"]
    sizes = [] if b.test_images is None else ["--test-subset", str(b.test_images)]
    evaluation = [*attack, "--restarts", str(b.restarts), *sizes, "--strong", "--autoattack",
                  "--strong-subset", str(b.strong_images)]
    curve = [*attack, "--restarts", "1", "--test-subset", str(b.curve_images), "--strong"]
    rows = [r for r in rows_of(b) if args.rows is None or r in args.rows]
    start = {"pretrained": paths("pretrained", "clusters.pth"), "ce": paths.weights}
    steps = [_clusters(b, paths, data)] if {"pretrained", *TRAINING} & set(rows) else []
    curves = {}
    for row in rows:
        weights = start.get(row)
        if weights is None:
            epochs, images = row_epochs(b, row, train_count)
            steps.append(_training(row, b, paths, data, epochs, images))
            weights = steps[-1].outputs[0]
            if row in TRAINING:  # every epoch, from the pretrained clusters
                curves.setdefault("pretrained/curve/0", start["pretrained"])
                curves |= {f"{row}/curve/{e}": epoch_checkpoint(paths(row, "train"), e)
                           for e in range(1, epochs + 1)}
            else:  # the FGSM baseline: its last epoch, from the plain network
                curves.setdefault("ce/curve/0", start["ce"])
                curves[f"{row}/curve/{epochs}"] = weights
        steps.append(_evaluate(f"{row}/eval", paths, weights, data + evaluation))
    return steps + [_evaluate(k, paths, w, data + curve) for k, w in curves.items()]


def _clusters(b: Budget, paths: Paths, data: list[str]) -> Step:
    out = paths("pretrained", "clusters.pth")
    return Step("pretrained/train", [
        "-m", "utils.pretrained_clusters", "--out", out, "--pretrained-path", paths.weights,
        "--k", "2", "--L", "20", *_subset(b.train_images), *data], [out], kind="clusters")


def _training(row: str, b: Budget, paths: Paths, data: list[str], epochs: int,
              images: int | None) -> Step:
    """The row's training call; its first output is the weights to evaluate."""
    if row == "fgsm":
        out = paths("fgsm", "weights.pt")
        return Step("fgsm/train", [
            "-m", "utils.train.pretrain", "--out", out, "--pretrained-path", paths.weights,
            "--adversarial", "fgsm", "--epochs", str(epochs), *_subset(images),
            "--test-subset", str(b.curve_images), *data], [out], kind="pretrain")
    folder = paths(row, "train")
    flags = TRAINING[row] + (["--minibatch-replays", str(b.replays)] if row == "free" else [])
    return Step(f"{row}/train", [
        "main_clustr.py", "--checkpoint", folder, "--pretrained-path", paths.weights,
        "--epochs", str(epochs), "--lr", "0.0001", "--m", "12", "--d", "20", "--k", "2",
        "--alpha", "12.5", "--L", "10" if row == "qtrades-l8" else "20", *flags,
        *_subset(images), "--save-all", *data,
        # the sweep that ends every training run, kept small: the evaluation is its own call
        "--test-subset", str(b.curve_images), "--iterations", "1", "--restarts", "1"],
        [os.path.join(folder, "checkpoint.pth")] +
        [epoch_checkpoint(folder, e) for e in range(1, epochs + 1)], folder)


def epoch_checkpoint(folder: str, epoch: int) -> str:
    """``--save-all``'s file after ``epoch`` epochs (the original counts them from 0)."""
    return os.path.join(folder, f"checkpoint_{epoch - 1}.pth")


def _subset(images: int | None) -> list[str]:
    return [] if images is None else ["--train-subset", str(images)]


def _evaluate(key: str, paths: Paths, weights: str, flags: list[str]) -> Step:
    folder = paths(key)
    return Step(key, ["main_clustr.py", "--checkpoint", folder, "--evaluate-ckpt", weights,
                      *flags], [os.path.join(folder, n) for n in RESULT_FILES], folder)
