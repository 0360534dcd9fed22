"""The robustness sweep (utils/eval/evaluation.py) and ``--evaluate-ckpt`` end to end.

The attack strengths asserted here follow SPEC section 6: the paper's attack on the bounded
cluster scores is gradient-masked, so it only gets a bound; the linear head and the
adaptive logit must be broken completely.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import main_clustr
from models.classifier import LinearClassifier
from tests.eval_helpers import (
    ROOT_DIR,
    images_of,
    real_backbone,
    real_cluster_classifier,
    real_test_data,
)
from utils.attacks.pgd import EPSILONS, PGD, logit_ce_loss, paper_loss
from utils.attacks.sweep import AttackContext
from utils.eval.evaluation import run_sweep, write_results
from utils.outputs.results import read_csv

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
PRED_HEADER = ["index", "label", "clean_pred", "adv_pred", "linf", "steps"]


@pytest.fixture(scope="module")
def cluster_model(real_subset, real_weights):
    return real_cluster_classifier(str(real_subset), str(real_weights))


@pytest.fixture(scope="module")
def paper_sweep(real_subset, cluster_model):
    data = real_test_data(str(real_subset), 48)
    return run_sweep(AttackContext(cluster_model, data, CPU, 32, seed=3),
                     PGD(iterations=5, restarts=1), 32)


def test_eps0_row_is_the_clean_accuracy_and_accuracy_never_rises(paper_sweep, tmp_path):
    write_results(paper_sweep, str(tmp_path))
    rows = read_csv(str(tmp_path / "attack_results_ext.csv"))
    assert [r["epsilons"] for r in rows] == ["0.0", "2.0", "8.0", "16.0", "25.5"]
    accs = [float(r["test_set_accs"]) for r in rows]
    labels = paper_sweep.labels
    assert accs[0] == 100.0 * int((paper_sweep.clean_pred == labels).sum()) / len(labels)
    assert accs[0] > 80.0  # a real classifier: the comparisons below mean something
    assert all(b <= a for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < accs[0]


def test_paper_sweep_attacks_only_clean_correct_examples(paper_sweep):
    wrong = paper_sweep.clean_pred != paper_sweep.labels
    for r in paper_sweep.per_eps:
        assert torch.equal(r.pred[wrong], paper_sweep.clean_pred[wrong])
        assert (r.linf[wrong] == 0).all() and (r.steps[wrong] == 0).all()
        assert (r.linf <= r.eps / 255 + 1e-6).all() and (r.steps <= 5).all()


@pytest.mark.parametrize("target", ["linear head", "adaptive logit", "paper"])
def test_eps_25_5_and_20_steps_on_the_shared_weights(target, real_subset, real_weights,
                                                     cluster_model):
    """0% for the linear head and for the adaptive logit; the paper's attack on the
    cluster classifier is gradient-masked (SPEC section 6): at most 10%."""
    data = real_test_data(str(real_subset), 64)
    if target == "linear head":
        model, loss_fn = LinearClassifier(real_backbone(str(real_weights))), paper_loss
    elif target == "adaptive logit":
        model, loss_fn = cluster_model, logit_ce_loss
    else:
        model, loss_fn = cluster_model, paper_loss
    result = run_sweep(AttackContext(model, data, CPU, 64, seed=111),
                       PGD(loss_fn=loss_fn, iterations=20, restarts=1), 64, (25.5,))
    assert result.clean_acc > 80.0
    robust = result.per_eps[0].accuracy
    if target == "paper":
        assert robust <= 10.0
    else:
        assert robust == 0.0


# -- the command line ----------------------------------------------------------------------
ORIGINAL_KEYS = ("state_dict", "epoch", "test_acc", "cluster_centers", "cluster_classes",
                 "variance", "K", "L", "normalize_probs")


@pytest.fixture(scope="module")
def original_ckpt(tmp_path_factory, cluster_model):
    """A checkpoint holding only the original code's keys (L = 20, not the default 10)."""
    head = cluster_model.head
    ckpt = {"state_dict": {k: v.clone() for k, v in
                           cluster_model.backbone.state_dict().items()},
            "epoch": 30, "test_acc": 91.5, "cluster_centers": head.centers.clone(),
            "cluster_classes": head.classes.clone(), "variance": head.variance.clone(),
            "K": 2, "L": 20, "normalize_probs": True}
    assert tuple(ckpt) == ORIGINAL_KEYS
    path = tmp_path_factory.mktemp("orig") / "checkpoint.pth"
    torch.save(ckpt, path)
    return path


