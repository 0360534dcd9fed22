"""The reproduction report's Markdown and its curves, from the calls recorded in WORK: every
table a pandas DataFrame written by ``to_markdown``, the results ``utils.tables``' table of the
rows' evaluation folders (the code of ``python -m utils.tables``)."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict

import pandas as pd
import torch

from base.errors import UsageError
from base.io import pyplot, save_figure, write_text_atomic
from benchmarks.reproduce_plan import ROWS, TRAINING, Budget, Paths, Step, at, row_epochs
from utils import experiments, tables

TABLE_EPS = (2.0, 8.0)
CURVE_EPS = 8.0  # on the evaluation's eps grid (utils.attacks.pgd.EPSILONS): always measured
SMOKE = "> **Smoke run**: a toy budget that checks the pipeline; its numbers mean nothing."
RESULTS = ("Accuracy in % (`python -m utils.tables --every-attack` on the rows' evaluation "
           "folders); the paper's PGD attacks a cross-entropy on the bounded cluster scores, "
           "PGD-CE, PGD-DLR and AutoAttack the logit. Published (the authors' λ = 8 CIFAR-10 "
           "model): clean 91.03%, paper's PGD-100 at 8/255 74.04%, AutoAttack 0.00%.")
CURVES = ("The paper's PGD and the per-image worst case of every attack at {eps:g}/255, "
          "against the epoch, on {n} fixed test images (epoch 0: the pretrained clusters for "
          "the ClusTR rows, the plain network for the FGSM baseline, which is evaluated at its "
          "last epoch only).")
BUDGET = ("How this budget was chosen: {b.chosen}. PGD step 2/255 and L = 20 at evaluation, "
          "AutoAttack standard at 8/255; ClusTR+Free replays every batch M = {b.replays} times "
          "over epochs / M passes (as free adversarial training is run: the cost of plain "
          "training).")
CALLS = ("Run from the repository root; a call stopped in one sitting continued in the next "
         "with its own `--resume`.")


def load(paths: Paths, key: str, label: str | None = None) -> experiments.Experiment | None:
    """The results of a call, or None where it has not (yet) written them."""
    try:
        return experiments.load_experiment(at(paths(key)), label)
    except UsageError:
        return None


def curve_frame(steps: list[Step], paths: Paths) -> pd.DataFrame:
    """One row per (trained row, epoch, attack): the paper's PGD and the per-image worst case
    of every attack at 8/255 on the curves' images; epoch 0, the starting point, is the
    pretrained clusters for every ClusTR row, the plain network for the FGSM baseline; a
    row with no later epoch evaluated yet has no points."""
    trained = {s.key.split("/")[0] for s in steps if s.key.endswith("/train")}
    points = []
    for s in steps:
        row, part, epoch = (s.key.split("/") + [""])[:3]
        x = load(paths, s.key) if part == "curve" else None
        if x is None:
            continue
        rows = [row] if epoch != "0" else TRAINING if row == "pretrained" else ["fgsm"]
        for r in [r for r in rows if r in trained]:
            points += [(r, int(epoch), "paper PGD", x.paper[CURVE_EPS]),
                       (r, int(epoch), "worst case", x.strong[(CURVE_EPS, "worst-case")])]
    frame = pd.DataFrame(points, columns=["row", "epoch", "attack", "accuracy"])
    trained_since = set(frame.loc[frame["epoch"] > 0, "row"])  # a row not trained yet: no line
    return frame[frame["row"].isin(trained_since)].reset_index(drop=True)


def plot_curves(frame: pd.DataFrame, path: str) -> list[str]:
    """One colour per row, the paper's PGD solid, the worst case dashed; the lines' labels."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    rows = list(dict.fromkeys(frame["row"]))
    for (row, attack), line in frame.sort_values("epoch").groupby(["row", "attack"], sort=False):
        ax.plot(line["epoch"], line["accuracy"], "-" if attack == "paper PGD" else "--",
                marker="o", color=f"C{rows.index(row)}", label=f"{ROWS[row]}: {attack}")
    ax.set(xlabel="epoch", ylabel=f"robust accuracy at {CURVE_EPS:g}/255 (%)", ylim=(-2, 102))
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    labels = [t.get_text() for t in ax.legend(fontsize=7).get_texts()]
    fig.tight_layout()
    save_figure(fig, path)
    return labels


