"""Evaluations that run for hours: killed (SIGKILL) or stopped (SIGTERM) anywhere and resumed,
they write the files an uninterrupted evaluation writes; a changed argument is refused;
run.log keeps every session's lines; --save-adv's images pass an independent re-check; the
GitHub ``autoattack`` package is called through its documented signature.

The evaluations run as subprocesses (a SIGKILL must not take pytest with it) on 4 test
images of a ResNet18 with per-class clusters fitted on 12 training images (no training).
``CLUSTR_TEST_KILL_AT`` / ``CLUSTR_TEST_SIGNAL_AT`` (``base.preemption.point``) stop them at
named points. ``tests/fakes/autoattack`` stands in for the GitHub package, which is not on
PyPI: it records its calls and returns FGSM images.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import ROOT

FAKES = ROOT / "tests" / "fakes"
CLASSES = ("ant", "bee", "cat", "dog")  # AutoAttack's standard version needs 4 classes
# result files compared byte for byte; the two with timing columns are compared without them
SAME_BYTES = ("attack_results_ext.csv", "predictions_eps2.csv", "predictions_eps8.csv",
              "predictions_eps16.csv", "predictions_eps25.5.csv", "robustness.png",
              "diagnostics.json", "adversarial.pt")


@pytest.fixture(scope="module")
def four_classes(tmp_path_factory) -> Path:
    """4 classes of noise images with a faint tint: 3 training and 1 test image each."""
    root = tmp_path_factory.mktemp("four")
    gen = torch.Generator().manual_seed(3)
    for split, n in (("train", 3), ("test", 1)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                img = torch.rand(3, 32, 32, generator=gen) * 0.9
                img[c % 3] += 0.1
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray((img * 255).byte().permute(1, 2, 0).numpy()).save(
                    folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def ckpt(four_classes, tmp_path_factory) -> Path:
    """A ClusTR checkpoint of a seeded random ResNet18 with K = 1 cluster per class."""
    from base.io import save_atomic
    from datasets.data import load_dataset
    from models.checkpoint import build_checkpoint
    from models.resnet import ResNet18, normalization_for
    from utils.train.clustering import KMeansSettings, fit_cluster_classifier

    torch.manual_seed(0)
    backbone = ResNet18(4, *normalization_for("imagefolder")).eval()
    train = load_dataset("imagefolder", str(four_classes), "train", workers=0)
    model = fit_cluster_classifier(backbone, train, KMeansSettings.for_dataset("imagefolder", 1),
                                   L=4, batch=12)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    save_atomic(build_checkpoint(backbone, model.head, 1, 1, 0.0), str(path))
    return path


def eval_argv(data: Path, ckpt: Path, exp: Path) -> list[str]:
    return ["--checkpoint", str(exp), "--evaluate-ckpt", str(ckpt), "--dataset", "imagefolder",
            "--data-root", str(data), "--L", "4", "--iterations", "1", "--restarts", "2",
            "--test-batch", "2", "--attack-batch", "2", "--workers", "0", "--quiet",
            "--device", "cpu", "--strong", "--autoattack", "--autoattack-eps", "8", "16",
            "--save-adv"]


def run(argv, calls: Path, **env) -> subprocess.CompletedProcess:
    environ = dict(os.environ, OMP_NUM_THREADS="1", FAKE_AUTOATTACK_CALLS=str(calls),
                   PYTHONPATH=os.pathsep.join([str(FAKES), str(ROOT)]), **env)
    for name in ("CLUSTR_TEST_KILL_AT", "CLUSTR_TEST_SIGNAL_AT"):
        if name not in env:
            environ.pop(name, None)
    return subprocess.run([sys.executable, str(ROOT / "main_clustr.py"), *argv],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=environ)


def units(exp: Path) -> dict:
    return torch.load(exp / "eval_resume.pth", map_location="cpu", weights_only=True)["units"]


def without_seconds(exp: Path) -> dict:
    """The two result files with timing, less the timing."""
    with open(exp / "attack_results_strong.csv") as f:
        rows = [r[:-1] for r in csv.reader(f)]  # the last column is "seconds"
    summary = json.loads((exp / "eval_summary.json").read_text())
    summary.pop("seconds")
    return {"strong": rows, "summary": summary}


def assert_same_results(a: Path, b: Path) -> None:
    for name in SAME_BYTES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert without_seconds(a) == without_seconds(b)


@pytest.fixture(scope="module")
def reference(four_classes, ckpt, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted evaluation and the fake AutoAttack's record of its calls."""
    base = tmp_path_factory.mktemp("reference")
    exp, calls = base / "exp", base / "calls.jsonl"
    res = run(eval_argv(four_classes, ckpt, exp), calls)
    assert res.returncode == 0, res.stderr[-3000:]
    return exp, calls


