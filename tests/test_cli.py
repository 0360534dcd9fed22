"""The real command, end to end on tiny data, checking every output file's format."""
import csv
import subprocess
import sys

import torch

from tests.conftest import ROOT

ORIGINAL_KEYS = ("state_dict", "epoch", "test_acc", "cluster_centers", "cluster_classes",
                 "variance", "K", "L", "normalize_probs")


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "main_clustr.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_train_then_sweep_writes_the_seed_outputs(tiny_folder, tmp_path):
    out = tmp_path / "expA"
    res = run_cli("--checkpoint", out, "--dataset", "imagefolder", "--data-root", tiny_folder,
                  "--epochs", 2, "--k", 2, "--m", 3, "--d", 4, "--L", 4, "--iterations", 2,
                  "--restarts", 1, "--save-all", "--test-batch", 8)
    assert res.returncode == 0, res.stderr

    lines = (out / "log.txt").read_text().splitlines()
    assert lines[0].split("\t") == ["Epoch", "LR", "Train loss", "Train acc.", "Test loss",
                                    "Test acc."]
    assert len(lines) == 3
    for i, line in enumerate(lines[1:], start=1):
        cols = line.split("\t")
        assert len(cols) == 6 and cols[0] == str(i)
        assert float(cols[1]) == 1e-4
        assert all(0 <= float(c) <= 100 for c in (cols[3], cols[5]))

    params = (out / "params.txt").read_text()
    assert params.count("\n") == 1
    fields = dict(item.split(": ", 1) for item in params.strip().split(" | "))
    for name in ("epochs", "lr", "dataset", "checkpoint", "k", "d", "m", "L", "alpha",
                 "consistency_lambda", "restarts", "iterations", "pretrained_path"):
        assert name in fields, name
    assert fields["L"] == "4" and fields["epochs"] == "2"

    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    for key in ORIGINAL_KEYS:
        assert key in ckpt, key
    assert ckpt["epoch"] == 1 and ckpt["K"] == 2 and ckpt["L"] == 4  # from 0, as the original
    assert ckpt["normalize_probs"] is True
    assert ckpt["cluster_centers"].shape == (6, 512)
    assert ckpt["cluster_centers"].dtype == torch.float32
    assert ckpt["cluster_classes"].tolist() == [0, 0, 1, 1, 2, 2]
    assert ckpt["variance"].shape == (6,)
    assert "conv1.weight" in ckpt["state_dict"]
    assert "layer2.0.shortcut.0.weight" in ckpt["state_dict"]
    assert not any(k.startswith(("module.", "backbone.")) for k in ckpt["state_dict"])
    for epoch in (0, 1):  # the original's names count from 0 too
        saved = torch.load(out / f"checkpoint_{epoch}.pth", map_location="cpu",
                           weights_only=True)
        assert saved["epoch"] == epoch
    assert not (out / "checkpoint_2.pth").exists()

    with open(out / "attack_results_ext.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epsilons", "test_set_accs"]
    assert [float(r[0]) for r in rows[1:]] == [0.0, 2.0, 8.0, 16.0, 25.5]
    assert float(rows[1][1]) == ckpt["test_acc"]


def test_help_lists_every_original_argument():
    res = run_cli("--help")
    assert res.returncode == 0
    for flag in ("--epochs", "--batch-size", "--test-batch", "--lr", "--dataset",
                 "--checkpoint", "--seed", "--arch", "--evaluate-ckpt", "--k", "--d", "--m",
                 "--L", "--alpha", "--minibatch-replays", "--milestones",
                 "--consistency-lambda", "--xent-lambda", "--mse-consistency",
                 "--not-normalize", "--actual-trades", "--pretrained-path", "--save-all",
                 "--restarts", "--iterations"):
        assert flag in res.stdout, flag


def test_same_seed_same_log(tiny_folder, tmp_path):
    logs = []
    for name in ("a", "b"):
        res = run_cli("--checkpoint", tmp_path / name, "--dataset", "imagefolder",
                      "--data-root", tiny_folder, "--epochs", 1, "--k", 2, "--m", 3,
                      "--d", 4, "--L", 4, "--iterations", 1, "--restarts", 1)
        assert res.returncode == 0, res.stderr
        logs.append((tmp_path / name / "log.txt").read_text())
    assert logs[0] == logs[1]
