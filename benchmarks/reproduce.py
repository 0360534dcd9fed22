"""One command, one report: the paper's PGD next to the strongest attacks, per model.

    python -m benchmarks.reproduce --data ../shared/data --out docs/REPRODUCTION.md

On the shared data (real CIFAR-10 images and a real pretrained ResNet18) it

1. turns the untouched pretrained network into a cluster classifier (ClusTR at epoch 0:
   k-means on the training embeddings, K = 2, L = 20) and evaluates it;
2. trains ClusTR for a small fixed budget and evaluates it;
3. trains ClusTR+QTRADES (``--consistency-lambda 12.5``) for the same budget and evaluates it;

each model with one CLI call of this project (``main_clustr.py``, whose training ends with
the evaluation), on the same fixed test images: the paper's PGD, then ``--strong``
(PGD-CE and PGD-DLR on the proper logit) and ``--autoattack`` (standard AutoAttack at
8/255). It then writes a Markdown report: the table of clean, paper-PGD and strongest
accuracy, the exact commands, budgets and times, and the published figures for context.
A failed step is reported as failed; the others still run.

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

import torch

from base.io import load_checkpoint, write_text_atomic
from models.checkpoint import extract_state_dict
from utils.outputs.results import read_csv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "pretrained": "pretrained ResNet18 + k-means clusters (no ClusTR training)",
    "clustr": "ClusTR",
    "qtrades": "ClusTR+QTRADES",
}
TABLE_EPS = (2.0, 8.0)
PUBLISHED = ("released ClusTR+QTRADES CIFAR-10 model: clean 91.03%, paper's PGD-100 at "
             "8/255 74.04%, AutoAttack at 8/255 0.00%; a cross-entropy-only attack left it "
             "above 51%")


@dataclass
class Budget:
    """What one report costs; ``FULL`` is sized for about 30-40 minutes on 2 idle cores."""

    epochs: int = 1
    train_subset: int | None = None     # None: all 5,085 shared training images
    test_images: int = 100              # fixed, class-balanced test images (--test-subset)
    iterations: int = 20                # the seed README's command
    restarts: int = 1
    autoattack_eps: tuple[float, ...] = (8.0,)
    consistency_lambda: float = 12.5    # the seed README's ClusTR+QTRADES command
    L: int = 20
    k: int = 2
    seed: int = 111


FULL = Budget()
COST_NOTE = (
    "the full budget took 10.1 minutes on 2 idle CPU cores (AMD EPYC, 2026-11-26) and 1.3 "
    "minutes on one NVIDIA H100; each call's time is listed under 'Exact commands'. On the "
    "CPU, AutoAttack's APGD-CE took 58-73 s per model (on the 91-92 images correct when clean) "
    "and broke every one, "
    "so APGD-T, FAB-T and Square had nothing left to attack; on a robust model they run on "
    "every image APGD-CE leaves, and the evaluation takes far longer.")
QUICK = Budget(epochs=1, train_subset=480, test_images=10, iterations=2, restarts=1)


@dataclass
class Step:
    model: str
    title: str
    argv: list[str]
    log_path: str
    needs: str | None = None            # output file that must exist before this step runs
    rc: int | None = None               # None: not run
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    tail: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        return shlex.join(["python"] + self.argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce",
                                description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data",
                   help="folder with cifar10-subset/ and weights/resnet18_cifar10.pt "
                        "(../shared/data)")
    p.add_argument("--out", default="docs/REPRODUCTION.md",
                   help="the report to write (docs/REPRODUCTION.md)")
    p.add_argument("--work", default=None,
                   help="folder for the runs (default: reproduce_runs/<date-time>)")
    p.add_argument("--quick", action="store_true",
                   help="toy budget to check the pipeline in a few minutes")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                   help="which models to run (all)")
    p.add_argument("--device", default="auto", help="passed to every run (auto)")
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
    return p


def budget_from(args) -> Budget:
    base = QUICK if args.quick else FULL
    given = {name: getattr(args, name) for name in
             ("epochs", "train_subset", "test_images", "iterations", "restarts",
              "consistency_lambda") if getattr(args, name) is not None}
    if args.autoattack_eps is not None:
        given["autoattack_eps"] = tuple(args.autoattack_eps)
    return Budget(**{**base.__dict__, **given})


def rel(path: str) -> str:
    """``path`` for commands run from the repository root: as given when absolute, else
    relative to the repository."""
    return path if os.path.isabs(path) else os.path.relpath(os.path.abspath(path), REPO)


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
    training = ["--pretrained-path", weights, "--epochs", str(b.epochs), "--k", str(b.k),
                "--lr", "0.0001", *train_subset]
    logs = os.path.join(work, "logs")
    clusters = os.path.join(work, "pretrained_clusters", "checkpoint.pth")
    steps = []
    if "pretrained" in args.models:
        steps.append(Step("pretrained", "k-means clusters of the pretrained network",
                          ["-m", "benchmarks.pretrained_clusters", "--out", clusters,
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
    with open(path, "w") as log:
        step.rc = subprocess.run([sys.executable] + step.argv, cwd=REPO, stdout=log,
                                 stderr=subprocess.STDOUT).returncode
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
    """The evaluation outputs of one model's run, or None where they are missing."""
    folder = os.path.join(REPO, work, model)
    strong = os.path.join(folder, "attack_results_strong.csv")
    if not os.path.exists(strong):
        return None
    rows = read_csv(strong)
    acc = {(float(r["epsilon"]), r["attack"]): float(r["robust_accuracy"]) for r in rows}
    seconds = {(float(r["epsilon"]), r["attack"]): r["seconds"] for r in rows}
    with open(os.path.join(folder, "diagnostics.json")) as f:
        diagnostics = json.load(f)
    log_rows = []
    log_path = os.path.join(folder, "log.txt")
    if os.path.exists(log_path):
        with open(log_path) as f:
            log_rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return {"acc": acc, "seconds": seconds, "examples": int(rows[0]["examples"]),
            "diagnostics": diagnostics, "log": log_rows}


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
def _fmt(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def _strongest(res: dict, eps: float) -> tuple[float | None, str]:
    """The worst-case accuracy at ``eps`` and the single attack(s) that come lowest."""
    singles = {a: v for (e, a), v in res["acc"].items()
               if e == eps and a not in ("worst-case", "clean")}
    low = min(singles.values()) if singles else None
    return res["acc"].get((eps, "worst-case")), ", ".join(a for a, v in singles.items()
                                                          if v == low)


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
    n = next((r["examples"] for r in results.values() if r), b.test_images)
    lines += [
        f"Generated {time.strftime('%Y-%m-%d %H:%M', time.localtime(run['started']))} by",
        "", "```bash", "python -m benchmarks.reproduce " + shlex.join(run["argv"]), "```", "",
        f"on {platform.node() or 'this machine'} ({platform.processor() or platform.machine()},"
        f" {os.cpu_count()} cores, torch {torch.__version__}, device `{args.device}`"
        f"{run.get('accelerator') or ''}); load "
        f"average {run['load']:.1f} at the start and {run.get('load_end', float('nan')):.1f} "
        f"at the end{_load_caveat(run)}. Total "
        f"{(run.get('ended', time.time()) - run['started']) / 60:.1f} min.", "",
        "## Published figures, for context", "",
        f"The authors' {PUBLISHED}. The paper's protocol attacks a "
        "cross-entropy on bounded cluster scores; AutoAttack attacks the proper logit.", "",
        f"## Results on {n} fixed test images", "",
        "Robust accuracy in %. *Paper PGD*: the paper's protocol (cross-entropy on the "
        f"bounded cluster scores, step 2/255, {b.iterations} iterations, {b.restarts} "
        "restart(s)). *Strongest*: worst case per image over every attack run at that eps "
        "(paper PGD, PGD-CE and PGD-DLR on the logit with the same budget, and AutoAttack "
        f"standard at {', '.join(f'{e:g}' for e in b.autoattack_eps)}/255): an image counts "
        "as robust only if all of them failed.", "",
        "| model | clean | paper PGD 2/255 | strongest 2/255 | paper PGD 8/255 | "
        "strongest 8/255 | strongest single attack at 8/255 |",
        "|---|---|---|---|---|---|---|"]
    for model in args.models:
        res = results.get(model)
        label = MODELS[model]
        if model == "qtrades" and consistency and not consistency[1]:
            label += " (**no consistency term**, see below)"
        if res is None:
            lines.append(f"| {label} | failed: see below | | | | | |")
            continue
        cells = [_fmt(res["acc"].get((0.0, "clean")))]
        for eps in TABLE_EPS:
            cells += [_fmt(res["acc"].get((eps, "paper-pgd"))), _fmt(_strongest(res, eps)[0])]
        cells.append(_strongest(res, 8.0)[1] or "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"With {n} images one image is {100 / max(n, 1):.1f} points; the 95% "
              "interval of an accuracy near 50% is about "
              f"±{100 * 1.96 * (0.25 / max(n, 1)) ** 0.5:.0f} points.", ""]
    if consistency:
        lines += [consistency[0], ""]
    lines += _detail(args, results)
    lines += _diagnostics(args, results)
    lines += _commands(steps)
    lines += _budget(b, args)
    lines += _scale_up(b)
    return "\n".join(lines) + "\n"


def _load_caveat(run: dict) -> str:
    busiest = max(run["load"], run.get("load_end", 0.0))
    if busiest <= (os.cpu_count() or 1):
        return ""
    return (" (above the core count: the machine was shared and the wall times are "
            "inflated; the CPU times below are the fairer measure)")


def _detail(args, results) -> list[str]:
    lines = ["## Every attack", "", "Robust accuracy in % (seconds) on the same images.", ""]
    for model in args.models:
        res = results.get(model)
        if res is None:
            continue
        eps_all = sorted({e for e, _ in res["acc"] if e > 0})
        attacks = [a for a in ("paper-pgd", "pgd-ce", "pgd-dlr", "autoattack", "worst-case")
                   if any(k[1] == a for k in res["acc"])]
        lines += [f"**{MODELS[model]}**" + _training_note(res), "",
                  "| attack | " + " | ".join(f"{e:g}/255" for e in eps_all) + " |",
                  "|---|" + "---|" * len(eps_all)]
        for a in attacks:
            cells = []
            for e in eps_all:
                v = res["acc"].get((e, a))
                s = res["seconds"].get((e, a)) or ""
                cells.append("" if v is None else f"{v:.1f}" + (f" ({float(s):.0f}s)" if s
                                                                 else ""))
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
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
             "instead as the gap between the paper's PGD and the strongest attack.", "",
             "| model | point | paper | pgd-ce | pgd-dlr |", "|---|---|---|---|---|"]
    warnings = []
    for model in args.models:
        res = results.get(model)
        if res is None:
            continue
        d = res["diagnostics"]
        for point, stats in d["input_gradients"].items():
            cells = [f"{100 * stats[k]['zero_fraction']:.1f}% ({stats[k]['median_l1']:.3g})"
                     for k in ("paper", "pgd-ce", "pgd-dlr")]
            lines.append(f"| {MODELS[model]} | {point} | " + " | ".join(cells) + " |")
        warnings += [f"* {MODELS[model]}: {w}" for w in d["warnings"]]
        if d.get("clean_prediction_disagreements"):
            warnings.append(f"* {MODELS[model]}: the logit and the paper's scores disagree on "
                            f"{d['clean_prediction_disagreements']} clean prediction(s)")
    lines += ["", "Warnings (the paper's PGD more than "
              f"{results_threshold(results):g} points above the strongest attack):", ""]
    lines += warnings or ["* none"]
    return lines + [""]


def results_threshold(results) -> float:
    return next((r["diagnostics"]["gap_threshold"] for r in results.values() if r), 5.0)


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


def _budget(b: Budget, args) -> list[str]:
    train = "all training images" if b.train_subset is None else \
        f"a class-balanced subset of {b.train_subset} training images"
    return ["## Budget", "",
            f"* Data: `--dataset {args.dataset}` ({train}); evaluation on {b.test_images} "
            f"class-balanced test images (`--test-subset {b.test_images} --seed {b.seed}`), "
            "the same for every model.",
            f"* Training: {b.epochs} epoch(s) of Magnet-loss training (m = 12, d = 20) from "
            f"the pretrained weights, Adam lr 1e-4, K = {b.k}, L = {b.L}; ClusTR+QTRADES adds "
            f"`--consistency-lambda {b.consistency_lambda:g}`.",
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
            f"* Cost: {COST_NOTE}", ""]


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
