"""What an experiment folder (the ``--checkpoint`` directory of a ``main_clustr.py`` run)
holds, read and checked: ``Experiment`` and its readers, from which ``utils.tables`` builds
the paper tables. A row is labelled from the training run whose checkpoint was evaluated.
"""
from __future__ import annotations

import ast
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from base.errors import UsageError, first_line
from base.io import file_sha256
from utils.outputs import files

# the columns utils/eval writes; a file with other columns is of another format and refused
PARAMS, SUMMARY, PAPER_CSV, STRONG_CSV = (files.PARAMS, files.SUMMARY, files.PAPER_RESULTS,
                                          files.STRONG_RESULTS)
PAPER_HEADER = ["epsilons", "test_set_accs"]
STRONG_HEADER = ["epsilon", "attack", "robust_accuracy", "examples", "seconds"]
SUMMARY_KEYS = ("test_images", "iterations", "restarts", "clean_acc", "robust_acc")
IMAGES_SHA = "test images' SHA-256"
ADAPTIVE = ("pgd-ce", "pgd-dlr")  # the strong PGD attacks on the logit (--strong)


@dataclass
class Experiment:
    """What one experiment folder holds: accuracies in percent, eps in units of 1/255."""

    path: str
    label: str
    params: dict
    paper: dict[float, float] = field(default_factory=dict)  # eps -> accuracy; 0: clean
    summary: dict | None = None
    strong: dict[tuple[float, str], float] = field(default_factory=dict)  # (eps, attack)
    strong_images: int | None = None
    relabelled: str | None = None  # why the label is not the training run's
    model_info: dict | None = None  # model_info.json (RobustBench fields), where present

    @property
    def evaluate_only(self) -> bool:
        return self.params.get("evaluate_ckpt") is not None

    @property
    def checkpoint(self) -> str:
        """The checkpoint this folder's results are of."""
        if self.evaluate_only:
            return str(self.params["evaluate_ckpt"])
        return os.path.join(self.path, files.CHECKPOINT)

    @property
    def test_images(self) -> int | None:
        """Images the paper's PGD attacked (None: not recorded, e.g. by the original code,
        which attacked the whole test set)."""
        return self.summary["test_images"] if self.summary else None

    @property
    def protocol(self) -> dict:
        """What must agree for two rows to be comparable."""
        subset = self.params.get("test_subset")
        return {"dataset": self.params.get("dataset"), "test images": self.test_images,
                IMAGES_SHA: (self.summary or {}).get("test_sha256", "")[:12] or None,
                "subset seed": self.params.get("seed") if subset else None,
                "iterations": self._setting("iterations"),
                "restarts": self._setting("restarts")}

    def _setting(self, name: str):
        return self.summary[name] if self.summary else self.params.get(name)


# -- reading a folder ------------------------------------------------------------------------
def load_experiment(path: str, label: str | None = None) -> Experiment:
    """One experiment folder; a ``UsageError`` (one line) for anything that is not one."""
    if not os.path.isdir(path):
        raise UsageError(f"{path}: no such folder (pass the --checkpoint directory of a "
                         f"main_clustr.py run)")
    if not os.path.isfile(os.path.join(path, PARAMS)):
        raise UsageError(f"{path} is not an experiment folder: it has no {PARAMS} (pass the "
                         f"--checkpoint directory of a main_clustr.py run)")
    exp = Experiment(path, label or "", read_params(os.path.join(path, PARAMS)))
    found = {n: os.path.join(path, n) for n in (PAPER_CSV, SUMMARY, STRONG_CSV, files.MODEL_INFO)
             if os.path.isfile(os.path.join(path, n))}
    if PAPER_CSV in found:
        exp.paper = _read_paper(found[PAPER_CSV])
    if SUMMARY in found:
        exp.summary = _read_summary(found[SUMMARY], exp.paper)
    if STRONG_CSV in found:
        exp.strong, exp.strong_images = _read_strong(found[STRONG_CSV])
    if files.MODEL_INFO in found:
        _read_model_info(found[files.MODEL_INFO], exp)
    exp.label = one_line_text(label or default_label(exp))
    return exp


