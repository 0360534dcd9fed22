"""One command, one report: the paper's PGD next to the strongest attacks, per model.

    python -m benchmarks.reproduce --data ../shared/data --out docs/results/REPRODUCTION.md

On the shared data (real CIFAR-10 images and a real pretrained ResNet18) it

1. turns the untouched pretrained network into a cluster classifier (ClusTR at epoch 0:
   k-means on the training embeddings, K = 2, L = 20) and evaluates it;
2. trains ClusTR for a small fixed budget and evaluates it;
3. trains ClusTR+QTRADES (``--consistency-lambda 12.5``) for the same budget and evaluates it;
4. trains ClusTR with free adversarial training (``--minibatch-replays M``, the paper's
   adversarial-training row) at the same cost and evaluates it: every batch is replayed M
   times, so, as free adversarial training does, it sees 1/M of the training images (a
   class-balanced subset, ``--free-train-subset``) and makes as many optimiser steps as
   one ClusTR epoch;

each model with one CLI call of this project (``main_clustr.py``, whose training ends with
the evaluation), on the same fixed test images: the paper's PGD, then ``--strong``
(PGD-CE and PGD-DLR on the proper logit) and ``--autoattack`` (standard AutoAttack at
8/255). It then writes a Markdown report: the table of clean, paper-PGD, PGD-CE, PGD-DLR,
AutoAttack and worst-case accuracy (``utils.tables``, the same code as
``python -m utils.tables``), the exact commands, budgets and times, and the published
figures for context. A failed step is reported as failed; the others still run.

``--quick`` runs the whole pipeline on a toy budget (a few minutes) to check that it works;
its numbers mean nothing and the report says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch

from base.cli import pos_int
from base.errors import UsageError
from base.io import load_checkpoint, write_text_atomic
from benchmarks.machine import busy_loads, usable_cores
from models.checkpoint import extract_state_dict
from utils import tables, train_setting
from utils.outputs.results import read_csv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "pretrained": "pretrained ResNet18 + k-means clusters (no ClusTR training)",
    "clustr": "ClusTR",
    "qtrades": "ClusTR+QTRADES",
    "free": "ClusTR+Free",
}
TABLE_EPS = (2.0, 8.0)
PUBLISHED = ("released ClusTR+QTRADES CIFAR-10 model: clean 91.03%, paper's PGD-100 at "
             "8/255 74.04%, AutoAttack at 8/255 0.00%; a cross-entropy-only attack left it "
             "above 51%")


@dataclass
class Budget:
    """What one report costs; ``FULL`` is sized for about 20 minutes on 2 idle cores."""

    epochs: int = 1
    train_subset: int | None = None     # None: all 5,085 shared training images
    test_images: int = 100              # fixed, class-balanced test images (--test-subset)
    iterations: int = 20                # the seed README's command
    restarts: int = 1
    autoattack_eps: tuple[float, ...] = (8.0,)
    consistency_lambda: float = 12.5    # the seed README's ClusTR+QTRADES command
    minibatch_replays: int = 8          # M of free training (Free-AT's CIFAR-10 setting)
    free_train_subset: int | str | None = None  # None: 1/M of the training images; "all"
    L: int = 20
    k: int = 2
    seed: int = 111


FULL = Budget()
QUICK = Budget(epochs=1, train_subset=480, test_images=10, iterations=2, restarts=1,
               minibatch_replays=2)


@dataclass
class Step:
    model: str
    title: str
    argv: list[str]
    log_path: str
    needs: str | None = None            # output file that must exist before this step runs
    threads: int | None = None          # OMP_NUM_THREADS of the call (None: PyTorch's choice)
    rc: int | None = None               # None: not run
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    tail: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        env = [] if self.threads is None else [f"OMP_NUM_THREADS={self.threads}"]
        return shlex.join(env + ["python"] + self.argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce",
                                description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data",
                   help="folder with cifar10-subset/ and weights/resnet18_cifar10.pt "
                        "(../shared/data)")
    p.add_argument("--out", default="docs/results/REPRODUCTION.md",
                   help="the report to write (docs/results/REPRODUCTION.md)")
    p.add_argument("--work", default=None,
                   help="folder for the runs (default: reproduce_runs/<date-time>)")
    p.add_argument("--quick", action="store_true",
                   help="toy budget to check the pipeline in a few minutes")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                   help="which models to run, in this order (all)")
    p.add_argument("--device", default="auto", help="passed to every run (auto)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads per call (sets OMP_NUM_THREADS; default: PyTorch's "
                        "choice, one per core). On a machine whose cores are busy with other "
                        "work, 1 avoids threads waiting on each other")
    p.add_argument("--render-only", action="store_true",
                   help="only rewrite --out from the finished runs in --work")
    g = p.add_argument_group("scale-up knobs (in brackets: the full budget's value)")
    g.add_argument("--dataset", default="imagefolder",
                   help="cifar10 for the full data set, downloaded into --data-root "
                        "(imagefolder)")
    g.add_argument("--data-root", default=None, help="(DATA/cifar10-subset)")
    g.add_argument("--pretrained-path", default=None,
                   help="(DATA/weights/resnet18_cifar10.pt)")
    g.add_argument("--epochs", type=int, help=f"training epochs ({FULL.epochs})")
    g.add_argument("--train-subset", type=int, metavar="N",
                   help="class-balanced training subset (all images)")
    g.add_argument("--test-images", type=int, metavar="N",
                   help=f"fixed, class-balanced test images attacked ({FULL.test_images})")
    g.add_argument("--iterations", type=int,
                   help=f"PGD iterations, paper's and adaptive ({FULL.iterations})")
    g.add_argument("--restarts", type=int, help=f"PGD restarts ({FULL.restarts})")
    g.add_argument("--autoattack-eps", type=float, nargs="+", metavar="E",
                   help="AutoAttack eps values in units of 1/255 (8)")
    g.add_argument("--consistency-lambda", type=float,
                   help=f"lambda of ClusTR+QTRADES ({FULL.consistency_lambda:g})")
    g.add_argument("--minibatch-replays", type=int, metavar="M",
                   help=f"M of ClusTR+Free, each replay one optimiser step "
                        f"({FULL.minibatch_replays})")
    g.add_argument("--free-train-subset", type=_images_or_all, metavar="N|all",
                   help="training images of ClusTR+Free (1/M of the others' images, so "
                        "that its M replays cost what one pass of the other models does; "
                        "'all': the same images, M times the cost)")
    return p


def _images_or_all(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return pos_int(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (a number of images, or 'all')") from None


def budget_from(args) -> Budget:
    base = QUICK if args.quick else FULL
    given = {name: getattr(args, name) for name in
             ("epochs", "train_subset", "test_images", "iterations", "restarts",
              "consistency_lambda", "minibatch_replays", "free_train_subset")
             if getattr(args, name) is not None}
    if args.autoattack_eps is not None:
        given["autoattack_eps"] = tuple(args.autoattack_eps)
    return Budget(**{**base.__dict__, **given})


def rel(path: str) -> str:
    """``path`` for commands run from the repository root: as given when absolute, else
    relative to the repository."""
    return path if os.path.isabs(path) else os.path.relpath(os.path.abspath(path), REPO)


TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "svhn": 73257}  # torchvision's sets


def training_images(args, b: Budget) -> int:
    """How many training images the ClusTR runs see: the subset, else the whole set."""
    if b.train_subset is not None:
        return b.train_subset
    if args.dataset in TRAIN_IMAGES:
        return TRAIN_IMAGES[args.dataset]
    from torchvision.datasets import ImageFolder  # lists the files the loader reads

    root = os.path.join(args.data_root or os.path.join(args.data, "cifar10-subset"), "train")
    return len(ImageFolder(root).samples)


def free_images(args, b: Budget) -> int | None:
    """Training images of ClusTR+Free; None for all of them. By default 1/M of the
    others' images (rounded up): free adversarial training keeps the cost of plain training
    by dividing its passes over the data by M (Shafahi et al., 2019), and this report's
    budget is one pass."""
    if b.free_train_subset == "all":
        return b.train_subset
    if b.free_train_subset is not None:
        return b.free_train_subset
    return -(-training_images(args, b) // max(b.minibatch_replays, 1))


def weights_path(args) -> str:
    return rel(args.pretrained_path or os.path.join(args.data, "weights",
                                                    "resnet18_cifar10.pt"))


def plan(args, b: Budget, work: str) -> list[Step]:
    """The CLI calls, one per model (two for the pretrained clusters), paths relative to
    the repository root."""
    data_root = rel(args.data_root or os.path.join(args.data, "cifar10-subset"))
    weights = weights_path(args)
    work = rel(work)
    common = ["--dataset", args.dataset, "--data-root", data_root, "--L", str(b.L),
              "--seed", str(b.seed), "--device", args.device, "--quiet"]
    train_subset = [] if b.train_subset is None else ["--train-subset", str(b.train_subset)]
    evaluation = ["--test-subset", str(b.test_images), "--iterations", str(b.iterations),
                  "--restarts", str(b.restarts), "--strong", "--autoattack",
                  "--autoattack-eps", *[f"{e:g}" for e in b.autoattack_eps]]
    schedule = ["--pretrained-path", weights, "--epochs", str(b.epochs), "--k", str(b.k),
                "--lr", "0.0001"]
    training = schedule + train_subset
    logs = os.path.join(work, "logs")
    clusters = os.path.join(work, "pretrained_clusters", "checkpoint.pth")
    steps = []
    if "pretrained" in args.models:
        steps.append(Step("pretrained", "k-means clusters of the pretrained network",
                          ["-m", "utils.pretrained_clusters", "--out", clusters,
                           "--dataset", args.dataset, "--data-root", data_root,
                           "--pretrained-path", weights, "--k", str(b.k), "--L", str(b.L),
                           "--seed", str(b.seed), "--test-subset", str(b.test_images),
                           "--device", args.device, "--quiet", *train_subset],
                          os.path.join(logs, "pretrained_clusters.log")))
        steps.append(Step("pretrained", "evaluate the pretrained clusters",
                          ["main_clustr.py", "--checkpoint", os.path.join(work, "pretrained"),
                           "--evaluate-ckpt", clusters, *common, *evaluation],
                          os.path.join(logs, "pretrained.log"), needs=clusters))
    if "clustr" in args.models:
        steps.append(Step("clustr", "train ClusTR, then evaluate",
                          ["main_clustr.py", "--checkpoint", os.path.join(work, "clustr"),
                           *training, *common, *evaluation],
                          os.path.join(logs, "clustr.log")))
    if "qtrades" in args.models:
        steps.append(Step("qtrades", "train ClusTR+QTRADES, then evaluate",
                          ["main_clustr.py", "--checkpoint", os.path.join(work, "qtrades"),
                           *training, "--consistency-lambda", f"{b.consistency_lambda:g}",
                           *common, *evaluation],
                          os.path.join(logs, "qtrades.log")))
    if "free" in args.models:
        free = free_images(args, b)
        free_training = schedule + ([] if free is None else ["--train-subset", str(free)])
        steps.append(Step("free", "train ClusTR with free adversarial training, then evaluate",
                          ["main_clustr.py", "--checkpoint", os.path.join(work, "free"),
                           *free_training, "--minibatch-replays", str(b.minibatch_replays),
                           *common, *evaluation],
                          os.path.join(logs, "free.log")))
    steps.sort(key=lambda s: args.models.index(s.model))  # in the order --models lists them
    return steps


def run_step(step: Step) -> None:
    """Run one CLI call from the repository root; its output goes to ``step.log_path``."""
    if step.needs and not os.path.exists(os.path.join(REPO, step.needs)):
        step.tail = [f"skipped: {step.needs} was not written by the step before"]
        return
    path = os.path.join(REPO, step.log_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"[reproduce] {step.title}: {step.command}", flush=True)
    cpu0 = _children_cpu()
    start = time.time()
    env = dict(os.environ)
    if step.threads is not None:
        env.update(OMP_NUM_THREADS=str(step.threads), MKL_NUM_THREADS=str(step.threads))
    with open(path, "w") as log:
        step.rc = subprocess.run([sys.executable] + step.argv, cwd=REPO, stdout=log,
                                 stderr=subprocess.STDOUT, env=env).returncode
    step.seconds = time.time() - start
    step.cpu_seconds = _children_cpu() - cpu0
    with open(path) as log:
        step.tail = [line.rstrip() for line in log.readlines()[-5:]]
    status = "done" if step.rc == 0 else f"FAILED (exit {step.rc})"
    print(f"[reproduce]   {status} in {step.seconds:.0f}s; log {step.log_path}", flush=True)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- results ---------------------------------------------------------------------------------
def read_model(work: str, model: str) -> dict | None:
    """One model's experiment folder (``utils.tables``), its diagnostics and training log;
    None where the step wrote no experiment folder."""
    folder = os.path.join(REPO, work, model)
    label = MODELS[model] if model == "pretrained" else None  # others: from their arguments
    try:
        exp = tables.load_experiment(folder, label)
    except UsageError:
        return None
    exp.path = os.path.relpath(folder, REPO)  # as the commands, run from the repository root
    diagnostics = None
    if os.path.exists(os.path.join(folder, "diagnostics.json")):
        with open(os.path.join(folder, "diagnostics.json")) as f:
            diagnostics = json.load(f)
    log_rows = []
    log_path = os.path.join(folder, "log.txt")
    if os.path.exists(log_path):
        with open(log_path) as f:
            log_rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return {"exp": exp, "diagnostics": diagnostics, "log": log_rows}


def consistency_check(work: str, pretrained_path: str) -> tuple[str, bool] | None:
    """Whether the ClusTR+QTRADES run trained with a consistency term at all.

    The two runs share every argument but ``--consistency-lambda``. Evidence, in order: the
    ``consistency`` column of ``metrics.csv`` where the build writes one; otherwise how far
    apart the two runs' weights are, relative to how far ClusTR moved from the pretrained
    weights (CPU runs with identical arguments differ only by float noise, ~1e-5 of it).
    Returns the note for the report and whether the term was active.
    """
    paths = [os.path.join(REPO, work, m, "checkpoint.pth") for m in ("clustr", "qtrades")]
    if not all(os.path.exists(p) for p in paths):
        return None
    metrics = os.path.join(REPO, work, "qtrades", "metrics.csv")
    rows = read_csv(metrics) if os.path.exists(metrics) else []
    if rows and "consistency" in rows[0]:
        values = [float(r["consistency"] or 0) for r in rows]
        active = any(v > 0 for v in values)
        state = "active" if active else "**zero in every epoch**"
        return (f"ClusTR+QTRADES: the consistency term is {state} (mean weighted term per "
                f"step, by epoch: {', '.join(f'{v:.4g}' for v in values)}).", active)
    ratio = weight_change_ratio(paths[1], paths[0], pretrained_path)
    if ratio < NOISE_RATIO:
        return ("**ClusTR+QTRADES trained exactly like ClusTR**: this build writes no "
                "per-term metrics and the two runs' weights differ by "
                f"{ratio:.1e} of ClusTR's own update (float noise), so "
                "`--consistency-lambda` had no effect and the ClusTR+QTRADES row is plain "
                "ClusTR. Rerun with a build that implements the consistency term.", False)
    return (f"ClusTR+QTRADES: the weights differ from ClusTR's by {ratio:.2f} of ClusTR's own "
            "update (no per-term metrics in this build).", True)


NOISE_RATIO = 1e-2


def weight_change_ratio(a_path: str, b_path: str, base_path: str) -> float:
    """sum |w_a - w_b| / sum |w_b - w_base| over the learned tensors (no BN statistics)."""
    a, b = (load_checkpoint(p)["state_dict"] for p in (a_path, b_path))
    base = extract_state_dict(load_checkpoint(os.path.join(REPO, base_path)))
    keys = [k for k in b if b[k].is_floating_point() and "running_" not in k]
    apart = sum((a[k].double() - b[k].double()).abs().sum().item() for k in keys)
    moved = sum((b[k].double() - base[k].double()).abs().sum().item() for k in keys)
    return apart / max(moved, 1e-30)


# -- report ----------------------------------------------------------------------------------
def _accelerator(device: str) -> str:
    """', <GPU name>' when the runs will use a GPU, else ''."""
    if device == "cpu" or not torch.cuda.is_available():
        return ""
    index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    return f", {torch.cuda.get_device_name(index)}"


def render(args, run: dict, b: Budget, steps: list[Step], results: dict,
           consistency: tuple[str, bool] | None) -> str:
    quick = args.quick
    lines = ["# ClusTR reproduction report: the paper's PGD next to the strongest attacks", ""]
    if quick:
        lines += ["> **QUICK SMOKE RUN** (`--quick`): a toy budget that only checks the "
                  "pipeline end to end. Its numbers mean nothing; run without `--quick` "
                  "for the report.", ""]
    done = {m: r["exp"] for m, r in results.items() if r}
    if consistency and not consistency[1] and "qtrades" in done:
        done["qtrades"].label += " (**no consistency term**, see below)"
    n = next((x.strong_images for x in done.values() if x.strong_images), b.test_images)
    lines += [
        f"Generated {time.strftime('%Y-%m-%d %H:%M', time.localtime(run['started']))} by",
        "", "```bash", "python -m benchmarks.reproduce " + shlex.join(run["argv"]), "```", "",
        f"on {platform.node() or 'this machine'} ({platform.processor() or platform.machine()},"
        f" {os.cpu_count()} cores{_threads(args)}, torch {torch.__version__}, device "
        f"`{args.device}`"
        f"{run.get('accelerator') or ''}); load "
        f"average {run['load']:.1f} at the start and {run.get('load_end', float('nan')):.1f} "
        f"at the end{_load_caveat(args, run)}. Total "
        f"{(run.get('ended', time.time()) - run['started']) / 60:.1f} min.", "",
        "## Published figures, for context", "",
        f"The authors' {PUBLISHED}. The paper's protocol attacks a "
        "cross-entropy on bounded cluster scores; AutoAttack attacks the proper logit.", "",
        f"## Results on {n} fixed test images", "",
        "Robust accuracy in % (`python -m utils.tables` on the runs' folders, "
        f"`--eps {' '.join(f'{e:g}' for e in TABLE_EPS)} --every-attack`). *Paper PGD*: the "
        "paper's protocol (cross-entropy on the bounded cluster scores, step 2/255, "
        f"{b.iterations} iterations, {b.restarts} restart(s)). PGD-CE and PGD-DLR attack the "
        "proper logit with the same budget and random starts; AutoAttack standard at "
        f"{', '.join(f'{e:g}' for e in b.autoattack_eps)}/255. *Worst case*: an image counts "
        "as robust only if all of them failed; *gap*: paper PGD minus worst case.", ""]
    if done:
        df = tables.build_table([done[m] for m in MODELS if m in done], TABLE_EPS,
                                every_attack=True)
        lines.append(tables.to_text(df, "markdown", digits=1))
    lines += [f"* {MODELS[m]}: **failed**, no results (see 'Exact commands')"
              for m in args.models if m not in done]
    lines += ["", f"With {n} images one image is {100 / max(n, 1):.1f} points; the 95% "
              "interval of an accuracy near 50% is about "
              f"±{100 * 1.96 * (0.25 / max(n, 1)) ** 0.5:.0f} points.", ""]
    if consistency:
        lines += [consistency[0], ""]
    lines += _detail(args, results)
    lines += _diagnostics(args, results)
    lines += _commands(steps)
    lines += _budget(b, args, steps, results)
    lines += _scale_up(b)
    lines += _tables_howto(args.models)
    return "\n".join(lines) + "\n"


def _threads(args) -> str:
    return "" if args.threads is None else f", {args.threads} thread(s) per call"


def _load_caveat(args, run: dict) -> str:
    """A caveat where other work shared the processor: load beyond the report's own calls
    (``benchmarks.machine.busy_loads``, the benchmark's rule)."""
    load = {"start": run["load"], "end": run.get("load_end")}
    if not busy_loads(load, args.threads or usable_cores()):
        return ""
    return (" (other work shared the processor: the wall times are inflated; the CPU times "
            "below are the fairer measure)")


def _detail(args, results) -> list[str]:
    lines = ["## Every attack", "", "Robust accuracy in % (seconds) on the same images, from "
             "each run's attack_results_strong.csv.", ""]
    order = ("paper-pgd", "pgd-ce", "pgd-dlr", "autoattack", "worst-case")
    for model in args.models:
        res = results.get(model)
        if res is None or not res["exp"].strong:
            continue
        x = res["exp"]
        cells = {}
        for (eps, attack), acc in x.strong.items():
            if eps > 0:
                s = x.strong_seconds.get((eps, attack))
                cells[(attack, f"{eps:g}/255")] = f"{acc:.1f}" + (f" ({s:.0f}s)" if s else "")
        df = pd.Series(cells).unstack().reindex([a for a in order if any(
            k[0] == a for k in cells)]).fillna("")
        df = df[sorted(df.columns, key=lambda c: float(c.split("/")[0]))]
        df.index.name = "attack"
        lines += [f"**{x.label}**" + _training_note(res), "",
                  df.to_markdown(disable_numparse=True), ""]
    return lines


def _training_note(res) -> str:
    if not res["log"]:
        return ""
    last = res["log"][-1]
    return (f" (after epoch {last[0]}: train loss {float(last[2]):.3f}, train accuracy "
            f"{float(last[3]):.1f}%, test accuracy {float(last[5]):.1f}%)")


def _diagnostics(args, results) -> list[str]:
    lines = ["## Gradient-masking diagnostics", "",
             "Share of images whose input gradient is exactly zero (median l1 norm of the "
             "gradient), under the paper's loss and the adaptive ones, on the clean images and "
             "at the attacks' random start. Exactly-zero gradients need every counted "
             "cluster score to underflow; a saturated but non-zero paper loss shows up "
             "instead as the gap between the paper's PGD and the strongest attack.", ""]
    rows, warnings, threshold = [], [], 5.0
    for model in args.models:
        res = results.get(model)
        if res is None or res["diagnostics"] is None:
            continue
        d, label = res["diagnostics"], res["exp"].label
        threshold = d.get("gap_threshold", threshold)
        for point, stats in d["input_gradients"].items():
            rows.append({"model": label, "point": point} | {
                k: f"{100 * stats[k]['zero_fraction']:.1f}% ({stats[k]['median_l1']:.3g})"
                for k in ("paper", "pgd-ce", "pgd-dlr")})
        warnings += [f"* {label}: {w}" for w in d["warnings"]]
        if d.get("clean_prediction_disagreements"):
            warnings.append(f"* {label}: the logit and the paper's scores disagree on "
                            f"{d['clean_prediction_disagreements']} clean prediction(s)")
    if rows:
        lines += [pd.DataFrame(rows).to_markdown(index=False), ""]
    lines += [f"Warnings (the paper's PGD more than {threshold:g} points above the strongest "
              "attack):", ""]
    lines += warnings or ["* none"]
    return lines + [""]


def _commands(steps: list[Step]) -> list[str]:
    lines = ["## Exact commands and times", "",
             "Run from the repository root, in this order. Wall time and CPU time (user + "
             "system, all threads) per call.", ""]
    for s in steps:
        if s.rc is None:
            status = s.tail[0] if s.tail else "not run"
        else:
            status = (f"{s.seconds / 60:.1f} min wall, {s.cpu_seconds / 60:.1f} min CPU" +
                      ("" if s.rc == 0 else f"; **failed with exit status {s.rc}**"))
        lines += [f"* {s.title} ({status}; log `{s.log_path}`):", "", "  ```bash",
                  f"  {s.command}", "  ```", ""]
        if s.rc not in (0, None):
            lines += ["  Last lines of its log:", "", "  ```"] + \
                     [f"  {t}" for t in s.tail] + ["  ```", ""]
    return lines


def _budget(b: Budget, args, steps: list[Step], results: dict) -> list[str]:
    train = "all training images" if b.train_subset is None else \
        f"a class-balanced subset of {b.train_subset} training images"
    return ["## Budget", "",
            f"* Data: `--dataset {args.dataset}` ({train}); evaluation on {b.test_images} "
            f"class-balanced test images (`--test-subset {b.test_images} --seed {b.seed}`), "
            "the same for every model.",
            f"* Training: {b.epochs} epoch(s) of Magnet-loss training (m = 12, d = 20) from "
            f"the pretrained weights, Adam lr 1e-4, K = {b.k}, L = {b.L}; ClusTR+QTRADES adds "
            f"`--consistency-lambda {b.consistency_lambda:g}`; ClusTR+Free adds "
            f"`--minibatch-replays {b.minibatch_replays}`: each batch is replayed "
            f"M = {b.minibatch_replays} times on x + δ, every replay one optimiser step whose "
            "backward also gives δ its signed step of 8/255 (δ carried from batch to batch)"
            f"{_free_cost(args, b)} Neither the seed README nor the original code (default 0) "
            "fixes M; 8 is the CIFAR-10 setting of free adversarial training (Shafahi et al., "
            "2019).",
            "* The pretrained clusters are ClusTR at epoch 0: the same k-means on the "
            "un-augmented, eval-mode training embeddings, no weight update.",
            f"* Paper PGD, PGD-CE and PGD-DLR: eps in {{2, 8, 16, 25.5}}/255, step 2/255, "
            f"{b.iterations} iterations, {b.restarts} restart(s), same random starts; the "
            "paper keeps the highest-loss restart, the adaptive attacks keep any restart "
            "that fools the model.",
            "* AutoAttack: pyautoattack 0.2.0, standard version (APGD-CE, APGD-T, FAB-T, "
            f"Square), eps {', '.join(f'{e:g}' for e in b.autoattack_eps)}/255, on the "
            "model's logit; its adversarial images are re-checked (inside the ball, in [0, 1],"
            " misclassified) before they count.",
            f"* Cost: {_cost(steps, results, b)}", ""]


def _free_cost(args, b: Budget) -> str:
    free = free_images(args, b)
    if free == b.train_subset:
        return (", on the same images as the others, so its epoch makes M times the steps of "
                "a ClusTR epoch (`--free-train-subset all`).")
    others = training_images(args, b)
    cli = train_setting.build_parser()
    batch = cli.get_default("m") * cli.get_default("d")  # main_clustr.py's Magnet batch
    return (f", on {free} class-balanced training images (`--train-subset {free}`, 1/M of "
            f"the others' {others}), so that its {free // batch} batches x M replays make "
            f"{free // batch * b.minibatch_replays} optimiser steps per epoch against "
            f"ClusTR's {others // batch}, at about the same cost: free adversarial "
            "training keeps the cost of plain training by dividing its passes over the data "
            "by M. `--free-train-subset all` trains it on the others' images, at M times the "
            "cost.")


def _cost(steps: list[Step], results: dict, b: Budget) -> str:
    """This run's measured cost: wall and CPU minutes of every call, AutoAttack's seconds."""
    ran = [s for s in steps if s.rc is not None]
    text = (f"the calls took {sum(s.seconds for s in ran) / 60:.1f} min wall and "
            f"{sum(s.cpu_seconds for s in ran) / 60:.1f} min CPU in all (per call: 'Exact "
            "commands')")
    aa = [(r["exp"].label, r["exp"].strong_seconds.get((e, "autoattack")))
          for r in results.values() if r for e in b.autoattack_eps]
    aa = [(label, s) for label, s in aa if s]
    if aa:
        text += "; AutoAttack took " + ", ".join(f"{s:.0f} s ({label})" for label, s in aa)
    return text + "."


def _scale_up(b: Budget) -> list[str]:
    return ["## Scaling up (GPU, full data sets)", "",
            "Every knob is a flag of this command (or of `main_clustr.py`, which it calls):",
            "",
            "* `--device cuda` runs every step on the GPU.",
            "* `--dataset cifar10 --data-root ./data` (or `cifar100`, `svhn`) uses the full "
            "data set, downloaded by torchvision; `--pretrained-path` names the "
            "cross-entropy ResNet18 for that data set.",
            "* `--epochs 30` is the seed README's training budget (`--epochs 90` the "
            "original's default).",
            "* `--iterations 20 --restarts 10` is the original's default PGD; "
            "`--iterations 100` gives the PGD-100 of the published 74.04%.",
            "* `--test-images 10000` evaluates the whole CIFAR-10 test set (the strong "
            "attacks cost most: AutoAttack runs all its 100 APGD iterations per batch; "
            "on these non-robust models about 0.7 s per image on 2 idle CPU cores and 0.02 s "
            "on an H100, more for every image that survives APGD-CE).",
            "* `--autoattack-eps 2 8` adds AutoAttack at 2/255.", ""]


def _tables_howto(models) -> list[str]:
    folders = " ".join(f"WORK/{m}" for m in models if m != "pretrained")
    return ["## The same table from your own experiment folders", "",
            "The results table above is `utils/tables.py`, which also works on any "
            "`--checkpoint` folders of `main_clustr.py` (WORK: this report's `--work` folder):",
            "", "```bash",
            f"python -m utils.tables {folders} --format markdown",
            f"python -m utils.tables \"pretrained clusters=WORK/pretrained\" {folders} "
            "--format latex --eps 8 --out table.tex --plot accuracy.png",
            "```", "",
            "* One row per folder, labelled from its `params.txt` (`ClusTR`, "
            "`ClusTR+QTRADES (λ=12.5)`, `ClusTR+Free (M=8)`; a linear-head checkpoint is "
            "`baseline (linear head)`; an evaluation-only folder takes the arguments of the "
            "run that wrote its checkpoint); `NAME=FOLDER` sets a label.",
            "* Columns: clean, the paper's PGD per eps, then, from `attack_results_strong.csv` "
            "(`--strong`, `--autoattack`): AutoAttack, the worst case over every attack and the "
            "gap (paper PGD − worst case, on the same images) per eps; `--every-attack` adds "
            "PGD-CE and PGD-DLR. The header gives the PGD iterations × restarts and the number "
            "of test images when every row shares them; otherwise a `protocol` column appears "
            "and a note says which settings differ.",
            "* A folder without strong results keeps those cells empty, and a note gives the "
            "`main_clustr.py --evaluate-ckpt ... --strong --autoattack` call that fills them "
            "(into a new folder, tabled in its place).",
            "* `--format markdown|latex|csv` (pandas' `to_markdown`, `to_latex`, `to_csv`; "
            "the CSV holds full precision and sends the notes to stderr); `--plot FILE`: "
            "accuracy against eps, one colour per folder, the paper's PGD solid and the worst "
            "case dashed.",
            "* In Python: `from utils.tables import experiment_table; "
            "df = experiment_table(['expA', 'expB'])` (notes in `df.attrs['notes']`).",
            "* A path that is not an experiment folder, or a file of another format (other CSV "
            "columns, eps not in units of 1/255, an `eval_summary.json` of another run): one "
            "line, exit status 2.", ""]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.render_only:
        return render_only(args)
    work = rel(args.work or os.path.join("reproduce_runs", time.strftime("%Y%m%d-%H%M%S")))
    if os.path.isdir(os.path.join(REPO, work)) and os.listdir(os.path.join(REPO, work)):
        print(f"error: {work} already holds runs: pass a new --work folder, or "
              "--render-only to rewrite its report", file=sys.stderr)
        return 2
    if not os.path.isdir(args.data) and args.data_root is None:
        print(f"error: {args.data}: no such folder (expected cifar10-subset/ and weights/)",
              file=sys.stderr)
        return 2
    run = {"argv": argv, "work": work, "started": time.time(), "load": os.getloadavg()[0],
           "accelerator": _accelerator(args.device)}
    steps = plan(args, budget_from(args), work)
    for step in steps:
        step.threads = args.threads
        run_step(step)
        _save_run(run, steps)
    run["ended"], run["load_end"] = time.time(), os.getloadavg()[0]
    _save_run(run, steps)
    write_report(args, run, steps, args.out)
    return 0 if all(s.rc == 0 for s in steps) else 1


def render_only(args) -> int:
    """Rewrite the report of the runs in ``--work`` (no attack or training is rerun)."""
    if not args.work:
        print("error: --render-only needs the --work folder of a finished run",
              file=sys.stderr)
        return 2
    path = os.path.join(REPO, rel(args.work), RUN_FILE)
    if not os.path.exists(path):
        print(f"error: {path} not found: not the --work folder of a run", file=sys.stderr)
        return 2
    with open(path) as f:
        run = json.load(f)
    steps = [Step(**s) for s in run.pop("steps")]
    write_report(build_parser().parse_args(run["argv"]), run, steps, args.out)
    return 0


def write_report(args, run: dict, steps: list[Step], out: str) -> None:
    work = run["work"]
    results = {m: read_model(work, m) for m in args.models}
    consistency = None
    if {"clustr", "qtrades"} <= set(args.models):
        consistency = consistency_check(work, weights_path(args))
    report = render(args, run, budget_from(args), steps, results, consistency)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_text_atomic(out, report)
    print(f"[reproduce] wrote {out}")


RUN_FILE = "run.json"


def _save_run(run: dict, steps: list[Step]) -> None:
    """The run's arguments, times and steps, so that ``--render-only`` can rewrite it."""
    text = json.dumps({**run, "steps": [asdict(s) for s in steps]}, indent=2)
    write_text_atomic(os.path.join(REPO, run["work"], RUN_FILE), text + "\n")


if __name__ == "__main__":
    sys.exit(main())
