"""Paper tables from experiment folders (utils/tables.py).

The folders are written by this project: one by a real (tiny) training run of the CLI with
``--strong``, one by an evaluation-only run of its checkpoint under another protocol, and
two by the evaluation's own result writers with chosen per-image outcomes, so that every
cell of the table has a different value and a misplaced cell cannot pass.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_clustr
from tests.conftest import ROOT
from utils import experiments, tables
from utils.attacks.sweep import Outcome
from utils.eval.evaluation import SweepResult, write_results, write_summary
from utils.eval.strong_evaluation import worst_case, write_table
from utils.train_setting import params_line, parse_args

TINY = ["--dataset", "imagefolder", "--epochs", "1", "--k", "2", "--m", "3", "--d", "4",
        "--L", "4", "--restarts", "1", "--train-subset", "36", "--test-subset", "6", "--quiet",
        "--workers", "0", "--device", "cpu"]  # three Magnet steps
N = 20  # images of the written folders


def _cli(*argv) -> None:
    """One in-process CLI call, on one thread: its batches of a few images run no slower,
    and far faster on a machine whose cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main_clustr.main([str(a) for a in argv]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_folder) -> dict[str, Path]:
    """A trained ClusTR with strong results, and its checkpoint evaluated again with 2
    iterations instead of 1 (another protocol)."""
    root = tmp_path_factory.mktemp("tables")
    _cli("--checkpoint", root / "clustr", "--data-root", tiny_folder, *TINY,
         "--iterations", "1", "--strong", "--strong-subset", "3")
    _cli("--checkpoint", root / "pgd2", "--evaluate-ckpt", root / "clustr" / "checkpoint.pth",
         "--data-root", tiny_folder, *TINY, "--iterations", "2")
    return {"clustr": root / "clustr", "pgd2": root / "pgd2", "root": root}


def _robust(k: int) -> torch.Tensor:
    """(N,) bool with the first k images robust."""
    return torch.arange(N) < k


def write_folder(path: Path, argv: list[str], clean: int, paper: dict[float, int],
                 strong: dict[tuple[float, str], int] | None = None) -> Path:
    """An experiment folder as ``main_clustr.py`` writes it, through the evaluation's own
    writers: ``clean`` of N images correct, ``paper[eps]`` robust to the paper's PGD and,
    with ``strong``, ``strong[(eps, attack)]`` robust to that attack."""
    path.mkdir(parents=True)
    args = parse_args(["--checkpoint", str(path), "--test-subset", str(N), *argv])
    (path / "params.txt").write_text(params_line(args) + "\n")
    labels = torch.zeros(N, dtype=torch.long)
    pred = torch.where(_robust(clean), 0, 1)
    result = SweepResult(labels, torch.arange(N), pred)
    for eps, k in paper.items():
        result.per_eps.append(Outcome("pgd", eps, _robust(k), 1.0, pred=torch.where(
            _robust(k), 0, 1), linf=torch.zeros(N), steps=torch.zeros(N, dtype=torch.long)))
    write_results(result, str(path))
    write_summary(str(path / "eval_summary.json"), result, dict(
        checkpoint=str(path / "checkpoint.pth"), dataset=args.dataset, test_images=N,
        classifier="clusters", iterations=args.iterations, restarts=args.restarts, step=2.0,
        seed=args.seed))
    if strong is not None:
        outcomes = [Outcome("clean", 0.0, _robust(clean))]
        outcomes += [Outcome("paper-pgd", e, _robust(k)) for e, k in paper.items()]
        outcomes += [Outcome(a, e, _robust(k)) for (e, a), k in strong.items()]
        outcomes += worst_case(outcomes, _robust(clean))
        write_table(outcomes, N, str(path / experiments.STRONG_CSV))
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("written")
    qtrades = write_folder(
        root / "qtrades", ["--consistency-lambda", "12.5", "--iterations", "3"], 19,
        {2.0: 17, 8.0: 13, 16.0: 9, 25.5: 5},
        {(2.0, "pgd-ce"): 12, (8.0, "pgd-ce"): 6, (16.0, "pgd-ce"): 3, (25.5, "pgd-ce"): 1,
         (2.0, "pgd-dlr"): 11, (8.0, "pgd-dlr"): 7, (16.0, "pgd-dlr"): 4, (25.5, "pgd-dlr"): 2,
         (8.0, "autoattack"): 2})
    free = write_folder(root / "free", ["--minibatch-replays", "4", "--iterations", "3"], 18,
                        {2.0: 16, 8.0: 14, 16.0: 10, 25.5: 8})
    return {"qtrades": qtrades, "free": free}