def read_params(path: str) -> dict:
    """``params.txt``: one line ``name: value | name: value | ...`` (this project's and the
    original code's format), values parsed as Python literals where they are one."""
    with open(path, errors="replace") as f:
        line = f.readline().strip()
    items = line.split(" | ") if line else []
    if not items or not all(": " in item for item in items):
        raise UsageError(f"{path} is not a params.txt of main_clustr.py (expected one line "
                         f"'name: value | name: value | ...')")
    params = {}
    for item in items:
        name, text = item.split(": ", 1)
        try:
            params[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            params[name] = text
    if "checkpoint" not in params:
        raise UsageError(f"{path} is not a params.txt of main_clustr.py (no 'checkpoint' entry)")
    return params


def _read_csv(path: str, header: list[str]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not a readable CSV file ({first_line(exc)})") from None
    if list(df.columns) != header:
        raise UsageError(f"{path} has the columns {','.join(map(str, df.columns))}, not "
                         f"{','.join(header)}: a file of another format or an older version")
    return df


def _number(path: str, text: str, what: str, low: float = 0.0, high: float = math.inf):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise UsageError(f"{path}: {what} {text!r} is not a number in [{low:g}, {high:g}]")
    return value


def _read_paper(path: str) -> dict[float, float]:
    df = _read_csv(path, PAPER_HEADER)
    acc = {_number(path, e, "epsilon", 0, 255): _number(path, a, "accuracy", 0, 100)
           for e, a in zip(df["epsilons"], df["test_set_accs"])}
    if 0.0 not in acc or len(acc) != len(df):
        raise UsageError(f"{path} needs one row per epsilon, with epsilon 0 (the clean "
                         f"accuracy) first: a file of another format")
    if any(0 < e < 1 for e in acc):
        raise UsageError(f"{path} gives epsilons below 1 ({min(e for e in acc if e > 0):g}): "
                         f"this format writes them in units of 1/255 (2, 8, 16, 25.5)")
    return acc


def _read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not {what} ({first_line(exc)})") from None


def _read_summary(path: str, paper: dict[float, float]) -> dict:
    summary = _read_json(path, "a JSON file")
    missing = [k for k in SUMMARY_KEYS if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise UsageError(f"{path} has no {', '.join(missing)}: a file of another format or an "
                         f"older version")
    if paper:
        _cross_check(path, summary, paper)
    return summary


def _cross_check(path: str, summary: dict, paper: dict[float, float]) -> None:
    """Every cell of ``attack_results_ext.csv`` against ``eval_summary.json``, written by the
    same evaluation: a truncated or edited file, or one of another run, is refused."""
    try:
        expected = {0.0: float(summary["clean_acc"])} | {
            float(e): float(a) for e, a in dict(summary["robust_acc"]).items()}
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path}: clean_acc or robust_acc is not numeric ({exc})") from None
    for eps in sorted(set(expected) | set(paper)):
        cells = [f"{d[eps]:.4g}%" if eps in d else "nothing" for d in (expected, paper)]
        if cells[0] != cells[1] or abs(expected[eps] - paper[eps]) > 1e-6:
            what = "clean" if eps == 0 else f"eps {eps:g}/255"
            raise UsageError(f"{path} ({what}: {cells[0]}) and {PAPER_CSV} ({cells[1]}) "
                             f"disagree: one is damaged or of another run; evaluate the "
                             f"folder again")


def _read_strong(path: str) -> tuple[dict[tuple[float, str], float], int]:
    """(eps, attack) -> accuracy, and the number of images."""
    df = _read_csv(path, STRONG_HEADER)
    if df.empty:
        raise UsageError(f"{path} has no rows")
    keys = [(_number(path, e, "epsilon", 0, 255), a) for e, a in zip(df["epsilon"], df["attack"])]
    acc = {k: _number(path, v, "accuracy", 0, 100) for k, v in zip(keys, df["robust_accuracy"])}
    sizes = set(df["examples"])
    if len(sizes) != 1 or not next(iter(sizes)).isdigit():
        raise UsageError(f"{path}: the 'examples' column must hold one image count")
    return acc, int(next(iter(sizes)))


def _read_model_info(path: str, exp: Experiment) -> None:
    """``model_info.json``: its AutoAttack accuracy fills the AutoAttack cell (a folder that
    has only the card still gets one) and must agree with ``attack_results_strong.csv``."""
    what = "a model_info.json of this project"
    info = _read_json(path, what)
    try:
        eps = _number(path, str(info["eps"]).removesuffix("/255"), "eps", 0, 255)
        acc = _number(path, str(info["autoattack_acc"]), "autoattack_acc", 0, 100)
    except (KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not {what} ({first_line(exc)})") from None
    known = exp.strong.get((eps, "autoattack"))
    if known is not None and abs(known - acc) > 0.005:
        raise UsageError(f"{path} (AutoAttack {acc:.2f}%) and {STRONG_CSV} ({known:.2f}%) are "
                         f"of different runs: evaluate the folder again")
    exp.strong.setdefault((eps, "autoattack"), acc)
    if exp.strong_images is None and isinstance(info.get("n_examples"), int):
        exp.strong_images = info["n_examples"]
    exp.model_info = info


# -- labels ----------------------------------------------------------------------------------
def default_label(exp: Experiment) -> str:
    """From the training arguments: ``ClusTR``, ``ClusTR+QTRADES (λ=12.5)``,
    ``ClusTR+Free (M=8)``, ``baseline (linear head)``; an evaluation-only folder takes the
    arguments of the run that wrote its checkpoint (its params.txt), else the folder name."""
    if exp.summary and exp.summary.get("classifier") == "linear head":
        return "baseline (linear head)"
    params = exp.params
    if exp.evaluate_only:
        params = _training_params(exp)
        if params is None:
            return os.path.basename(os.path.normpath(exp.path))
    return training_label(params)


def training_label(params: dict) -> str:
    replays = params.get("minibatch_replays") or 0
    if replays:  # the free path trains on the Magnet loss alone
        return f"ClusTR+Free (M={replays})"
    label = "ClusTR"
    lam = params.get("consistency_lambda") or 0
    if lam:
        kind = ", MSE" if params.get("mse_consistency") else ""
        kind += ", TRADES-KL" if params.get("actual_trades") else ""
        label += f"+QTRADES (λ={lam:g}{kind})"
    if params.get("xent_lambda"):
        label += f"+CE (λ={params['xent_lambda']:g})"
    return label


def _training_params(exp: Experiment) -> dict | None:
    """The params.txt of the training run next to the evaluated checkpoint, if any."""
    candidates = [str(exp.params["evaluate_ckpt"])]
    if exp.summary and exp.summary.get("checkpoint"):
        candidates.insert(0, str(exp.summary["checkpoint"]))
    recorded = (exp.summary or {}).get("checkpoint_sha256")
    for ckpt in candidates:
        path = os.path.join(os.path.dirname(ckpt), PARAMS)
        if recorded and os.path.isfile(ckpt) and file_sha256(ckpt) != recorded:
            exp.relabelled = (f"{ckpt} changed since this evaluation (its SHA-256 differs from "
                              f"the one recorded in {SUMMARY}): the folder name labels the "
                              f"row, not the {PARAMS} now beside it")
            return None
        if os.path.isfile(path) and os.path.realpath(path) != os.path.realpath(
                os.path.join(exp.path, PARAMS)):
            try:
                params = read_params(path)
            except UsageError:
                continue
            if params.get("evaluate_ckpt") is None:
                return params
    return None


def one_line_text(text: str) -> str:
    """Labels and notes on one line: a newline or other control character in a label would
    add a row to a table or end a LaTeX comment."""
    return " ".join("".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text).split())


def load_experiments(folders) -> list[Experiment]:
    """``folders``: paths, ``NAME=PATH`` strings, or (name, path) pairs."""
    exps = [load_experiment(path, name) for name, path in (
        item if isinstance(item, tuple) else _split_named(str(item)) for item in folders)]
    if not exps:
        raise UsageError("no experiment folder given")
    seen = Counter(x.label for x in exps)
    for x in exps:
        if seen[x.label] > 1:
            x.label = f"{x.label} [{os.path.normpath(x.path)}]"
    return exps


def _split_named(item: str) -> tuple[str | None, str]:
    if "=" in item and not os.path.exists(item):
        name, path = item.split("=", 1)
        if not name.strip():
            raise UsageError(f"{item!r}: the label before '=' is empty (NAME=PATH)")
        return name.strip(), path
    return None, item