def budget_frame(b: Budget) -> pd.DataFrame:
    """What every row is evaluated on; the training is the rows table's."""
    return pd.DataFrame([{
        "budget": b.name,
        "test images: clean, paper's PGD": b.test_images or "all",
        "PGD-CE, PGD-DLR, AutoAttack (fixed, class-balanced)": b.strong_images,
        "PGD iterations × restarts": f"{b.iterations} × {b.restarts}",
        "curves: images, restarts": f"{b.curve_images}, 1"}])


def rows_frame(b: Budget, steps: list[Step], train_count: int) -> pd.DataFrame:
    """The trained rows: their epochs, training images and command."""
    trained = {s.key.split("/")[0]: s for s in steps if s.key.endswith("/train")}
    return pd.DataFrame([{"row": ROWS[row], "epochs": row_epochs(b, row, train_count)[0],
                          "training images": row_epochs(b, row, train_count)[1] or train_count,
                          "command": "python " + " ".join(s.argv)}
                         for row, s in trained.items() if row != "pretrained"])


def calls_frame(run, steps: list[Step]) -> pd.DataFrame:
    recs = [run.steps.get(s.key, {}) for s in steps]
    return pd.DataFrame({"call": [s.key for s in steps],
                         "status": [r.get("status", "not run") for r in recs],
                         "sittings": [r.get("runs", 0) for r in recs],
                         "minutes": [round(r.get("seconds", 0.0) / 60, 1) for r in recs]})


def sittings_frame(sittings: list[dict]) -> pd.DataFrame:
    """Each sitting's start and end (a killed one: when it last saved), and the load then."""
    def when(t):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))

    ends = [s.get("end") or s.get("saved", s["start"]) for s in sittings]
    return pd.DataFrame({
        "started": [when(s["start"]) for s in sittings],
        "ended": [when(e) + ("" if "end" in s else " (killed)") for s, e in zip(sittings, ends)],
        "minutes": [round((e - s["start"]) / 60, 1) for s, e in zip(sittings, ends)],
        "load at start": [round(s["load"], 1) for s in sittings],
        "load at end": [round(s.get("load_end", float("nan")), 1) for s in sittings]})


def results(steps: list[Step], paths: Paths) -> str:
    """The rows' results (``utils.tables``) and the rows that have none yet."""
    evaluated = [s.key.split("/")[0] for s in steps if s.key.endswith("/eval")]
    exps = {row: load(paths, f"{row}/eval", ROWS[row]) for row in ROWS if row in evaluated}
    done = [x for x in exps.values() if x is not None]
    table = tables.to_text(tables.experiment_table(done, TABLE_EPS, every_attack=True),
                           "markdown", digits=1) if done else ""
    return table + "".join(f"* {ROWS[row]}: no results yet (see the calls below)\n"
                           for row, x in exps.items() if x is None)


def render(run, b: Budget, steps: list[Step], paths: Paths, train_count: int,
           png: str) -> str:
    sittings = run.state["sittings"]
    machine = (f"{platform.node() or 'this machine'} ({platform.machine()}, {os.cpu_count()} "
               f"cores, torch {torch.__version__})")
    parts = [f"# ClusTR reproduction report, budget `{b.name}`", SMOKE if b.name == "smoke"
             else "", f"Generated by `python -m benchmarks.reproduce {' '.join(run.state['argv'])}`"
             f" on {machine}, in {len(sittings)} sitting(s)"
             + (" (resumed):" if len(sittings) > 1 else ":"),
             sittings_frame(sittings).to_markdown(index=False),
             "## Budget", budget_frame(b).to_markdown(index=False), BUDGET.format(b=b),
             rows_frame(b, steps, train_count).to_markdown(index=False),
             "## Results", RESULTS, results(steps, paths),
             "## Curves", CURVES.format(eps=CURVE_EPS, n=b.curve_images), f"![curves]({png})",
             "## Calls", CALLS, calls_frame(run, steps).to_markdown(index=False)]
    return "\n\n".join(p.strip() for p in parts if p) + "\n"


def write_report(run, b: Budget, steps: list[Step], paths: Paths, train_count: int) -> None:
    out = at(paths.out)
    png = os.path.splitext(out)[0] + "_curves.png"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    frame = curve_frame(steps, paths)
    if len(frame):
        plot_curves(frame, png)
    write_text_atomic(out, render(run, b, steps, paths, train_count, os.path.basename(png)))
    print(f"[reproduce] wrote {paths.out} (budget: {asdict(b)})")