def _files(folder: Path) -> tuple[dict[float, float], dict[tuple[float, str], float]]:
    """The two result files, read with the csv module alone."""
    with open(folder / "attack_results_ext.csv") as f:
        paper = {float(r["epsilons"]): float(r["test_set_accs"]) for r in csv.DictReader(f)}
    strong = {}
    if (folder / experiments.STRONG_CSV).exists():
        with open(folder / experiments.STRONG_CSV) as f:
            strong = {(float(r["epsilon"]), r["attack"]): float(r["robust_accuracy"])
                      for r in csv.DictReader(f)}
    return paper, strong


def _column(df, prefix: str) -> str:
    (name,) = [c for c in df.columns if c.startswith(prefix + " ") or c == prefix]
    return name


def _check_cells(df, label: str, folder: Path) -> int:
    """Every cell of the row against the files; returns how many cells hold a number."""
    paper, strong = _files(folder)
    row = df.loc[label]
    assert row[_column(df, "clean")] == paper[0.0]
    checked = 1
    for eps in (2.0, 8.0, 16.0, 25.5):
        assert row[_column(df, f"paper PGD {eps:g}/255")] == paper[eps]
        checked += 1
        for prefix, attack in ((f"worst case {eps:g}/255", "worst-case"),
                               (f"PGD-CE {eps:g}/255", "pgd-ce"),
                               (f"PGD-DLR {eps:g}/255", "pgd-dlr")):
            cell = row[_column(df, prefix)]
            if strong:
                assert cell == strong[(eps, attack)]
                checked += 1
            else:
                assert cell != cell  # NaN: empty
        gap = row[_column(df, f"gap {eps:g}/255")]
        if strong:
            assert gap == pytest.approx(strong[(eps, "paper-pgd")] - strong[(eps, "worst-case")])
        else:
            assert gap != gap
    aa = row[_column(df, "AutoAttack 8/255")]
    assert (aa == strong[(8.0, "autoattack")]) if (8.0, "autoattack") in strong else aa != aa
    return checked


def test_table_matches_the_files_cell_by_cell(written):
    df = tables.experiment_table([written["qtrades"], written["free"]], every_attack=True)
    assert list(df.index) == ["ClusTR+QTRADES (λ=12.5)", "ClusTR+Free (M=4)"]
    assert _check_cells(df, "ClusTR+QTRADES (λ=12.5)", written["qtrades"]) == 1 + 4 * 4
    assert _check_cells(df, "ClusTR+Free (M=4)", written["free"]) == 1 + 4
    # the header carries the protocol both rows share
    assert _column(df, "paper PGD 8/255") == "paper PGD 8/255 (3×10, n=20)"
    assert _column(df, "clean") == "clean (n=20)"
    assert _column(df, "worst case 8/255") == "worst case 8/255 (n=20)"
    assert not any("MIXED" in n for n in df.attrs["notes"])


def test_real_runs_match_their_files(runs, written):
    df = tables.experiment_table([runs["clustr"], written["qtrades"]])
    clustr = df.index[0]
    assert clustr == "ClusTR"
    subset = [n for n in df.attrs["notes"] if "--strong-subset" in n]
    assert len(subset) == 1 and subset[0].startswith("ClusTR: ")  # 3 of its 6 images
    paper, strong = _files(runs["clustr"])
    row = df.loc[clustr]
    assert row.iloc[[i for i, c in enumerate(df.columns) if c.startswith("clean")][0]] == \
        paper[0.0]
    for eps in (2.0, 8.0, 16.0, 25.5):
        assert row[[c for c in df.columns if c.startswith(f"paper PGD {eps:g}/")][0]] == \
            paper[eps]
        assert row[[c for c in df.columns if c.startswith(f"worst case {eps:g}/")][0]] == \
            strong[(eps, "worst-case")]


