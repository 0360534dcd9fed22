"""``model_info.json``: a RobustBench-style model card of an evaluation with ``--autoattack``.

Its fields and where each number comes from: docs/usage.md ("Model card"). ``reported`` is
the paper's PGD (what the paper reports), on the images AutoAttack attacked.

    python -m utils.outputs.model_info EXPDIR     # (re)write it for a finished evaluation
"""
from __future__ import annotations

import json
import os
import shlex
import sys

from base.errors import UsageError, exit_status
from base.io import file_sha256, load_checkpoint, write_text_atomic
from utils.outputs import files
from utils.outputs.results import read_csv
from utils.train_setting import build_parser

PAPER = {"link": "https://arxiv.org/abs/2006.07682",
         "authors": "Motasem Alfarra, Juan C. Pérez, Adel Bibi, Ali Thabet, Pablo Arbeláez, "
                    "Bernard Ghanem",
         "venue": "BMVC 2021"}


def command_line(args: dict) -> str:
    """``python main_clustr.py`` with every argument in ``args`` that differs from its
    default: a command that repeats the run."""
    argv = ["python", "main_clustr.py"]
    for action in build_parser()._actions:
        value = args.get(action.dest, action.default)
        if not action.option_strings or action.dest == "help" or value == action.default \
                or (isinstance(value, list) and list(action.default or []) == value):
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:  # a switch: given when its value is the one it stores
            argv += [flag] if value == action.const else []
        else:
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    return shlex.join(argv)


def model_card(out_dir: str, ckpt_path: str | None = None) -> dict:
    """The card's fields, read from the folder's result files and the checkpoint (default:
    the one its ``args.json`` names)."""
    rows = read_csv(os.path.join(out_dir, files.STRONG_RESULTS))
    table = {(float(r["epsilon"]), r["attack"]): r for r in rows}
    aa_eps = [e for e, attack in table if attack == "autoattack"]
    if not aa_eps:
        raise UsageError(f"{out_dir}: {files.STRONG_RESULTS} has no AutoAttack row: evaluate "
                         f"with --autoattack first")
    eps = aa_eps[0]
    with open(os.path.join(out_dir, files.SUMMARY)) as f:
        summary = json.load(f)
    with open(os.path.join(out_dir, files.ARGS_JSON)) as f:
        args = json.load(f)
    ckpt_path = ckpt_path or args.get("evaluate_ckpt") or os.path.join(out_dir, files.CHECKPOINT)
    ckpt = load_checkpoint(ckpt_path)
    reported = table.get((eps, "paper-pgd"))
    name = os.path.basename(os.path.dirname(os.path.abspath(ckpt_path)))
    clustered = summary.get("classifier") == "clusters"
    paper = PAPER if clustered else dict.fromkeys(PAPER, "")
    rule = "L nearest" if summary.get("normalize_probs", True) else "all clusters"
    return {
        "link": paper["link"],
        "name": f"ClusTR ({name})" if clustered else name,
        "authors": paper["authors"],
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": summary.get("dataset") or args.get("dataset"),
        "venue": paper["venue"],
        "architecture": "ResNet-18 (linear head)" if not clustered else (
            f"ResNet-18 + ClusTR cluster head (K={ckpt.get('K')} clusters per class, "
            f"L={summary.get('L')}, {rule})"),
        "eps": f"{eps:g}/255",  # RobustBench's notation: "8/255", "25.5/255"
        "clean_acc": f"{float(table[(0.0, 'clean')]['robust_accuracy']):.2f}",
        "reported": None if reported is None else f"{float(reported['robust_accuracy']):.2f}",
        "autoattack_acc": f"{float(table[(eps, 'autoattack')]['robust_accuracy']):.2f}",
        "footnote": (f"reported: the paper's PGD ({summary.get('iterations')} steps x "
                     f"{summary.get('restarts')} restarts, step 2/255, cross-entropy on the "
                     f"bounded cluster scores) on the same images as AutoAttack (standard)"),
        "threat_model": "Linf",
        "n_examples": int(rows[0]["examples"]),
        "checkpoint_sha256": file_sha256(ckpt_path),
        "command": command_line(args),
    }


def write_model_info(out_dir: str, ckpt_path: str | None = None) -> str:
    path = os.path.join(out_dir, files.MODEL_INFO)
    write_text_atomic(path, json.dumps(model_card(out_dir, ckpt_path), indent=2,
                                       ensure_ascii=False) + "\n")
    return path


def run(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0].startswith("-"):
        raise UsageError("usage: python -m utils.outputs.model_info EXPDIR (the --checkpoint "
                         "folder of an evaluation with --autoattack)")
    folder = argv[0]
    for name in (files.STRONG_RESULTS, files.SUMMARY, files.ARGS_JSON):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UsageError(f"{folder} has no {name}: not an evaluation folder")
    print(write_model_info(folder))


if __name__ == "__main__":
    sys.exit(exit_status(lambda: run(sys.argv[1:])))