def test_killed_and_stopped_anywhere_then_resumed_writes_the_same_files(
        four_classes, ckpt, reference, tmp_path):
    exp, calls = tmp_path / "exp", tmp_path / "calls.jsonl"
    argv = eval_argv(four_classes, ckpt, exp)

    # SIGKILL right after the paper's PGD finished its first eps
    res = run(argv, calls, CLUSTR_TEST_KILL_AT="pgd-eps-0")
    assert res.returncode == -9, res.stderr[-2000:]
    u = units(exp)
    assert u["pgd/0"]["done"] and "pgd/1" not in u

    # SIGTERM in the middle of a restart (after its first batch of two): saved there
    res = run(argv + ["--resume"], calls, CLUSTR_TEST_SIGNAL_AT="pgd-batch-1-0-0")
    assert res.returncode == 143, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM in PGD eps 8/255, restart 1") and \
        "continue with the same command and --resume" in last and "eval_resume.pth" in last
    assert (u := units(exp))["pgd/1"]["restart"] == 0 and u["pgd/1"]["batch"] == 1

    # a changed evaluation argument is refused with one line naming it
    changed = list(argv)
    changed[changed.index("--iterations") + 1] = "2"
    kept = {n: (exp / n).read_bytes() for n in ("eval_resume.pth", "params.txt", "args.json",
                                                 "run.log")}
    res = run(changed + ["--resume"], calls)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "--iterations 1 (now 2)" in res.stderr
    assert kept == {n: (exp / n).read_bytes() for n in kept}  # nothing written

    # SIGKILL after one restart of the next eps, then after one restart of PGD-DLR
    res = run(argv + ["--resume"], calls, CLUSTR_TEST_KILL_AT="pgd-restart-2-0")
    assert res.returncode == -9, res.stderr[-2000:]
    assert (u := units(exp))["pgd/1"]["done"] and u["pgd/2"]["restart"] == 1
    res = run(argv + ["--resume"], calls, CLUSTR_TEST_KILL_AT="pgd-dlr-restart-1-0")
    assert res.returncode == -9, res.stderr[-2000:]
    assert (u := units(exp))["pgd-ce/3"]["done"] and u["pgd-dlr/1"]["restart"] == 1

    # SIGKILL inside AutoAttack at its second eps (each fake run does 2 forward passes)
    res = run(argv + ["--resume"], calls, CLUSTR_TEST_KILL_AT="autoattack-forward:3")
    assert res.returncode == -9, res.stderr[-2000:]
    assert (u := units(exp))["autoattack/0"]["done"] and "autoattack/1" not in u

    res = run(argv + ["--resume"], calls)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(13 unit(s) done: pgd/0, pgd/1, pgd/2, pgd/3, pgd-ce/0" in res.stdout  # not redone
    assert_same_results(reference[0], exp)
    # AutoAttack at 8/255 ran once; at 16/255 twice (the first run was killed)
    evals = [json.loads(line) for line in calls.read_text().splitlines()
             if '"run_standard_evaluation"' in line]
    assert len(evals) == 3

    # run.log: every session's lines appended, warnings and diagnostics included
    log = (exp / "run.log").read_text()
    assert log.count("evaluating ") == 6  # 6 sessions; the refused one wrote nothing
    assert "PGD eps 2/255" in log and "pgd-dlr eps 25.5/255" in log
    assert "input gradients at clean" in log and "stopped by SIGTERM" in log
    assert "resuming the evaluation" in log and "(now 2)" not in log


def test_github_autoattack_called_through_its_signature(reference):
    exp, calls = reference
    records = [json.loads(line) for line in calls.read_text().splitlines()]
    made = [r for r in records if r["call"] == "AutoAttack"]
    ran = [r for r in records if r["call"] == "run_standard_evaluation"]
    assert [round(r["eps"] * 255, 6) for r in made] == [8.0, 16.0]
    for r in made:
        assert r["norm"] == "Linf" and r["version"] == "standard" and r["device"] == "cpu"
        assert r["log_path"] == str(exp / "autoattack_log.txt") and r["seed"] == 111
    assert [(r["n"], r["bs"], r["return_labels"], r["apgd_t_targets"]) for r in ran] == \
        [(4, 2, False, 3)] * 2
    diagnostics = json.loads((exp / "diagnostics.json").read_text())
    assert diagnostics["settings"]["autoattack_package"] == "autoattack 0.1-fake"
    assert (exp / "autoattack_log.txt").read_text().count("robust accuracy") == 2


def test_pyautoattack_is_used_without_the_github_package(monkeypatch):
    pytest.importorskip("pyautoattack", reason="pyautoattack not installed")
    from utils.attacks.autoattack_backend import find_backend

    monkeypatch.setitem(sys.modules, "autoattack", None)  # not installed
    backend = find_backend()
    assert backend.package == "pyautoattack" and backend.name().startswith("pyautoattack ")
    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.delitem(sys.modules, "autoattack")
    assert find_backend().name() == "autoattack 0.1-fake"  # preferred when installed


def test_saved_adversarial_images_pass_an_independent_recheck(reference, ckpt, four_classes):
    from datasets.data import load_dataset, to_float
    from models.classifier import ClusterClassifier

    exp, _ = reference
    store = torch.load(exp / "adversarial.pt", map_location="cpu", weights_only=True)
    model = ClusterClassifier.from_checkpoint(str(ckpt), dataset="imagefolder").eval()
    test = load_dataset("imagefolder", str(four_classes), "test", workers=0)
    assert store["epsilons"] == [2.0, 8.0, 16.0, 25.5]
    assert set(store["paper-pgd"]) == {"2", "8", "16", "25.5"}
    assert set(store["strongest"]) == {"2", "8", "16", "25.5"}
    checked = 0
    for part in ("paper-pgd", "strongest"):
        for key, entry in store[part].items():
            eps = float(key) / 255
            x = to_float(test.images[entry["indices"]])
            adv = entry["images"]
            assert adv.dtype == torch.float32 and adv.shape == x.shape
            assert torch.equal(entry["labels"], test.labels[entry["indices"]])
            assert (adv - x).abs().max() <= eps + 1e-6 if len(adv) else True
            assert adv.min() >= 0 and adv.max() <= 1 if len(adv) else True
            with torch.no_grad():  # one image at a time: no batch to share rounding with
                logit = [model(a[None]).argmax(1).item() for a in adv]
                paper = [model.paper_scores(a[None]).argmax(1).item() for a in adv]
            pred = paper if part == "paper-pgd" else logit
            assert pred == entry["pred"].tolist()
            assert all(p != y for p, y in zip(pred, entry["labels"].tolist()))
            checked += len(adv)
    assert checked > 0  # something was fooled, so the re-check checked something
    strong = {r["epsilon"]: r for r in csv.DictReader(open(exp / "attack_results_strong.csv"))}
    assert store["strongest"]["8"]["attack"] in ("pgd-ce", "pgd-dlr", "autoattack")
    assert strong  # the table the "strongest" choice came from exists


def test_args_json_beside_params(reference):
    exp, _ = reference
    args = json.loads((exp / "args.json").read_text())
    assert args["iterations"] == 1 and args["autoattack_eps"] == [8.0, 16.0]
    assert args["save_adv"] is True and (exp / "params.txt").is_file()


# -- training: SIGTERM, run.log ---------------------------------------------------------------
def train_argv(data: Path, exp: Path) -> list[str]:
    return ["--checkpoint", str(exp), "--dataset", "imagefolder", "--data-root", str(data),
            "--epochs", "2", "--m", "2", "--d", "2", "--k", "1", "--L", "4", "--iterations",
            "1", "--restarts", "1", "--quiet", "--workers", "0", "--test-batch", "4",
            "--embed-batch", "12", "--device", "cpu"]


def test_sigterm_during_training_and_its_sweep_resumes_to_the_same_files(four_classes,
                                                                         tmp_path):
    ref, exp, calls = tmp_path / "ref", tmp_path / "exp", tmp_path / "calls"
    assert run(train_argv(four_classes, ref), calls).returncode == 0
    # stopped after step 2 of epoch 1 (of 3): the state of that step is saved
    res = run(train_argv(four_classes, exp), calls, CLUSTR_TEST_SIGNAL_AT="train-step-1-2")
    assert res.returncode == 143, res.stderr[-2000:]
    assert "stopped by SIGTERM in epoch 1 after step 2" in res.stderr.strip().splitlines()[-1]
    state = torch.load(exp / "resume.pth", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 2)
    # stopped again in the sweep after training, after PGD's first eps
    res = run(train_argv(four_classes, exp) + ["--resume"], calls,
              CLUSTR_TEST_SIGNAL_AT="pgd-eps-0")
    assert res.returncode == 143, res.stderr[-2000:]
    assert units(exp)["pgd/0"]["done"] and "pgd/1" not in units(exp)
    # the evaluation to continue is refused other evaluation arguments before anything runs
    changed = train_argv(four_classes, exp)
    changed[changed.index("--restarts") + 1] = "2"
    res = run(changed + ["--resume"], calls)
    assert res.returncode == 2 and "it had --restarts 1 (now 2)" in res.stderr
    res = run(train_argv(four_classes, exp) + ["--resume"], calls)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("log.txt", "attack_results_ext.csv", "predictions_eps8.csv", "robustness.png"):
        assert (ref / name).read_bytes() == (exp / name).read_bytes(), name
    log = (exp / "run.log").read_text()
    for line in ("epoch 1/2", "epoch 2/2", "PGD eps 2/255", "PGD eps 25.5/255",
                 "WARNING no --pretrained-path", "stopped by SIGTERM in epoch 1 after step 2",
                 "resuming after epoch 0, step 2", "resuming the evaluation"):
        assert line in log, line
    assert log.count("data: imagefolder") == 3  # three sessions, appended


def test_resume_of_an_evaluation_needs_its_state(four_classes, ckpt, tmp_path):
    exp = tmp_path / "exp"
    res = run(eval_argv(four_classes, ckpt, exp) + ["--resume"], tmp_path / "calls")
    assert res.returncode == 2 and "eval_resume.pth not found" in res.stderr
    assert not exp.exists()


def test_a_refused_run_leaves_no_run_log(four_classes, ckpt, tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    shutil.copy(ckpt, exp / "other.pth")
    (exp / "params.txt").write_text("x\n")
    res = run(eval_argv(four_classes, ckpt, exp), tmp_path / "calls")
    assert res.returncode == 2 and not (exp / "run.log").exists()


def test_a_signal_asks_to_stop_a_second_one_or_one_in_an_unsaveable_region_stops_at_once():
    import signal

    from base import preemption

    before = signal.getsignal(signal.SIGINT)
    preemption.install()
    try:
        assert not preemption.should_stop()
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.should_stop()
        assert preemption.stop("here").exit_status == 130
        with pytest.raises(preemption.Preempted) as second:
            os.kill(os.getpid(), signal.SIGINT)
        assert second.value.exit_status == 130
        preemption.install()  # a fresh request state
        with pytest.raises(preemption.Preempted) as inside:
            with preemption.immediate():
                os.kill(os.getpid(), signal.SIGTERM)
        assert inside.value.exit_status == 143 and "nothing new to save" in str(inside.value)
    finally:
        preemption.uninstall()
    assert signal.getsignal(signal.SIGINT) is before