def _parse_markdown(text: str) -> dict[str, list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    header, body = rows[0], rows[2:]
    return {r[0]: r[1:] for r in body} | {"__header__": header[1:]}


def _parse_latex(text: str) -> dict[str, list[str]]:
    body = text.split("\\midrule")[1].split("\\bottomrule")[0]
    rows = [[c.strip() for c in ln.rstrip().removesuffix("\\\\").split(" & ")]
            for ln in body.strip().splitlines()]
    header = text.split("\\toprule")[1].split("\\midrule")[0].strip().removesuffix("\\\\")
    return {r[0]: r[1:] for r in rows} | {"__header__": header.split(" & ")[1:]}


@pytest.mark.parametrize("fmt", ["markdown", "latex", "csv"])
def test_written_tables_parse_back_to_the_same_numbers(written, tmp_path, fmt):
    folders = [f"QT={written['qtrades']}", f"Free={written['free']}"]
    df = tables.experiment_table(folders)
    out = tmp_path / f"table.{fmt}"
    assert tables.main([*folders, "--format", fmt, "--out", str(out)]) == 0
    text = out.read_text()
    if fmt == "csv":
        with open(out) as f:
            rows = list(csv.reader(f))
        parsed = {r[0]: r[1:] for r in rows[1:]} | {"__header__": rows[0][1:]}
        tol = 0.0
    else:
        parsed = (_parse_markdown if fmt == "markdown" else _parse_latex)(text)
        tol = 0.005  # two decimals
    assert set(parsed) == {"QT", "Free", "__header__"}
    assert len(parsed["__header__"]) == len(df.columns)
    for label in ("QT", "Free"):
        for value, cell in zip(df.loc[label], parsed[label], strict=True):
            if value != value:
                assert cell == ""
            else:
                assert float(cell) == pytest.approx(value, abs=tol)
    if fmt == "markdown":
        assert "* Free: no strong results" in text  # the notes come under the table
    if fmt == "latex":
        assert "3$\\times$10" in text and "% Free: no strong results" in text


def test_folder_without_strong_results_gives_empty_cells_and_the_command(written):
    df = tables.experiment_table([written["qtrades"], written["free"]])
    free = df.loc["ClusTR+Free (M=4)"]
    honest = [c for c in df.columns if c.startswith(("AutoAttack", "worst case", "gap"))]
    assert honest and free[honest].isna().all()
    assert df.loc["ClusTR+QTRADES (λ=12.5)", honest].notna().all()
    (note,) = [n for n in df.attrs["notes"] if n.startswith("ClusTR+Free (M=4): no strong")]
    command = note.split("fill them with: ")[1].split(" (then")[0]
    argv = command.split()
    assert argv[:2] == ["python", "main_clustr.py"]
    args = parse_args(argv[2:])  # a valid command line of this project
    assert args.strong and args.autoattack
    assert args.evaluate_ckpt == str(written["free"] / "checkpoint.pth")
    assert args.test_subset == N and args.iterations == 3 and args.restarts == 10


def test_mixed_protocols_are_flagged(runs, written):
    df = tables.experiment_table([runs["clustr"], runs["pgd2"]])
    # the evaluation-only folder is labelled from the training run of its checkpoint
    assert list(df.index) == [f"ClusTR [{os.path.normpath(runs[k])}]" for k in ("clustr",
                                                                                "pgd2")]
    (note,) = [n for n in df.attrs["notes"] if "MIXED PROTOCOLS" in n]
    assert "iterations: 1 vs 2" in note
    assert list(df["protocol"]) == ["PGD 1×1, n=6 (seed 111), imagefolder; strong n=3",
                                    "PGD 2×1, n=6 (seed 111), imagefolder"]
    assert not any(re.search(r"\d×\d", c) for c in df.columns if c != "protocol")
    # different numbers of test images are flagged too
    mixed = tables.experiment_table([runs["clustr"], written["qtrades"]])
    (note,) = [n for n in mixed.attrs["notes"] if "MIXED PROTOCOLS" in n]
    assert "test images: 20 vs 6" in note and "strong attacks' images: 3 vs 20" in note
    assert "protocol" in mixed.columns


def test_checkpoint_in_the_original_format_evaluates_into_a_row(runs, tiny_folder):
    """A checkpoint with only the original code's keys, evaluated by the CLI: the row is
    labelled by its folder (no training arguments to read) and matches its files."""
    ckpt = torch.load(runs["clustr"] / "checkpoint.pth", map_location="cpu", weights_only=True)
    original = runs["root"] / "original" / "checkpoint.pth"
    original.parent.mkdir()
    torch.save({k: ckpt[k] for k in ("state_dict", "epoch", "test_acc", "cluster_centers",
                                     "cluster_classes", "variance", "K", "L",
                                     "normalize_probs")}, original)
    _cli("--checkpoint", runs["root"] / "original_eval", "--evaluate-ckpt", original,
         "--data-root", tiny_folder, *TINY, "--iterations", "1")
    df = tables.experiment_table([runs["root"] / "original_eval"])
    assert list(df.index) == ["original_eval"]
    paper, _ = _files(runs["root"] / "original_eval")
    assert list(df.iloc[0, :5]) == [paper[e] for e in (0.0, 2.0, 8.0, 16.0, 25.5)]


def _foreign(root: Path, name: str, good: Path) -> Path:
    """A copy of a good folder with one file replaced by another format."""
    folder = root / name
    folder.mkdir()
    for f in good.iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    if name == "foreign_paper_csv":
        (folder / "attack_results_ext.csv").write_text("eps,acc\n0,90\n8,40\n")
    elif name == "pixel_eps":
        (folder / "attack_results_ext.csv").write_text(
            "epsilons,test_set_accs\n0.0,90\n0.0313,40\n")
    elif name == "old_strong_csv":
        (folder / experiments.STRONG_CSV).write_text("eps,attack,accuracy\n8,pgd-ce,10\n")
    elif name == "foreign_params":
        (folder / "params.txt").write_text("lr=0.1 epochs=3\n")
    elif name == "truncated_paper_csv":  # cut after "2.0,8": 2/255 reads 8, the rest gone
        text = (folder / "attack_results_ext.csv").read_text()
        (folder / "attack_results_ext.csv").write_text(text[:text.index("2.0,") + 5])
    elif name == "edited_paper_cell":  # 85 -> 58, still a percentage
        text = (folder / "attack_results_ext.csv").read_text()
        assert "\n2.0,85.0\n" in text
        (folder / "attack_results_ext.csv").write_text(text.replace("\n2.0,85.0", "\n2.0,58.0"))
    elif name == "stale_summary":
        text = (folder / "eval_summary.json").read_text()
        (folder / "eval_summary.json").write_text(re.sub(r'"clean_acc": [0-9.]+',
                                                          '"clean_acc": 1.5', text))
    return folder


@pytest.mark.parametrize("case", ["missing", "empty_dir", "a_file", "foreign_paper_csv",
                                  "pixel_eps", "old_strong_csv", "foreign_params",
                                  "stale_summary", "truncated_paper_csv",
                                  "edited_paper_cell"])
def test_bad_folder_exits_2_with_one_line(written, tmp_path, capsys, case):
    if case == "missing":
        path = tmp_path / "nope"
    elif case == "empty_dir":
        path = tmp_path / "empty"
        path.mkdir()
    elif case == "a_file":
        path = written["qtrades"] / "params.txt"
    else:
        path = _foreign(tmp_path, case, written["qtrades"])
    assert tables.main([str(written["free"]), str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert str(path) in err


def test_command_line_exit_status(written):
    good = subprocess.run([sys.executable, "-m", "utils.tables", str(written["free"]),
                           "--format", "csv"], capture_output=True, text=True, cwd=ROOT)
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines()[0].startswith("experiment,clean (n=20),")
    assert "note: ClusTR+Free (M=4): no strong results" in good.stderr
    bad = subprocess.run([sys.executable, "-m", "utils.tables", str(written["free"] / "x")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_plot_has_one_line_per_experiment_and_attack_kind(written, tmp_path):
    exps = tables.load_experiments([written["qtrades"], written["free"]])
    png = tmp_path / "acc.png"
    fig = tables.plot_experiments(exps, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"ClusTR+QTRADES (λ=12.5): paper PGD",
                          "ClusTR+QTRADES (λ=12.5): worst case", "ClusTR+Free (M=4): paper PGD"}
    qt_paper, qt_worst = (lines[f"ClusTR+QTRADES (λ=12.5): {k}"] for k in ("paper PGD",
                                                                          "worst case"))
    free = lines["ClusTR+Free (M=4): paper PGD"]
    assert qt_paper.get_linestyle() == "-" and free.get_linestyle() == "-"
    assert qt_worst.get_linestyle() == "--"
    assert qt_paper.get_color() == qt_worst.get_color() != free.get_color()
    paper, strong = _files(written["qtrades"])
    assert list(qt_paper.get_xdata()) == [0.0, 2.0, 8.0, 16.0, 25.5]
    assert list(qt_paper.get_ydata()) == [paper[e] for e in (0.0, 2.0, 8.0, 16.0, 25.5)]
    assert list(qt_worst.get_ydata()) == [strong[(0.0, "clean")]] + [
        strong[(e, "worst-case")] for e in (2.0, 8.0, 16.0, 25.5)]
    # and from the command line
    assert tables.main([str(written["free"]), "--plot", str(tmp_path / "cli.png"),
                        "--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "cli.png").read_bytes()[:4] == b"\x89PNG"


def test_labels_from_the_arguments():
    assert experiments.training_label({"consistency_lambda": 0.0}) == "ClusTR"
    assert experiments.training_label({"consistency_lambda": 12.5}) == "ClusTR+QTRADES (λ=12.5)"
    assert experiments.training_label({"consistency_lambda": 1.0, "mse_consistency": True}) == \
        "ClusTR+QTRADES (λ=1, MSE)"
    assert experiments.training_label({"minibatch_replays": 8}) == "ClusTR+Free (M=8)"


@pytest.mark.parametrize("case", ["over-checkpoint", "over-results", "over-own-file",
                                  "plot-missing-folder", "plot-not-png", "same-file"])
def test_outputs_are_checked_before_anything_is_written(written, tmp_path, capsys, case):
    """--out and --plot never replace a file they were not asked to (a checkpoint, the
    results, an earlier table), and a refused output leaves every other one unwritten."""
    exp = tmp_path / "exp"
    exp.mkdir()
    for name in ("checkpoint.pth", "params.txt", "attack_results_ext.csv"):
        (exp / name).write_bytes(b"the experiment's " + name.encode())
    (tmp_path / "old.md").write_text("an earlier table\n")
    argv, pattern = {
        "over-checkpoint": (["--plot", exp / "checkpoint.pth", "--overwrite"],
                            r"result file name of the experiment folder"),
        "over-results": (["--format", "csv", "--out", exp / "attack_results_ext.csv"],
                         r"result file name of the experiment folder"),
        "over-own-file": (["--out", tmp_path / "old.md"],
                          r"old\.md already exists: choose another name, or pass --overwrite"),
        "plot-missing-folder": (["--out", tmp_path / "t.md", "--plot",
                                 tmp_path / "missing" / "p.png"], r"missing does not exist"),
        "plot-not-png": (["--out", tmp_path / "t.md", "--plot", tmp_path / "x.txt"],
                         r"--plot .*x\.txt: the plot is a PNG"),
        "same-file": (["--out", tmp_path / "t.png", "--plot", tmp_path / "t.png"],
                      r"name the same file"),
    }[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert tables.main([str(written["free"]), *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(pattern, err), err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_an_earlier_table(written, tmp_path):
    (tmp_path / "t.md").write_text("an earlier table\n")
    assert tables.main([str(written["free"]), "--out", str(tmp_path / "t.md"),
                        "--overwrite"]) == 0
    assert (tmp_path / "t.md").read_text().startswith("| experiment")


def test_a_write_that_fails_is_one_line_naming_the_file(written, tmp_path, capsys,
                                                        monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    assert tables.main([str(written["free"]), "--out", str(tmp_path / "t.md")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write " + str(tmp_path / "t.md") in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["markdown", "latex"])
def test_labels_with_table_syntax_stay_in_their_cell(written, tmp_path, fmt):
    """A '|' in a label, or a newline, neither adds a column nor a row nor ends a comment."""
    folders = [f"a|b={written['qtrades']}", f"two\nlines={written['free']}"]
    out = tmp_path / f"t.{fmt}"
    assert tables.main([*folders, "--format", fmt, "--out", str(out)]) == 0
    text = out.read_text()
    if fmt == "markdown":
        table = [ln for ln in text.splitlines() if ln.startswith("|")]
        assert len(table) == 4  # header, rule, two rows
        assert len({ln.replace(r"\|", "").count("|") for ln in table}) == 1
        assert table[2].startswith(r"| a\|b ") and table[3].startswith("| two lines ")
    else:
        body = text.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
        assert len(body) == 2 and body[1].startswith("two lines &")
        after = text.split("\\end{tabular}")[1]
        assert all(ln.startswith("%") for ln in after.splitlines() if ln.strip())


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_rows_on_other_test_images_are_flagged(runs):
    """Same count, same subset seed, other images: only the recorded fingerprint tells."""
    summary = json.loads((runs["pgd2"] / "eval_summary.json").read_text())
    assert summary["test_sha256"] == json.loads(
        (runs["clustr"] / "eval_summary.json").read_text())["test_sha256"]
    other = _copy(runs["pgd2"], runs["root"] / "other_images")
    (other / "eval_summary.json").write_text(json.dumps(summary | {"test_sha256": "0" * 64}))
    same = tables.experiment_table([runs["clustr"], runs["pgd2"]])
    assert not any("SHA-256" in n for n in same.attrs["notes"])
    df = tables.experiment_table([runs["clustr"], other])
    (note,) = [n for n in df.attrs["notes"] if "MIXED PROTOCOLS" in n]
    assert "test images' SHA-256: " in note and "000000000000" in note
    assert df["protocol"].iloc[1].endswith(", images 000000000000")


def test_label_comes_from_the_checkpoint_that_was_evaluated(runs, tmp_path):
    """The training folder of an evaluated checkpoint retrained since (other arguments, other
    weights): its params.txt no longer describes what was evaluated."""
    train = _copy(runs["clustr"], tmp_path / "train")
    evaluation = _copy(runs["pgd2"], tmp_path / "eval")
    summary = json.loads((evaluation / "eval_summary.json").read_text())
    summary["checkpoint"] = str(train / "checkpoint.pth")
    (evaluation / "eval_summary.json").write_text(json.dumps(summary))
    (evaluation / "params.txt").write_text((evaluation / "params.txt").read_text().replace(
        str(runs["clustr"] / "checkpoint.pth"), str(train / "checkpoint.pth")))
    assert tables.experiment_table([evaluation]).index[0] == "ClusTR"  # the same checkpoint
    args = parse_args(["--checkpoint", str(train), "--consistency-lambda", "8"])
    (train / "params.txt").write_text(params_line(args) + "\n")
    (train / "checkpoint.pth").write_bytes(b"retrained" + (train / "checkpoint.pth").read_bytes())
    df = tables.experiment_table([evaluation])
    assert df.index[0] == "eval"
    assert any(n.startswith("eval: ") and "changed since this evaluation" in n
               for n in df.attrs["notes"])
