"""The reproduction report: its budgets, its calls, resuming, reuse, refusals and curves.

The calls themselves are replaced by a fake that writes what each command leaves (through
the evaluation's own writers, ``tests.test_tables.write_folder``), so that a report can be
killed in any call and resumed in seconds; ``python -m benchmarks.reproduce --budget smoke``
runs the real commands.
"""
from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import pytest

import main_clustr
from benchmarks import reproduce, reproduce_plan, reproduce_report
from tests.test_tables import _parse_markdown, write_folder
from utils import experiments
from utils.pretrained_clusters import build_parser as cluster_parser


@pytest.fixture
def data(tmp_path) -> Path:
    """An image folder that lists 13 training images (only the listing is read)."""
    root = tmp_path / "data"
    for c, n in (("a", 7), ("b", 6)):
        (root / "cifar10-subset" / "train" / c).mkdir(parents=True)
        (root / "cifar10-subset" / "test" / c).mkdir(parents=True)
        for i in range(n):
            (root / "cifar10-subset" / "train" / c / f"{i}.png").write_bytes(b"")
    (root / "weights").mkdir()
    (root / "weights" / "resnet18_cifar10.pt").write_bytes(b"weights")
    return root


def planned(data: Path, tmp_path: Path, *flags) -> dict[str, reproduce_plan.Step]:
    args = reproduce_plan.build_parser().parse_args(["--data", str(data), "--work",
                                                     str(tmp_path / "w"), *flags])
    paths = reproduce_plan.Paths(args)
    count = reproduce_plan.training_count(args, paths)
    budget = reproduce.resolve_budget(args, count)
    return {s.key: s for s in reproduce_plan.plan(args, budget, paths, count)}


def value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_paper_budget_is_the_originals_settings(data, tmp_path):
    steps = planned(data, tmp_path, "--budget", "paper")
    trained = {k.split("/")[0] for k in steps if k.endswith("/train")}
    assert trained == set(reproduce_plan.ROWS) - {"ce"}
    clustr = main_clustr.parse_args(steps["clustr/train"].argv[1:])
    assert (clustr.epochs, clustr.lr, clustr.m, clustr.d, clustr.k, clustr.alpha, clustr.L,
            clustr.milestones) == (30, 1e-4, 12, 20, 2, 12.5, 20, [30, 60])
    assert clustr.save_all and clustr.train_subset is None
    seed = main_clustr.parse_args(steps["qtrades/train"].argv[1:])
    assert (seed.consistency_lambda, seed.epochs, seed.L) == (12.5, 30, 20)
    readme = main_clustr.parse_args(steps["qtrades-l8/train"].argv[1:])
    assert (readme.consistency_lambda, readme.epochs, readme.L) == (8.0, 25, 10)
    free = main_clustr.parse_args(steps["free/train"].argv[1:])
    assert (free.minibatch_replays, free.epochs) == (8, 4)  # 30 / 8 passes, rounded
    assert "--as-original" in steps["qtrades-original/train"].argv
    assert value(steps["qtrades-logit/train"].argv, "--consistency-attack") == "logit"
    fgsm = steps["fgsm/train"].argv
    assert fgsm[:2] == ["-m", "utils.train.pretrain"] and value(fgsm, "--adversarial") == "fgsm"
    assert value(fgsm, "--epochs") == "30"
    clusters = cluster_parser().parse_args(steps["pretrained/train"].argv[2:])
    assert (clusters.k, clusters.L, clusters.train_subset) == (2, 20, None)
    assert value(fgsm, "--pretrained-path") == value(steps["clustr/train"].argv,
                                                     "--pretrained-path")
    evaluations = [main_clustr.parse_args(s.argv[1:]) for k, s in steps.items()
                   if k.endswith("/eval")]
    assert len(evaluations) == len(reproduce_plan.ROWS)
    for e in evaluations:  # the same images and attacks for every row
        assert (e.iterations, e.restarts, e.test_subset, e.strong_subset, e.L, e.seed) == \
            (20, 10, None, 1000, 20, 111)
        assert e.strong and e.autoattack and e.evaluate_ckpt
    curves = [k for k in steps if k.startswith("clustr/curve/")]
    assert len(curves) == 30 and "pretrained/curve/0" in steps and "ce/curve/0" in steps
    last = main_clustr.parse_args(steps["clustr/curve/30"].argv[1:])
    assert last.evaluate_ckpt.endswith("checkpoint_29.pth")  # --save-all counts from 0
    assert (last.test_subset, last.restarts, last.strong, last.autoattack) == \
        (200, 1, True, False)