def eval_argv(out, ckpt, subset, *extra):
    return ["--checkpoint", str(out), "--evaluate-ckpt", str(ckpt), "--dataset",
            "imagefolder", "--data-root", str(subset), "--test-subset", "20",
            "--iterations", "2", "--restarts", "1", "--workers", "2", "--quiet",
            "--device", "cpu", *extra]  # byte-for-byte comparisons hold on the CPU


def read_predictions(folder) -> dict[str, list[dict]]:
    return {f"{e:g}": read_csv(os.path.join(folder, f"predictions_eps{e:g}.csv"))
            for e in EPSILONS}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, original_ckpt, real_subset):
    """The issue's command, as a user runs it."""
    out = tmp_path_factory.mktemp("ev")
    proc = subprocess.run([sys.executable, "main_clustr.py",
                           *eval_argv(out, original_ckpt, real_subset)], cwd=ROOT_DIR,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, CLUSTR_QUIET="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stdout


def test_original_checkpoint_evaluates_through_the_cli(cli_run):
    out, stdout = cli_run
    with open(out / "attack_results_ext.csv") as f:
        lines = f.read().splitlines()
    assert lines[0] == "epsilons,test_set_accs"
    assert [line.split(",")[0] for line in lines[1:]] == ["0.0", "2.0", "8.0", "16.0", "25.5"]
    accs = [float(line.split(",")[1]) for line in lines[1:]]
    preds = read_predictions(out)
    for (eps, rows), acc in zip(preds.items(), accs[1:]):
        assert list(rows[0]) == PRED_HEADER and len(rows) == 20
        assert acc == 100.0 * sum(r["adv_pred"] == r["label"] for r in rows) / 20
        assert accs[0] == 100.0 * sum(r["clean_pred"] == r["label"] for r in rows) / 20
        assert all(float(r["linf"]) <= float(eps) / 255 + 1e-6 for r in rows)
        assert all(0 <= int(r["steps"]) <= 2 for r in rows)
    assert accs[0] >= 70.0 and accs[-1] < accs[0]
    with open(out / "robustness.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["classifier"] == "clusters"
    assert summary["L"] == 20 and summary["normalize_probs"] is True  # the checkpoint's
    assert summary["test_images"] == 20 and summary["iterations"] == 2
    assert summary["clean_acc"] == accs[0]
    assert "L 20 (from the checkpoint)" in stdout


def test_same_seed_same_files_and_batch_size_changes_nothing(cli_run, original_ckpt,
                                                              real_subset, tmp_path):
    first, _ = cli_run
    again, small = tmp_path / "again", tmp_path / "small"
    assert main_clustr.main(eval_argv(again, original_ckpt, real_subset)) == 0
    assert main_clustr.main(eval_argv(small, original_ckpt, real_subset,
                                      "--test-batch", "7")) == 0
    for name in ["attack_results_ext.csv"] + [f"predictions_eps{e:g}.csv" for e in EPSILONS]:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    # another batch size: the same random start per example, so the same per-example
    # results up to floating-point differences (SPEC section 6: one in a thousand)
    a, b = read_predictions(first), read_predictions(small)
    rows = sum(len(v) for v in a.values())
    differ = sum(ra != rb for e in a for ra, rb in zip(a[e], b[e]))
    assert differ <= math.ceil(rows / 1000)


def test_explicit_L_and_not_normalize_win_over_the_checkpoint(original_ckpt, real_subset,
                                                              tmp_path):
    out = tmp_path / "flags"
    argv = eval_argv(out, original_ckpt, real_subset, "--L", "5", "--not-normalize")
    argv[argv.index("--test-subset") + 1] = "10"
    argv[argv.index("--iterations") + 1] = "1"
    assert main_clustr.main(argv) == 0
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["L"] == 5 and summary["normalize_probs"] is False
    assert summary["test_images"] == 10
    assert "L: 5" in (out / "params.txt").read_text()


def test_plain_state_dict_is_evaluated_through_its_linear_head(real_weights, real_subset,
                                                               tmp_path):
    sd = torch.load(real_weights, map_location="cpu", weights_only=True)
    path = tmp_path / "plain.pt"
    torch.save({f"model.{k}": v for k, v in sd.items()}, path)
    out = tmp_path / "plain"
    argv = eval_argv(out, path, real_subset)
    argv[argv.index("--iterations") + 1] = "1"
    assert main_clustr.main(argv) == 0
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["classifier"] == "linear head" and "L" not in summary
    data = real_test_data(str(real_subset), 20, seed=111)  # the CLI's subset
    rows = read_csv(str(out / "predictions_eps2.csv"))
    assert [int(r["index"]) for r in rows] == data.indices.tolist()
    direct = LinearClassifier(real_backbone(str(real_weights))).predict(images_of(data))
    assert [int(r["clean_pred"]) for r in rows] == direct.tolist()
    assert summary["clean_acc"] > 80.0


def test_some_but_not_all_cluster_keys_exit_2(real_weights, real_subset, tmp_path, capsys):
    sd = torch.load(real_weights, map_location="cpu", weights_only=True)
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": sd, "cluster_centers": torch.zeros(20, 512),
                "variance": torch.ones(20)}, path)
    out = tmp_path / "partial"
    assert main_clustr.main(eval_argv(out, path, real_subset)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "cluster_classes" in err[0]
    assert not (out / "attack_results_ext.csv").exists()


def test_checkpoint_and_data_set_with_different_classes_exit_2(original_ckpt, tiny_folder,
                                                               tmp_path, capsys):
    argv = eval_argv(tmp_path / "mismatch", original_ckpt, tiny_folder)
    argv[argv.index("--test-subset") + 1] = "6"
    assert main_clustr.main(argv) == 2
    assert "classifies 10 classes" in capsys.readouterr().err


def test_attack_batch_changes_no_result_file(original_ckpt, real_subset, tmp_path):
    """The paper's sweep and the strong PGD attacks at two --attack-batch values (and a
    --test-batch that differs from both): the same files, byte for byte. Only the strong
    table's timing column may differ."""
    outs = []
    for batch in ("5", "16"):  # the strong attacks: batches of 5, 5, 2 against one of 12
        out = tmp_path / f"b{batch}"
        assert main_clustr.main(eval_argv(out, original_ckpt, real_subset, "--device", "cpu",
                                          "--strong", "--strong-subset", "12",
                                          "--attack-batch", batch, "--test-batch", "8")) == 0
        outs.append(out)
        summary = json.loads((out / "eval_summary.json").read_text())
        assert summary["attack_batch"] == int(batch)
    a, b = outs
    for name in ["attack_results_ext.csv"] + [f"predictions_eps{e:g}.csv" for e in EPSILONS]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    strong = [[{k: v for k, v in row.items() if k != "seconds"}
               for row in read_csv(str(out / "attack_results_strong.csv"))] for out in outs]
    assert strong[0] == strong[1] and len(strong[0]) == 1 + 4 * 4
    diag = [json.loads((out / "diagnostics.json").read_text()) for out in outs]
    assert diag[0]["paper_vs_strongest"] == diag[1]["paper_vs_strongest"]
    assert diag[0]["warnings"] == diag[1]["warnings"]


@pytest.mark.parametrize("mode", [None, "normalized", "raw"])
def test_baseline_input_feeds_a_bare_state_dict_raw_or_normalised(mode, tmp_path):
    """The original feeds a bare state_dict (TRADES-style) raw [0, 1] images; this project
    normalises by default and feeds them raw with --baseline-input raw."""
    from models.resnet import ResNet18
    from utils.eval.evaluation import EvalConfig, attacked_setup, load_eval_model

    torch.manual_seed(0)
    net = ResNet18(10).eval()  # normalises with CIFAR's mean and std
    raw = ResNet18(10, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).eval()  # no normalisation
    raw.load_state_dict(net.state_dict())
    path = tmp_path / "bare.pt"
    torch.save(net.state_dict(), path)
    model = load_eval_model(EvalConfig(dataset="cifar10", baseline_input=mode), str(path))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = (raw if mode == "raw" else net).classify(x)
        assert torch.allclose(model(x), expected, atol=1e-5)
        assert not torch.allclose(net.classify(x), raw.classify(x), atol=1e-3)
    assert attacked_setup(model)["baseline_input"] == ("raw" if mode == "raw" else "normalized")
