"""Paper tables from experiment folders: one row per folder, the paper's PGD beside the
honest columns, as a pandas DataFrame or Markdown, LaTeX or CSV.

    python -m utils.tables expA expB "ClusTR+Free=expC" --format markdown [--out FILE]
                                                          [--plot FILE.png] [--overwrite]

In Python (a notebook): ``experiment_table(["expA", "expB"])`` returns the DataFrame, its
notes in ``df.attrs["notes"]``: the command that fills a cell a folder lacks, and folders
evaluated under different protocols (flagged, never silently mixed).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import shlex
import sys

import pandas as pd

from base.errors import UsageError, exit_status
from base.io import atomic_write, pyplot, save_figure, write_text_atomic
from utils.experiments import (
    ADAPTIVE,
    IMAGES_SHA,
    PAPER_CSV,
    STRONG_CSV,
    Experiment,
    load_experiments,
    one_line_text,
)
from utils.outputs.output_files import check_outputs

FORMATS = ("markdown", "latex", "csv")
LATEX_SYMBOLS = {"λ": r"$\lambda$", "×": r"$\times$", "−": "-", "ε": r"$\epsilon$"}


def experiment_table(folders, epsilons=None, every_attack: bool = False) -> pd.DataFrame:
    """The table as a DataFrame: one row per folder (index: the label), accuracies in %,
    NaN where a folder lacks the result, the notes in ``df.attrs["notes"]``. ``epsilons``:
    the eps columns (units of 1/255; default every one found); ``every_attack``: also
    PGD-CE and PGD-DLR on the logit. ``folders``: paths (as ``load_experiments`` takes
    them) or loaded ``Experiment``s."""
    exps = folders if folders and isinstance(folders[0], Experiment) else \
        load_experiments(folders)
    grid = sorted({e for x in exps for e in x.paper if e > 0} |
                  {e for x in exps for e, _ in x.strong if e > 0})
    if epsilons is not None:
        grid = [float(e) for e in epsilons]
    aa_grid = sorted({e for x in exps for e, a in x.strong if a == "autoattack"}) or [8.0]
    aa_grid = [e for e in aa_grid if epsilons is None or e in grid] or aa_grid[:1]
    same, differ = _agreement([x.protocol for x in exps if x.paper])
    if "None" in differ.get(IMAGES_SHA, []):  # not recorded (older evaluations): unknown
        del differ[IMAGES_SHA]
    strong_n = {x.strong_images for x in exps if x.strong}
    if len(strong_n) > 1:
        differ["strong attacks' images"] = [str(n) for n in sorted(strong_n)]
    paper_tag = (f" ({same['iterations']}×{same['restarts']}, n={_n(same['test images'])})"
                 if same else "")
    clean_tag = f" (n={_n(same['test images'])})" if same else ""
    strong_tag = f" (n={next(iter(strong_n))})" if len(strong_n) == 1 else ""
    columns: dict[str, list] = {}
    if differ:
        columns["protocol"] = [_protocol_cell(x, IMAGES_SHA in differ) for x in exps]
    columns[f"clean{clean_tag}"] = [x.paper.get(0.0) for x in exps]
    for e in grid:
        columns[f"paper PGD {e:g}/255{paper_tag}"] = [x.paper.get(e) for x in exps]
    strong = [(a.upper(), a, grid) for a in ADAPTIVE] if every_attack else []
    for title, attack, eps_grid in strong + [("AutoAttack", "autoattack", aa_grid),
                                             ("worst case", "worst-case", grid)]:
        for e in eps_grid:
            columns[f"{title} {e:g}/255{strong_tag}"] = [x.strong.get((e, attack))
                                                         for x in exps]
    for e in grid:
        columns[f"gap {e:g}/255{strong_tag}"] = [_gap(x, e) for x in exps]
    df = pd.DataFrame(columns, index=pd.Index([x.label for x in exps], name="experiment"))
    numeric = [c for c in df.columns if c != "protocol"]
    df[numeric] = df[numeric].astype(float)
    df.attrs["notes"] = table_notes(exps, grid, aa_grid, differ)
    return df


def _n(n) -> str:
    return "?" if n is None else str(n)


def _gap(x: Experiment, eps: float) -> float | None:
    paper, worst = x.strong.get((eps, "paper-pgd")), x.strong.get((eps, "worst-case"))
    return None if paper is None or worst is None else round(paper - worst, 10)


def _agreement(protocols: list[dict]) -> tuple[dict, dict]:
    """The protocol all rows share (empty if none), and the fields whose values differ."""
    if not protocols:
        return {}, {}
    differ = {k: sorted({str(p[k]) for p in protocols}) for k in protocols[0]
              if len({str(p[k]) for p in protocols}) > 1}
    return ({} if differ else protocols[0]), differ


def _protocol_cell(x: Experiment, images: bool) -> str:
    if not x.paper:
        return ""
    p = x.protocol
    text = f"PGD {p['iterations']}×{p['restarts']}, n={_n(p['test images'])}"
    if p["subset seed"] is not None:
        text += f" (seed {p['subset seed']})"
    if p["dataset"] is not None:
        text += f", {p['dataset']}"
    if images and p[IMAGES_SHA] is not None:
        text += f", images {p[IMAGES_SHA]}"
    return text + (f"; strong n={x.strong_images}" if x.strong else "")


def table_notes(exps, grid, aa_grid, differ) -> list[str]:
    notes = ["Accuracy in %. Paper PGD: the paper's protocol (cross-entropy on the bounded "
             "cluster scores, step 2/255, iterations × restarts); worst case: an image counts "
             "as robust only if every attack run at that eps failed; gap: paper PGD − worst "
             "case on the same images (the strong attacks' images)."]
    subset = [x.label for x in exps if x.strong and x.test_images is not None
              and x.strong_images != x.test_images]
    if subset:
        notes.append(f"{', '.join(subset)}: the strong attacks ran on a subset of the paper "
                     f"PGD's images (--strong-subset); the gap compares the paper's PGD on that "
                     f"subset.")
    if differ:
        fields = "; ".join(f"{k}: {' vs '.join(v)}" for k, v in differ.items())
        notes.append(f"MIXED PROTOCOLS, not comparable across rows ({fields}): see the "
                     f"protocol column, or evaluate every checkpoint on the same test images "
                     f"with the same --test-subset, --seed, --iterations and --restarts.")
    notes += [f"{x.label}: {x.relabelled}" for x in exps if x.relabelled]
    for x in exps:
        if not x.paper:
            notes.append(f"{x.label}: no paper PGD results ({PAPER_CSV}); fill them with: "
                         f"{fill_command(x, os.path.join(x.path, 'eval'), strong=True)}")
        elif not x.strong:
            notes.append(f"{x.label}: no strong results ({STRONG_CSV}); fill them with: "
                         f"{fill_command(x, os.path.join(x.path, 'strong'), strong=True)} "
                         f"(then table {os.path.join(x.path, 'strong')} instead)")
        else:
            missing = [f"{e:g}" for e in aa_grid if (e, "autoattack") not in x.strong]
            if missing:
                command = fill_command(x, os.path.join(x.path, "strong"), True, missing)
                notes.append(f"{x.label}: no AutoAttack at {', '.join(missing)}/255; fill it "
                             f"with: {command}")
            absent = [f"{e:g}" for e in grid if (e, "worst-case") not in x.strong]
            if absent:
                notes.append(f"{x.label}: no strong attack at {', '.join(absent)}/255 "
                             f"(not on the evaluation's eps grid)")
    return notes


def fill_command(x: Experiment, out: str, strong: bool = False, aa_eps=None) -> str:
    """The main_clustr.py call that evaluates this folder's checkpoint under its protocol."""
    p = x.params
    argv = ["python", "main_clustr.py", "--checkpoint", out, "--evaluate-ckpt", x.checkpoint]
    for flag in ("--dataset", "--data-root", "--test-subset", "--seed", "--iterations",
                 "--restarts", "--L"):
        if p.get(name := flag[2:].replace("-", "_")) is not None:
            argv += [flag, str(p[name])]
    if p.get("not_normalize"):
        argv.append("--not-normalize")
    if strong:
        argv += ["--strong", "--autoattack"]
        if aa_eps:
            argv += ["--autoattack-eps", *aa_eps]
    return shlex.join(argv)


