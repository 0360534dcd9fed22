"""The reproduction report's Markdown and its curves, from the calls recorded in WORK.

Every table is a pandas DataFrame written by ``to_markdown``; the results table is
``utils.tables`` (the code of ``python -m utils.tables``) on the rows' evaluation folders.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict

import pandas as pd
import torch

from base.errors import UsageError
from base.io import write_text_atomic
from benchmarks.reproduce_plan import REPO, ROWS, TRAINING, Budget, Paths, Step, row_epochs
from utils import experiments, tables

TABLE_EPS = (2.0, 8.0)
CURVE_EPS = 8.0
PUBLISHED = ("The authors' released ClusTR+QTRADES CIFAR-10 model (λ = 8): clean 91.03%, the "
             "paper's PGD-100 at 8/255 74.04%, AutoAttack at 8/255 0.00%. The paper's PGD "
             "attacks a cross-entropy on the bounded cluster scores; PGD-CE, PGD-DLR and "
             "AutoAttack attack the classifier's logit.")


def load(paths: Paths, key: str, label: str | None = None) -> experiments.Experiment | None:
    try:
        return experiments.load_experiment(os.path.join(REPO, paths(key)), label)
    except UsageError:
        return None


def curve_frame(steps: list[Step], paths: Paths) -> pd.DataFrame:
    """One row per (row, epoch, attack): the paper's PGD and the per-image worst case of
    every attack at 8/255 on the curves' images. Epoch 0 is the starting point."""
    points = []
    for s in steps:
        parts = s.key.split("/")
        if len(parts) != 3 or parts[1] != "curve":
            continue
        x = load(paths, s.key, s.key)
        if x is None:
            continue
        rows = [parts[0]] if parts[2] != "0" else [
            r for r in TRAINING if parts[0] == "pretrained"] or ["fgsm"]
        for row in rows:
            for attack, value in (("paper PGD", x.paper.get(CURVE_EPS)),
                                  ("worst case", x.strong.get((CURVE_EPS, "worst-case")))):
                if value is not None:
                    points.append({"row": row, "epoch": int(parts[2]), "attack": attack,
                                   "accuracy": value})
    trained = {s.key.split("/")[0] for s in steps if s.key.endswith("/train")}
    frame = pd.DataFrame(points, columns=["row", "epoch", "attack", "accuracy"])
    return frame[frame["row"].isin(trained)].reset_index(drop=True)


