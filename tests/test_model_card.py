"""What a researcher takes away from a run: ``model_info.json`` (RobustBench's fields), the
model through ``torch.hub``, and the pictures of ``python -m utils.plots``. One tiny real
run (two epochs, then the evaluation with --autoattack through the test stand-in of the
GitHub package) feeds every test."""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_clustr
from base.errors import UsageError
from base.io import load_checkpoint
from datasets.data import load_dataset, to_float
from models.classifier import ClusterClassifier
from tests.conftest import ROOT
from utils import experiments, plots, tables
from utils.outputs.results import read_csv
from utils.train_setting import parse_args

CLASSES = ("ant", "bee", "cat", "dog")  # AutoAttack's standard version needs 4 classes


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """4 tinted noise classes: 8 training and 3 test images each."""
    root = tmp_path_factory.mktemp("four")
    gen = torch.Generator().manual_seed(5)
    for split, n in (("train", 8), ("test", 3)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = torch.rand(3, 32, 32, generator=gen) * 0.6
                img[c % 3] += 0.4 if c < 3 else 0.2
                Image.fromarray((img * 255).byte().permute(1, 2, 0).numpy()).save(
                    root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def exp(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "expA"
    argv = ["--checkpoint", str(out), "--dataset", "imagefolder", "--data-root", str(folder),
            "--m", "3", "--d", "4", "--k", "2", "--L", "8", "--epochs", "2", "--iterations",
            "1", "--restarts", "1", "--test-batch", "12", "--workers", "0", "--quiet",
            "--device", "cpu", "--autoattack"]
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "tests" / "fakes"))  # the GitHub package's stand-in
        assert main_clustr.main(argv) == 0
    return out


def test_model_info_fields_equal_the_csv_files(exp):
    info = json.loads((exp / "model_info.json").read_text())
    strong = {(float(r["epsilon"]), r["attack"]): r for r in
              read_csv(exp / "attack_results_strong.csv")}
    paper = {float(r["epsilons"]): float(r["test_set_accs"])
             for r in read_csv(exp / "attack_results_ext.csv")}
    assert info["eps"] == "8/255" and info["threat_model"] == "Linf"
    assert info["clean_acc"] == f"{float(strong[0.0, 'clean']['robust_accuracy']):.2f}"
    assert info["clean_acc"] == f"{paper[0.0]:.2f}"  # all test images were attacked
    assert info["reported"] == f"{float(strong[8.0, 'paper-pgd']['robust_accuracy']):.2f}"
    assert info["reported"] == f"{paper[8.0]:.2f}"
    assert info["autoattack_acc"] == \
        f"{float(strong[8.0, 'autoattack']['robust_accuracy']):.2f}"
    assert info["n_examples"] == int(strong[0.0, "clean"]["examples"]) == 12
    assert info["additional_data"] is False and info["number_forward_passes"] == 1
    assert "K=2" in info["architecture"] and "L=8" in info["architecture"]
    for field in ("link", "name", "authors", "dataset", "venue", "footnote"):
        assert info[field], field
    digest = hashlib.sha256((exp / "checkpoint.pth").read_bytes()).hexdigest()
    assert info["checkpoint_sha256"] == digest


def test_model_info_command_repeats_the_run(exp):
    info = json.loads((exp / "model_info.json").read_text())
    argv = shlex.split(info["command"])
    assert argv[:2] == ["python", "main_clustr.py"]
    recorded = json.loads((exp / "args.json").read_text())
    parsed = vars(parse_args(argv[2:]))
    assert bool(parsed.pop("not_normalize")) == bool(recorded.pop("not_normalize"))  # unset: off
    assert parsed == recorded


def test_model_info_command_writes_the_same_card_again(exp, capsys):
    from base.errors import exit_status
    from utils.outputs import model_info

    written = (exp / "model_info.json").read_bytes()
    assert exit_status(lambda: model_info.run([str(exp)])) == 0
    assert capsys.readouterr().out.strip() == str(exp / "model_info.json")
    assert (exp / "model_info.json").read_bytes() == written


def test_tables_read_model_info(exp, tmp_path):
    df = tables.experiment_table([str(exp)])
    column = [c for c in df.columns if c.startswith("AutoAttack 8/255")]
    info = json.loads((exp / "model_info.json").read_text())
    assert df[column[0]].iloc[0] == pytest.approx(float(info["autoattack_acc"]))
    assert experiments.load_experiment(str(exp)).model_info["eps"] == "8/255"
    # a card alone (no strong CSV) still fills the cell; a card of another run is refused
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("params.txt", "attack_results_ext.csv", "eval_summary.json"):
        (alone / name).write_bytes((exp / name).read_bytes())
    (alone / "model_info.json").write_text(json.dumps({**info, "autoattack_acc": "12.50"}))
    assert tables.experiment_table([str(alone)])[column[0]].iloc[0] == 12.5
    (exp / "attack_results_strong.csv").rename(tmp_path / "strong.csv")
    try:
        (alone / "attack_results_strong.csv").write_bytes((tmp_path / "strong.csv").read_bytes())
        with pytest.raises(UsageError, match="different runs"):
            experiments.load_experiment(str(alone))
    finally:
        (tmp_path / "strong.csv").rename(exp / "attack_results_strong.csv")


def test_torch_hub_local_gives_the_checkpoints_classifier(exp, folder):
    ckpt = str(exp / "checkpoint.pth")
    hub = torch.hub.load(str(ROOT), "clustr", checkpoint=ckpt, source="local")
    direct = ClusterClassifier.from_checkpoint(ckpt)
    assert isinstance(hub, ClusterClassifier) and not hub.training
    x = to_float(load_dataset("imagefolder", str(folder), "test", workers=0).images)
    with torch.no_grad():
        assert torch.equal(hub(x), direct(x))
    assert torch.equal(hub.predict(x), direct.predict(x))


def test_torch_hub_stand_in(real_subset):
    pytest.importorskip("pyautoattack", reason="the stand-in comes from pyautoattack")
    model = torch.hub.load(str(ROOT), "resnet18_stand_in", source="local")
    test = load_dataset("imagefolder", str(real_subset), "test", workers=0)
    x, y = to_float(test.images[:200]), test.labels[:200]
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (200, 10)
    assert (logits.argmax(1) == y).float().mean() > 0.85  # a trained CIFAR-10 network


def valid_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


@pytest.mark.parametrize("tsne", [False, True])
def test_cluster_picture_and_curves(exp, folder, tmp_path, tsne):
    out = tmp_path / "clusters.png"
    argv = [str(exp / "checkpoint.pth"), "--data-root", str(folder), "--out", str(out),
            "--points", "3", "--iterations", "2", "--workers", "0", "--device", "cpu",
            "--quiet"] + (["--tsne"] if tsne else [])
    assert plots.main(argv) == 0
    width, height = valid_png(out)
    assert width > 300 and height > 300
    assert valid_png(tmp_path / "training_curves.png")  # metrics.csv beside the checkpoint
    report = json.loads((tmp_path / "clusters.json").read_text())
    ckpt = load_checkpoint(str(exp / "checkpoint.pth"))
    centres = np.asarray(report["centres"])
    assert centres.shape == (8, 2)
    assert report["centre_classes"] == ckpt["cluster_classes"].tolist()
    assert len(report["points"]) == 3
    if not tsne:  # the centres drawn are the checkpoint's, placed by the reported PCA
        mean, comps = np.asarray(report["mean"]), np.asarray(report["components"])
        expected = (ckpt["cluster_centers"].numpy() - mean) @ comps.T
        assert np.allclose(centres, expected, atol=1e-4)
        for p in report["points"]:
            assert p["paper PGD"]["xy"] != p["clean"] or p["PGD-CE"]["xy"] != p["clean"]


def test_plots_refuses_bad_inputs_in_one_line(exp, tmp_path, capsys):
    assert plots.main([str(tmp_path / "none.pth")]) == 2
    assert plots.main([str(exp / "checkpoint.pth"), "--metrics", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "none.pth: no such file" in err[0] and "m.csv" in err[1]
