"""Use from Python: ClusterClassifier.from_checkpoint, the README session, the inspector."""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
import torch

import main_clustr
from base.io import load_checkpoint
from datasets.data import balanced_subset, load_dataset, to_float
from models import ClusterClassifier, ClusterHead, ResNet18
from models.checkpoint import load_weights
from utils import inspect_ckpt
from utils.train.clustering import KMeansSettings, fit_clusters
from utils.train.embeddings import compute_embeddings

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
ORIGINAL_KEYS = ("state_dict", "epoch", "test_acc", "cluster_centers", "cluster_classes",
                 "variance", "K", "L", "normalize_probs")


# -- checkpoints ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def readme_layout(tmp_path_factory, tiny_folder) -> Path:
    """A folder laid out as the README assumes: run/expA/checkpoint.pth, written by the CLI
    on tiny images, and run/DIR (here: the tiny image folder)."""
    root = tmp_path_factory.mktemp("readme")
    (root / "run").mkdir()
    (root / "run" / "DIR").symlink_to(tiny_folder)
    rc = main_clustr.main([
        "--checkpoint", str(root / "run" / "expA"), "--dataset", "imagefolder",
        "--data-root", str(tiny_folder), "--epochs", "1", "--k", "2", "--m", "2", "--d", "36",
        "--L", "4", "--test-subset", "3", "--iterations", "1", "--restarts", "1",
        "--workers", "0", "--quiet", "--device", "cpu", "--seed", "0"])  # one Magnet step
    assert rc == 0
    return root


@pytest.fixture(scope="module")
def project_ckpt(readme_layout) -> Path:
    return readme_layout / "run" / "expA" / "checkpoint.pth"


@pytest.fixture(scope="module")
def real_test(real_subset):
    return load_dataset("imagefolder", str(real_subset), "test", workers=2)


@pytest.fixture(scope="module")
def original_ckpt(tmp_path_factory, real_subset, real_weights) -> Path:
    """A checkpoint with only the original code's keys, as it writes them: the real CIFAR-10
    ResNet18, k-means on 200 real training images, epoch counted from 0, sigma^2 an
    expanded scalar."""
    backbone = ResNet18(10)
    load_weights(backbone, str(real_weights))
    train = balanced_subset(load_dataset("imagefolder", str(real_subset), "train", workers=2),
                            200, 0)
    emb = compute_embeddings(backbone, train.images, 100, CPU)
    clusters = fit_clusters(emb, train.labels, 10, KMeansSettings(2, 1, 20, 111))
    ckpt = {"state_dict": backbone.state_dict(), "epoch": 29, "test_acc": 90.0,
            "cluster_centers": clusters.centers, "cluster_classes": clusters.classes,
            "variance": clusters.variance[:1].expand(20), "K": 2, "L": 20,
            "normalize_probs": True}
    path = tmp_path_factory.mktemp("original") / "checkpoint.pth"
    torch.save(ckpt, path)
    return path


# -- the classifier ------------------------------------------------------------------------
@pytest.mark.slow
def test_original_checkpoint_predicts_what_the_cli_reports(original_ckpt, real_subset,
                                                           real_test, tmp_path):
    assert set(load_checkpoint(str(original_ckpt))) == set(ORIGINAL_KEYS)
    out = tmp_path / "eval"
    rc = main_clustr.main(["--checkpoint", str(out), "--evaluate-ckpt", str(original_ckpt),
                           "--dataset", "imagefolder", "--data-root", str(real_subset),
                           "--test-subset", "10", "--iterations", "1", "--restarts", "1",
                           "--workers", "2", "--quiet", "--device", "cpu"])
    assert rc == 0
    with open(out / "predictions_eps2.csv") as f:
        rows = list(csv.DictReader(f))
    index = torch.tensor([int(r["index"]) for r in rows])
    cli_pred = torch.tensor([int(r["clean_pred"]) for r in rows])

    model = ClusterClassifier.from_checkpoint(str(original_ckpt))
    pred = model.predict(to_float(real_test.images[index]))
    assert torch.equal(pred, cli_pred)
    assert (pred == real_test.labels[index]).float().mean() >= 0.8  # a working classifier