# -- writers ---------------------------------------------------------------------------------
def to_text(df: pd.DataFrame, fmt: str, digits: int = 2) -> str:
    """The table in ``fmt`` (pandas' own writers) with its notes: under a Markdown table,
    as ``%`` comments under a LaTeX one; CSV holds the table alone, full precision."""
    if fmt == "csv":
        return df.to_csv()
    notes = [one_line_text(n) for n in df.attrs.get("notes", [])]  # a newline ends a comment
    if fmt == "markdown":
        cells = df.astype(object).where(df.notna(), None)  # empty, not "nan"
        cells.index = [str(i).replace("|", r"\|") for i in cells.index]  # "|" ends a cell
        if "protocol" in cells:
            cells["protocol"] = [str(v).replace("|", r"\|") for v in cells["protocol"]]
        table = cells.rename_axis(df.index.name).to_markdown(floatfmt=f".{digits}f", missingval="")
        return table + "\n" + "".join(f"\n* {n}" for n in notes) + ("\n" if notes else "")
    if fmt == "latex":
        table = df.reset_index().to_latex(index=False, escape=True, na_rep="",
                                          float_format=f"%.{digits}f")
        for symbol, tex in LATEX_SYMBOLS.items():
            table = table.replace(symbol, tex)
        return table + "".join(f"% {n}\n" for n in notes)
    raise UsageError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")