def plot_curves(frame: pd.DataFrame, path: str) -> list[str]:
    """One line per row and attack kind (the paper's PGD solid, the worst case dashed);
    returns the lines' labels."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    labels = []
    for i, (row, part) in enumerate(frame.groupby("row", sort=False)):
        for attack, style in (("paper PGD", "-"), ("worst case", "--")):
            line = part[part["attack"] == attack].sort_values("epoch")
            if len(line):
                labels.append(f"{ROWS[row]}: {attack}")
                ax.plot(line["epoch"], line["accuracy"], style, marker="o", color=f"C{i}",
                        label=labels[-1])
    ax.set(xlabel="epoch", ylabel=f"robust accuracy at {CURVE_EPS:g}/255 (%)", ylim=(-2, 102))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return labels


def budget_frame(b: Budget, steps: list[Step], train_count: int) -> pd.DataFrame:
    n = "all"
    settings = {
        "training epochs (ClusTR rows, FGSM baseline)": b.epochs,
        "training images": b.train_images or f"{n} ({train_count})",
        "test images: clean and the paper's PGD": b.test_images or n,
        "test images: PGD-CE, PGD-DLR, AutoAttack (fixed, class-balanced)": b.strong_images,
        "PGD iterations × restarts (paper's PGD, PGD-CE, PGD-DLR; step 2/255)":
            f"{b.iterations} × {b.restarts}",
        "AutoAttack": "standard, 8/255",
        "curves: images, PGD iterations × restarts": f"{b.curve_images}, {b.iterations} × 1",
        "ClusTR+Free": f"M = {b.replays} replays per batch, over epochs / M passes (as free "
                       "adversarial training is run: the cost of plain training)",
        "L at evaluation": 20,
        "how this budget was chosen": b.chosen,
    }
    return pd.DataFrame({"setting": list(settings), "value": [str(v) for v in
                                                              settings.values()]})


def rows_frame(b: Budget, steps: list[Step], train_count: int) -> pd.DataFrame:
    rows = []
    for s in steps:
        row, part = s.key.split("/")[:2]
        if part != "train" or row in ("pretrained",):
            continue
        epochs, images = row_epochs(b, row, train_count)
        rows.append({"row": ROWS[row], "epochs": epochs,
                     "training images": images or train_count,
                     "command": "python " + " ".join(s.argv)})
    return pd.DataFrame(rows)


def calls_frame(run_steps: dict, steps: list[Step]) -> pd.DataFrame:
    rows = []
    for s in steps:
        rec = run_steps.get(s.key, {})
        rows.append({"call": s.key, "status": rec.get("status", "not run"),
                     "sittings": rec.get("runs", 0),
                     "minutes": round(rec.get("seconds", 0.0) / 60, 1)})
    return pd.DataFrame(rows)


def sittings_frame(sittings: list[dict]) -> pd.DataFrame:
    def when(t):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))

    def end(s):
        return s.get("end") or s.get("saved", s["start"])

    return pd.DataFrame([{"started": when(s["start"]),
                          "ended": when(end(s)) + ("" if "end" in s else " (killed)"),
                          "minutes": round((end(s) - s["start"]) / 60, 1),
                          "load at start": round(s["load"], 1),
                          "load at end": round(s.get("load_end", float("nan")), 1)}
                         for s in sittings])


def render(run, b: Budget, steps: list[Step], paths: Paths, train_count: int,
           png: str) -> str:
    exps = [x for row in ROWS for x in [load(paths, f"{row}/eval", ROWS[row])]
            if x is not None and any(s.key == f"{row}/eval" for s in steps)]
    sittings = run.state["sittings"]
    lines = [f"# ClusTR reproduction report, budget `{b.name}`", ""]
    if b.name == "smoke":
        lines += ["> **Smoke run**: a toy budget that checks the pipeline; its numbers mean "
                  "nothing.", ""]
    lines += ["Generated by", "", "```bash",
              "python -m benchmarks.reproduce " + " ".join(run.state["argv"]), "```", "",
              f"on {platform.node() or 'this machine'} ({platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}), in {len(sittings)} "
              f"sitting(s)" + (" (resumed)" if len(sittings) > 1 else "") + ":", "",
              sittings_frame(sittings).to_markdown(index=False), "",
              "## Budget", "", budget_frame(b, steps, train_count).to_markdown(index=False),
              "", rows_frame(b, steps, train_count).to_markdown(index=False), "",
              "## Results", "", "Accuracy in % (`python -m utils.tables` on the rows' "
              "evaluation folders, `--every-attack`).", ""]
    if exps:
        lines.append(tables.to_text(tables.build_table(exps, TABLE_EPS, every_attack=True),
                                    "markdown", digits=1))
    missing = [ROWS[s.key.split("/")[0]] for s in steps if s.key.endswith("/eval")
               and not any(x.label == ROWS[s.key.split("/")[0]] for x in exps)]
    lines += [f"* {m}: no results yet (see the calls below)" for m in missing]
    lines += ["", "## Curves", "", f"The paper's PGD and the per-image worst case of every "
              f"attack at {CURVE_EPS:g}/255, against the epoch, on {b.curve_images} fixed "
              "test images (epoch 0: the pretrained clusters for the ClusTR rows, the plain "
              "network for the FGSM baseline, which is evaluated at its last epoch only).", "",
              f"![curves]({os.path.basename(png)})", "", "## Published figures", "",
              PUBLISHED, "", "## Calls", "", "Run from the repository root; a call stopped "
              "in one sitting continued in the next with its own `--resume`.", "",
              calls_frame(run.steps, steps).to_markdown(index=False), ""]
    return "\n".join(lines) + "\n"


def write_report(run, b: Budget, steps: list[Step], paths: Paths, train_count: int) -> None:
    out = os.path.join(REPO, paths.out)
    png = os.path.splitext(out)[0] + "_curves.png"
    frame = curve_frame(steps, paths)
    if len(frame):
        plot_curves(frame, png)
    write_text_atomic(out, render(run, b, steps, paths, train_count, png))
    print(f"[reproduce] wrote {paths.out} (budget: {asdict(b)})")