def test_quick_budget_is_the_one_epoch_report(data, tmp_path):
    steps = planned(data, tmp_path)  # --budget quick is the default
    assert "qtrades-l8/train" not in steps  # the lambda 8 row is the paper budget's
    clustr = main_clustr.parse_args(steps["clustr/train"].argv[1:])
    assert clustr.epochs == 1 and clustr.train_subset is None
    free = main_clustr.parse_args(steps["free/train"].argv[1:])
    assert (free.epochs, free.train_subset) == (1, 2)  # 1/8 of the 13 images, rounded up
    e = main_clustr.parse_args(steps["clustr/eval"].argv[1:])
    assert (e.test_subset, e.strong_subset, e.iterations, e.restarts) == (100, 100, 20, 1)
    alone = planned(data, tmp_path, "--rows", "clustr")  # its curve still starts at epoch 0
    assert list(alone)[0] == "pretrained/train" and "pretrained/eval" not in alone


def test_cpu_budget_is_the_most_epochs_the_measured_costs_fit(data, tmp_path, capsys):
    costs = {"command": "python -m benchmarks.reproduce --measure", "date": "d", "load": 0.1,
             "images": 40, "rows": {r: {"train_s": 30.0, "eval_s": 4.0}
                                    for r in reproduce_plan.ROWS}}
    budget = reproduce.cpu_budget(costs, 5000)
    e = budget.epochs
    assert 1 <= e < 30 and budget.strong_images >= 500
    assert reproduce.predicted_minutes(costs, budget, 5000) <= 90 < \
        reproduce.predicted_minutes(costs, reproduce.replace(budget, epochs=e + 1), 5000)
    slower = {**costs, "rows": {r: {"train_s": 60.0, "eval_s": 4.0} for r in costs["rows"]}}
    assert reproduce.cpu_budget(slower, 5000).epochs < e
    assert f"{e} epoch(s)" in budget.chosen and "--measure" in budget.chosen
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(costs))
    steps = planned(data, tmp_path, "--budget", "cpu", "--costs", str(path))
    assert value(steps["clustr/train"].argv, "--epochs") == str(e)
    assert reproduce.main(["--data", str(data), "--budget", "cpu", "--costs",
                           str(tmp_path / "none.json")]) == 2
    assert "--measure" in capsys.readouterr().err


def test_the_curves_cost_no_autoattack_and_a_budget_that_cannot_fit_says_so():
    rows = {r: {"train_s": 30.0, "eval_s": 50.0, "autoattack_s": 40.0, "attacks_s": 8.0}
            for r in reproduce_plan.ROWS}
    costs = {"command": "python -m benchmarks.reproduce --measure", "date": "d", "load": 0.1,
             "images": 40, "rows": rows}
    cheap = {**costs, "rows": {r: {**c, "eval_s": 10.0, "autoattack_s": 0.0}
                               for r, c in rows.items()}}
    budget = reproduce.replace(reproduce.CPU_BASE, epochs=3)
    # AutoAttack runs once per row, on the strong images; every curve point runs without it
    aa = sum(40.0 / 40 * budget.strong_images for r in reproduce_plan.rows_of(budget)) / 60
    assert reproduce.predicted_minutes(costs, budget, 5000) == pytest.approx(
        reproduce.predicted_minutes(cheap, budget, 5000) + aa)
    slow = {**costs, "rows": {r: {**c, "eval_s": 9e4, "autoattack_s": 9e4 - 10}
                              for r, c in rows.items()}}
    too_slow = reproduce.cpu_budget(slow, 5000)
    assert too_slow.epochs == 1 and too_slow.chosen.startswith("no budget")