def test_logit_argmax_is_the_paper_argmax_and_every_logit_is_finite(original_ckpt, real_test):
    model = ClusterClassifier.from_checkpoint(str(original_ckpt))
    noise = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = torch.cat([to_float(real_test.images[:32]), noise])
    with torch.no_grad():
        logits, scores, emb = model(x), model.paper_scores(x), model.embed(x)
    assert logits.shape == scores.shape == (40, 10)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits.argmax(1), scores.argmax(1))
    assert torch.equal(model.predict(x), scores.argmax(1))
    # with L below C*K most classes have no counted cluster: still finite, same arg-max
    assert ClusterClassifier.from_checkpoint(str(original_ckpt), L=3).head.L == 3
    model.head.L = 3
    logits, scores = model.head.logits(emb), model.head.paper_scores(emb)
    assert ((scores > 0).sum(1) <= 3).all() and (scores == 0).any()
    assert torch.isfinite(logits).all()
    assert torch.equal(logits.argmax(1), scores.argmax(1))


def test_logits_stay_finite_with_gradients_far_from_every_cluster():
    """Far away the paper's scores all underflow to 0 (no gradient: the masking); the
    logits keep a finite value and a finite, non-zero gradient for every class."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(10 * 2, 512, generator=gen)
    head = ClusterHead(centers, torch.arange(10).repeat_interleave(2), torch.full((20,), 4.0),
                       10, L=3)  # L below C*K: 7 classes have no counted cluster
    emb = (100 * torch.randn(8, 512, generator=gen)).requires_grad_(True)
    assert (head.paper_scores(emb) == 0).all()
    logits = head.logits(emb)
    assert torch.isfinite(logits).all()
    for c in range(10):
        grad, = torch.autograd.grad(logits[:, c].sum(), emb, retain_graph=True)
        assert torch.isfinite(grad).all() and (grad.abs().sum(1) > 0).all()


def test_from_checkpoint_is_in_eval_mode_and_to_moves_everything(project_ckpt):
    model = ClusterClassifier.from_checkpoint(str(project_ckpt))
    assert not model.training and not any(m.training for m in model.modules())
    assert model.class_names == ["alpha", "beta", "gamma"]
    buffers = dict(model.named_buffers())
    for name in ("head.centers", "head.classes", "head.variance", "backbone.mean",
                 "backbone.std"):
        assert name in buffers
    model.to("meta")  # a device every machine has: nothing may stay behind on the CPU
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    moved = ClusterClassifier.from_checkpoint(str(project_ckpt), map_location="meta")
    assert moved.head.centers.device.type == "meta"


@pytest.mark.slow
def test_autoattack_apgd_ce_runs_on_the_module_unchanged(original_ckpt, real_test):
    aa = pytest.importorskip("pyautoattack", reason="pyautoattack not installed "
                             "(pip install pyautoattack==0.2.0)")
    model = ClusterClassifier.from_checkpoint(str(original_ckpt))
    x_all, y_all = to_float(real_test.images[:16]), real_test.labels[:16]
    correct = model.predict(x_all) == y_all
    x, y = x_all[correct][:8], y_all[correct][:8]
    attack = aa.AutoAttack(model, norm="Linf", eps=8 / 255, version="custom",
                           attacks=["apgd-ce"], seed=0)
    attack.apgd.n_iter, attack.apgd.n_restarts = 5, 1
    x_adv, y_adv = attack.run_standard_evaluation(x, y, batch_size=8)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert torch.equal(model(x_adv).argmax(1), y_adv)
    # the logits give APGD a gradient: this non-robust network breaks on most points
    assert (y_adv == y).float().mean() <= 0.25
    assert all(p.grad is None for p in model.parameters())


# -- the README ----------------------------------------------------------------------------
def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_session_runs_as_written(readme_layout, monkeypatch, capsys):
    pytest.importorskip("pyautoattack", reason="pyautoattack not installed "
                        "(pip install pyautoattack==0.2.0)")
    monkeypatch.chdir(readme_layout / "run")
    exec(compile(readme_python_block(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"clean accuracy: [0-9.]+\n", out)
    assert re.search(r"APGD-CE accuracy: [0-9.]+\n", out)


def test_docs_evaluation_session_runs_as_written(readme_layout, monkeypatch):
    text = (ROOT / "docs" / "evaluation.md").read_text()
    section = text[text.index("## The evaluation from Python"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(readme_layout / "run")
    exec(compile(block, "docs/evaluation.md", "exec"), {})
    out = readme_layout / "run" / "expA_eval"
    for name in ("attack_results_ext.csv", "attack_results_strong.csv", "diagnostics.json"):
        assert (out / name).is_file(), name


# -- set-up files --------------------------------------------------------------------------
def test_one_environment_file_with_the_pinned_requirements():
    """utils/environment.yml (the seed's path) is a link to the one environment.yml, whose pip
    packages are requirements.txt's pins, one for one."""
    link = ROOT / "utils" / "environment.yml"
    assert link.is_symlink() and link.resolve() == (ROOT / "environment.yml").resolve()
    env = (ROOT / "environment.yml").read_text()
    pip = re.findall(r"(?m)^\s+- (\S+==\S+)$", env)
    pins = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert pip == pins and "-r " not in env


# -- the inspector -------------------------------------------------------------------------
def _inspect(path, capsys) -> tuple[int, str, str]:
    rc = inspect_ckpt.main([str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def _field(out: str, label: str) -> str:
    """A field's text, its wrapped continuation lines joined."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(label))
    text = [lines[start][inspect_ckpt.LABEL_WIDTH:]]
    for line in lines[start + 1:]:
        if line[:inspect_ckpt.LABEL_WIDTH].strip():
            break
        text.append(line.strip())
    return " ".join(text)


def test_inspector_on_a_checkpoint_of_this_project(project_ckpt, capsys):
    ckpt = load_checkpoint(str(project_ckpt))
    rc, out, err = _inspect(project_ckpt, capsys)
    assert rc == 0 and err == ""
    assert "this project" in _field(out, "format")
    assert _field(out, "epoch") == "0 (counted from 0: 1 epoch(s) done)"
    assert _field(out, "test accuracy").startswith(f"{ckpt['test_acc']:.2f}%")
    assert _field(out, "data set") == "imagefolder"
    assert _field(out, "classes") == "3: alpha, beta, gamma"
    assert _field(out, "clusters").startswith("K 2 per class, 6 in all, 512-d")
    assert "L = 4 nearest of 6" in _field(out, "inference")
    assert f"{ckpt['variance'][0].item():.6g}" in _field(out, "sigma^2")
    sizes = ckpt["cluster_sizes"]
    assert int(sizes.sum()) == 3 * 24  # every training image counted once
    expected = " | ".join(f"{name} {sizes[2 * c]}+{sizes[2 * c + 1]}"
                          for c, name in enumerate(("alpha", "beta", "gamma")))
    assert _field(out, "cluster sizes").startswith(expected)
    assert "epochs: 1 | " in _field(out, "training args")
    n = sum(p.numel() for p in ResNet18(3).parameters())
    assert _field(out, "parameters").startswith(f"{n:,} in the ResNet18")


def test_inspector_on_a_checkpoint_of_the_original_code(project_ckpt, tmp_path, capsys):
    ckpt = load_checkpoint(str(project_ckpt))
    path = tmp_path / "original.pth"
    torch.save({k: ckpt[k] for k in ORIGINAL_KEYS}, path)
    rc, out, err = _inspect(path, capsys)
    assert rc == 0 and err == ""
    assert "original" in _field(out, "format")
    assert _field(out, "classes") == "3 (names not recorded)"
    assert _field(out, "cluster sizes") == "not recorded"
    assert _field(out, "training args") == "not recorded"


def _one_line_exit_2(path, capsys) -> str:
    rc, out, err = _inspect(path, capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_inspector_on_a_plain_state_dict(project_ckpt, tmp_path, capsys):
    path = tmp_path / "resnet18.pt"
    torch.save(load_checkpoint(str(project_ckpt))["state_dict"], path)
    err = _one_line_exit_2(path, capsys)
    assert "plain ResNet18 state_dict" in err and "--pretrained-path" in err


def test_inspector_on_a_truncated_file(project_ckpt, tmp_path, capsys):
    path = tmp_path / "truncated.pth"
    path.write_bytes(project_ckpt.read_bytes()[: os.path.getsize(project_ckpt) // 2])
    err = _one_line_exit_2(path, capsys)
    assert "truncated or corrupt" in err


def test_inspector_on_files_that_are_not_checkpoints(project_ckpt, tmp_path, capsys):
    ckpt = load_checkpoint(str(project_ckpt))
    partial = {k: v for k, v in ckpt.items() if k != "variance"}
    cases = {"partial.pth": partial, "other.pth": {"weights": torch.ones(3)}}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    for name in (*cases, "notes.txt", "missing.pth"):
        _one_line_exit_2(tmp_path / name, capsys)