def plot_experiments(exps: list[Experiment], path: str | None):
    """Accuracy against eps, one colour per experiment: the paper's PGD solid, the worst
    case over all attacks dashed (from its clean accuracy on the strong attacks' images).
    Writes a PNG (unless ``path`` is None) and returns the (closed) matplotlib figure."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, x in enumerate(exps):
        colour = colours[i % len(colours)]
        if x.paper:
            xs = sorted(x.paper)
            ax.plot(xs, [x.paper[e] for e in xs], color=colour, linestyle="-", marker="o",
                    label=f"{x.label}: paper PGD")
        worst = sorted(e for e, a in x.strong if a == "worst-case")
        if worst:
            xs = [0.0] + worst
            ys = [x.strong.get((0.0, "clean"), math.nan)] + [x.strong[(e, "worst-case")]
                                                            for e in worst]
            ax.plot(xs, ys, color=colour, linestyle="--", marker="x",
                    label=f"{x.label}: worst case")
    ax.set(xlabel="eps (x/255)", ylabel="accuracy (%)", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")  # off the data
    fig.tight_layout()
    save_figure(fig, path)
    return fig


# -- command line ----------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as every other bad input
        raise UsageError(f"{message} (see python -m utils.tables --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m utils.tables", description=__doc__.split(
        "\n\n")[0].replace("\n", " "))
    p.add_argument("folders", nargs="+", metavar="FOLDER",
                   help="experiment folders (main_clustr.py --checkpoint), or NAME=FOLDER to "
                        "set a row's label")
    p.add_argument("--format", choices=FORMATS, default="markdown", help="(markdown)")
    p.add_argument("--out", default=None, help="write the table here (default: stdout)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw accuracy against eps for all folders into this PNG")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out and --plot if they exist (never an experiment "
                        "folder's result files)")
    p.add_argument("--eps", type=float, nargs="+", default=None, metavar="E",
                   help="only these eps columns, in units of 1/255 (default: all found)")
    p.add_argument("--every-attack", action="store_true",
                   help="also the PGD-CE and PGD-DLR columns")
    p.add_argument("--digits", type=int, default=2,
                   help="decimals in Markdown and LaTeX (2; CSV keeps full precision)")
    return p


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    check_outputs({"--out": args.out, "--plot": args.plot}, "--overwrite", args.overwrite)
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot {args.plot}: the plot is a PNG; name it FILE.png")
    exps = load_experiments(args.folders)
    df = experiment_table(exps, args.eps, args.every_attack)
    text = to_text(df, args.format, args.digits)
    png = io.BytesIO()  # drawn before anything is written: a failure leaves no file
    if args.plot:
        plot_experiments(exps, None).savefig(png, format="png", dpi=120)
    if args.out:
        write_text_atomic(args.out, text)
    else:
        sys.stdout.write(text)
    if args.format == "csv":  # the notes never go into a CSV file
        for note in df.attrs["notes"]:
            print(f"note: {note}", file=sys.stderr)
    if args.plot:
        atomic_write(args.plot, lambda f: f.write(png.getvalue()))


def main(argv=None) -> int:
    return exit_status(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