class FakeCalls:
    """Stands in for ``reproduce.launch``: writes what each call leaves; ``die`` names a
    call during which the report is killed (after the call saved its resume state)."""

    def __init__(self, die: str | None = None):
        self.die, self.calls = die, []

    def __call__(self, argv, log_path, threads):
        key = log_path.split("/logs/")[-1].removesuffix(".log")
        self.calls.append((key, argv))
        root = Path(reproduce_plan.REPO)
        if argv[0] == "-m":  # the clusters, the FGSM baseline
            (root / value(argv, "--out")).parent.mkdir(parents=True, exist_ok=True)
            (root / value(argv, "--out")).write_bytes(b"weights")
            return 0, 1.0
        folder = root / value(argv, "--checkpoint")
        evaluate = "--evaluate-ckpt" in argv
        if key == self.die and "--resume" not in argv:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ("eval_resume.pth" if evaluate else "resume.pth")).write_bytes(b"state")
            raise KeyboardInterrupt  # the report's process ends here
        if evaluate:
            shutil.rmtree(folder, ignore_errors=True)
            k = zlib.crc32(key.encode()) % 7  # a different, fixed result per call
            write_folder(folder, [], 18 - k, {2.0: 14 - k, 8.0: 10 - k, 16.0: 5, 25.5: 2},
                         {(e, a): 9 - k for e in (2.0, 8.0, 16.0, 25.5)
                          for a in ("pgd-ce", "pgd-dlr")} | {(8.0, "autoattack"): 3})
        else:
            folder.mkdir(parents=True, exist_ok=True)
            for name in ["checkpoint.pth"] + [f"checkpoint_{e}.pth" for e in range(
                    int(value(argv, "--epochs")))]:
                (folder / name).write_bytes(b"checkpoint")
        return 0, 1.0


def report(monkeypatch, calls, data, work, *flags) -> int:
    monkeypatch.setattr(reproduce, "launch", calls)
    return reproduce.main(["--budget", "smoke", "--rows", "pretrained", "clustr", "free",
                           "--data", str(data), "--work", str(work), "--out",
                           str(work.parent / f"{work.name}.md"), *flags])


def results(work: Path) -> str:
    text = (work.parent / f"{work.name}.md").read_text()
    return text.split("## Results")[1].split("## Curves")[0]


@pytest.mark.parametrize("die", ["clustr/train", "clustr/eval", "free/curve/1"])
def test_killed_report_resumes_to_the_same_table(monkeypatch, data, tmp_path, die):
    assert report(monkeypatch, FakeCalls(), data, tmp_path / "whole") == 0
    killed = FakeCalls(die)
    with pytest.raises(KeyboardInterrupt):
        report(monkeypatch, killed, data, tmp_path / "killed")
    again = FakeCalls()
    assert report(monkeypatch, again, data, tmp_path / "killed", "--resume") == 0
    ran_before = [k for k, _ in killed.calls[:-1]]
    assert [k for k, _ in again.calls][0] == die  # finished calls are reused, not rerun
    assert not set(ran_before) & {k for k, _ in again.calls}
    assert "--resume" in again.calls[0][1]  # the stopped call continues with its own flag
    assert results(tmp_path / "killed") == results(tmp_path / "whole")
    text = (tmp_path / "killed.md").read_text()
    assert "in 2 sitting(s) (resumed)" in text
    # every cell of the table is the evaluation folder's own number
    parsed = _parse_markdown(results(tmp_path / "killed"))
    x = experiments.load_experiment(str(tmp_path / "killed" / "clustr" / "eval"))
    cells = dict(zip(parsed["__header__"], parsed["ClusTR"], strict=True))
    assert float(cells["clean (n=20)"]) == pytest.approx(x.paper[0.0], abs=0.05)
    assert float(cells["worst case 8/255 (n=20)"]) == \
        pytest.approx(x.strong[(8.0, "worst-case")], abs=0.05)


def test_finished_report_is_reused_and_a_change_is_refused(monkeypatch, data, tmp_path,
                                                           capsys):
    work = tmp_path / "w"
    assert report(monkeypatch, FakeCalls(), data, work) == 0
    again = FakeCalls()
    assert report(monkeypatch, again, data, work, "--resume") == 0 and again.calls == []
    (work.parent / "w.md").unlink()
    assert report(monkeypatch, again, data, work, "--render-only") == 0 and again.calls == []
    assert "in 2 sitting(s)" in (work.parent / "w.md").read_text()  # not a third
    assert report(monkeypatch, again, data, work) == 2  # without --resume: refused
    assert "--resume" in capsys.readouterr().err
    assert report(monkeypatch, again, data, work, "--resume", "--device", "cpu") == 2
    assert "a changed setting" in capsys.readouterr().err
    (work / "clustr" / "eval" / "attack_results_ext.csv").write_text("epsilons\n")
    assert report(monkeypatch, again, data, work, "--resume") == 2
    assert "attack_results_ext.csv is not the file" in capsys.readouterr().err
    assert again.calls == []


def test_curves_have_one_line_per_row_and_attack(monkeypatch, data, tmp_path):
    work = tmp_path / "w"
    assert report(monkeypatch, FakeCalls(), data, work) == 0
    args = reproduce_plan.build_parser().parse_args(
        ["--budget", "smoke", "--rows", "pretrained", "clustr", "free", "--data", str(data),
         "--work", str(work)])
    paths = reproduce_plan.Paths(args)
    steps = reproduce_plan.plan(args, reproduce_plan.BUDGETS["smoke"], paths, 13)
    frame = reproduce_report.curve_frame(steps, paths)
    assert set(frame["row"]) == {"clustr", "free"}  # the trained rows
    assert sorted(frame["epoch"].unique()) == [0, 1]  # epoch 0: the pretrained clusters
    labels = reproduce_report.plot_curves(frame, str(tmp_path / "c.png"))
    assert len(labels) == 4 and len(set(labels)) == 4  # 2 rows x (paper PGD, worst case)
    assert (tmp_path / "c.png").stat().st_size > 0
    assert (work.parent / "w_curves.png").stat().st_size > 0
    point = frame[(frame["row"] == "clustr") & (frame["epoch"] == 1) &
                  (frame["attack"] == "paper PGD")]["accuracy"].item()
    assert math.isclose(point, experiments.load_experiment(
        str(work / "clustr" / "curve" / "1")).paper[8.0])
    shutil.rmtree(work / "free" / "curve" / "1")  # a row with no trained epoch: no line
    assert set(reproduce_report.curve_frame(steps, paths)["row"]) == {"clustr"}


def test_a_stopped_call_continues_with_its_own_flags(tmp_path):
    folder = tmp_path / "run"
    train = reproduce_plan.Step("r/train", ["main_clustr.py"], [], str(folder))
    evaluate = reproduce_plan.Step("r/eval", ["main_clustr.py", "--evaluate-ckpt", "c.pth"],
                                   [], str(folder))
    assert reproduce.continue_flags(train) == []  # never started: nothing to continue
    folder.mkdir()
    (folder / "run.log").write_text("")
    assert reproduce.continue_flags(train) == ["--overwrite"]  # files, no resume state
    (folder / "resume.pth").write_bytes(b"")
    assert reproduce.continue_flags(train) == ["--resume"]
    assert reproduce.continue_flags(evaluate) == ["--overwrite"]
    (folder / "eval_resume.pth").write_bytes(b"")
    assert reproduce.continue_flags(evaluate) == ["--resume"]
    out = tmp_path / "weights.pt"
    fgsm = reproduce_plan.Step("fgsm/train", ["-m", "utils.train.pretrain"], [str(out)],
                               kind="pretrain")
    assert reproduce.continue_flags(fgsm) == []
    out.write_bytes(b"")
    assert reproduce.continue_flags(fgsm) == ["--force"]  # no resume: started again
