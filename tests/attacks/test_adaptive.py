"""Adaptive attacks, AutoAttack, gradient-masking diagnostics and the strong-evaluation CLI."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn as nn

import main_clustr
from base.errors import UsageError
from datasets.data import ImageData, to_float
from models.classifier import ClusterClassifier
from models.cluster_head import ClusterHead
from tests.eval_helpers import pgd, quick_autoattack, real_cluster_classifier, real_test_data
from utils.attacks.adaptive import adaptive_attacks, dlr_loss, logit_dlr_loss, run_autoattack
from utils.attacks.autoattack_backend import HINT as AUTOATTACK_HINT
from utils.attacks.gradient_masking import gradient_summary, robustness_gaps
from utils.attacks.pgd import PGD, logit_ce_loss, paper_loss, random_start, start_keys
from utils.attacks.sweep import AttackContext, Outcome, predictions, sweep
from utils.eval.evaluation import run_sweep
from utils.eval.strong_evaluation import worst_case
from utils.outputs.results import read_csv
from utils.train_setting import parse_args

CPU = torch.device("cpu")


# -- losses and the restart rule ---------------------------------------------------------------
def test_dlr_loss_matches_its_definition():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 10, generator=gen) * 3
    y = torch.randint(0, 10, (50,), generator=gen)
    loss = dlr_loss(logits, y)
    for z, label, value in zip(logits, y, loss):
        top = sorted(z.tolist(), reverse=True)
        best_other = max(v for i, v in enumerate(z.tolist()) if i != label)
        expected = -(z[label].item() - best_other) / (top[0] - top[2] + 1e-12)
        assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        # positive exactly when the example is misclassified
        assert (value.item() > 0) == (z.argmax().item() != label.item())
    two = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    assert dlr_loss(two, torch.tensor([0, 0])).tolist() == [-1.5, 1.0]  # margin for C = 2


class SmallNet(nn.Module):
    """A float64 CNN: per-example results cannot depend on the batch it is in."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(3)
            self.net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(6 * 8 * 8, 5)).double()

    def forward(self, x):
        return self.net(x)

    def paper_scores(self, x):
        return self(x)


def _pixel_mean_loss(model, x, y):
    """A loss blind to the labels: keeping the highest-loss restart (the paper's rule) can
    then keep a restart that did not fool the model over one that did."""
    return x.flatten(1).mean(1), model(x)


def test_fooled_wins_is_the_and_of_the_single_restarts():
    """A restart attacks only the still-robust examples, so an example is robust after R
    restarts exactly when each single restart, from its own starts, failed to fool it."""
    model = SmallNet().eval()
    x = torch.rand(24, 3, 8, 8, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        y = model(x).argmax(1)  # every example starts correctly classified
    idx = torch.arange(100, 124)
    eps, step, iterations, restarts = 16 / 255, 4 / 255, 2, 3
    attacked = []

    def keys(r, rows):
        attacked.append(rows.clone())
        return start_keys(5, 1, r, idx[rows])

    res = pgd(model, x, y, eps, step, iterations, restarts, keys, _pixel_mean_loss,
              fooled_wins=True)
    singles = [pgd(model, x, y, eps, step, iterations, 1,
                   lambda _r, r=r: start_keys(5, 1, r, idx), _pixel_mean_loss).correct
               for r in range(restarts)]
    both = singles[0] & singles[1] & singles[2]
    assert torch.equal(res.correct, both)
    # restart r attacked exactly the examples that survived restarts 0 .. r-1
    survived = torch.ones(24, dtype=torch.bool)
    for r, rows in enumerate(attacked):
        assert torch.equal(rows, survived.nonzero().flatten()), r
        survived &= singles[r]
    # this setting tells the rules apart: the paper's keeps more examples "robust"
    paper_rule = pgd(model, x, y, eps, step, iterations, restarts,
                     lambda r: start_keys(5, 1, r, idx), _pixel_mean_loss).correct
    assert paper_rule.sum() > both.sum()
    # kept perturbations: inside the ball and the image range; a fooled one really fools
    assert res.delta.abs().max() <= eps + 1e-9
    assert ((x + res.delta) >= 0).all() and ((x + res.delta) <= 1).all()
    with torch.no_grad():
        assert torch.equal(model(x + res.delta).argmax(1) == y, res.correct)


# -- on the real cluster classifier ------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster_model(real_subset, real_weights):
    """The shared network with k-means clusters (K = 2, L = 20) of 200 training images."""
    return real_cluster_classifier(str(real_subset), str(real_weights))


@pytest.fixture(scope="module")
def test_images(real_subset) -> ImageData:
    return real_test_data(str(real_subset), 20, 111)


def test_logit_argmax_is_the_cluster_prediction(cluster_model, test_images):
    x = to_float(test_images.images)
    start = x + random_start(x, 8 / 255, start_keys(0, 0, 0, test_images.indices))
    for inputs in (x, start):
        with torch.no_grad():
            assert torch.equal(cluster_model(inputs).argmax(1), cluster_model.predict(inputs))
    assert (cluster_model.predict(x) == test_images.labels).float().mean() >= 0.7


@pytest.mark.slow
def test_adaptive_attack_is_no_weaker_than_the_papers(cluster_model, test_images):
    """Same images, seed and random starts: the adaptive attacks leave at most as many
    examples robust as the paper's PGD (which masks gradients on this model)."""
    eps = (2.0, 8.0)
    ctx = AttackContext(cluster_model, test_images, CPU, 20, seed=111)
    paper = run_sweep(ctx, PGD(iterations=5, restarts=1), 20, eps)
    clean = predictions(cluster_model, test_images.images, 20, CPU, logits=True)
    for attack in adaptive_attacks(5, 1):
        for o, p in zip(sweep(ctx, attack, eps, clean), paper.per_eps):
            assert o.accuracy <= p.accuracy, (attack.name, o.eps)
    assert o.accuracy < paper.clean_acc  # the attack did something


def test_autoattack_runs_end_to_end(cluster_model, test_images, monkeypatch):
    pytest.importorskip("pyautoattack", reason="pyautoattack not installed "
                        "(pip install pyautoattack==0.2.0)")
    quick_autoattack(monkeypatch, ["apgd-ce"], 3)
    few = test_images.take(slice(4))
    out = run_autoattack(AttackContext(cluster_model, few, CPU, 4, seed=0), 8.0)
    clean = cluster_model.predict(to_float(few.images)) == few.labels
    assert out.attack == "autoattack" and out.eps == 8.0 and out.robust.shape == (4,)
    assert not (out.robust & ~clean).any()  # a misclassified image is never robust
    assert out.accuracy < 100.0 * clean.float().mean().item()  # APGD-CE breaks something


def test_missing_autoattack_gives_the_hint(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import fails
    data = ImageData(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1]),
                     [str(i) for i in range(10)])
    with pytest.raises(UsageError, match="pip install pyautoattack"):
        run_autoattack(AttackContext(SmallNet(), data, CPU, 2, seed=0), 8.0)
    with pytest.raises(SystemExit) as exc:
        parse_args(["--checkpoint", str(tmp_path / "x"), "--autoattack"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert AUTOATTACK_HINT in err and "\n" not in err


def test_standard_autoattack_refuses_three_classes():
    pytest.importorskip("pyautoattack", reason="pyautoattack not installed")
    data = ImageData(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1]),
                     ["a", "b", "c"])
    with pytest.raises(UsageError, match="at least 4 classes"):
        run_autoattack(AttackContext(SmallNet(), data, CPU, 2, seed=0), 8.0)


# -- diagnostics -------------------------------------------------------------------------------
class Projection(nn.Module):
    """Embedding = mean pixel * (10, 14): 0 for black images, far from 0 for white ones."""

    def forward(self, x):
        return x.flatten(1).mean(1, keepdim=True) * torch.tensor([[10.0, 14.0]])  # (N, 2)


def test_zero_gradient_fractions_on_a_constructed_case():
    """White images embed at d^2/2sigma^2 > 130 from both clusters: their scores underflow
    to exactly 0, so the paper's loss has exactly zero input gradient there, while the
    logit losses still have one. Black images have gradients under every loss."""
    head = ClusterHead(torch.tensor([[0.1, 0.2], [0.2, 0.1]]), torch.tensor([0, 1]),
                       torch.ones(2), num_classes=2, L=2)
    model = ClusterClassifier(Projection(), head)
    images = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    images[5:] = 255  # 3 of 8 far away
    data = ImageData(images, torch.tensor([0, 1] * 4), ["a", "b"])
    losses = {"paper": paper_loss, "pgd-ce": logit_ce_loss, "pgd-dlr": logit_dlr_loss}
    summary = gradient_summary(model, data, losses, batch=3, device=CPU, start_eps=8.0)
    assert set(summary) == {"clean", "random start 8/255"}
    for point in summary.values():
        assert point["paper"]["zero_fraction"] == pytest.approx(3 / 8)
        assert point["pgd-ce"]["zero_fraction"] == 0.0
        assert point["pgd-dlr"]["zero_fraction"] == 0.0


def test_gap_warnings_and_worst_case():
    t, f = True, False
    paper = Outcome("paper-pgd", 8.0, torch.tensor([t, t, t, f]))
    worst = Outcome("worst-case", 8.0, torch.tensor([t, f, f, f]))
    strong = [paper, Outcome("pgd-ce", 8.0, worst.robust), worst]
    rows, warnings = robustness_gaps(strong, threshold=5.0)
    assert rows[0]["paper_pgd"] == 75.0 and rows[0]["strongest"] == 25.0
    assert rows[0]["gap"] == 50.0 and rows[0]["robust_to_paper_only"] == 2
    assert rows[0]["strongest_attack"] == "worst case of paper-pgd, pgd-ce"
    assert len(warnings) == 1 and "8/255" in warnings[0]
    assert robustness_gaps(strong, threshold=60.0)[1] == []
    same = Outcome("worst-case", 8.0, paper.robust)
    assert robustness_gaps([paper, same], 0.0)[1] == []

    clean = torch.tensor([t, t, t, f])
    outcomes = [Outcome("paper-pgd", 8.0, torch.tensor([t, t, f, t])),
                Outcome("pgd-ce", 8.0, torch.tensor([t, f, t, t])),
                Outcome("pgd-ce", 2.0, torch.tensor([t, t, t, t]))]
    worst = {o.eps: o.robust.tolist() for o in worst_case(outcomes, clean)}
    assert worst == {2.0: [t, t, t, f], 8.0: [t, f, f, f]}


# -- the CLI and the report's commands ---------------------------------------------------------
@pytest.mark.slow
def test_cli_strong_writes_table_diagnostics_and_plot(tiny_folder, tmp_path):
    out = tmp_path / "exp"
    rc = main_clustr.main(["--checkpoint", str(out), "--dataset", "imagefolder",
                           "--data-root", str(tiny_folder), "--epochs", "1", "--k", "2",
                           "--m", "3", "--d", "4", "--L", "4", "--iterations", "1",
                           "--restarts", "1", "--test-subset", "9", "--strong",
                           "--strong-subset", "3", "--quiet", "--workers", "0"])
    assert rc == 0
    rows = read_csv(out / "attack_results_strong.csv")
    assert list(rows[0]) == ["epsilon", "attack", "robust_accuracy", "examples", "seconds"]
    got = {(r["epsilon"], r["attack"]) for r in rows}
    for eps in ("2", "8", "16", "25.5"):
        assert {(eps, a) for a in ("paper-pgd", "pgd-ce", "pgd-dlr", "worst-case")} <= got
    assert ("0", "clean") in got and all(r["examples"] == "3" for r in rows)
    by = {(r["epsilon"], r["attack"]): float(r["robust_accuracy"]) for r in rows}
    for eps in ("2", "8", "16", "25.5"):
        assert by[(eps, "worst-case")] <= min(by[(eps, a)] for a in
                                              ("paper-pgd", "pgd-ce", "pgd-dlr"))
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["examples"] == 3 and len(diag["image_indices"]) == 3
    assert set(diag["input_gradients"]["clean"]) == {"paper", "pgd-ce", "pgd-dlr"}
    assert len(diag["paper_vs_strongest"]) == 4
    assert (out / "robustness.png").stat().st_size > 0
    assert (out / "attack_results_ext.csv").exists()


def test_strong_only_flags_need_an_attack(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--checkpoint", str(tmp_path / "x"), "--strong-subset", "10"])
    assert exc.value.code == 2 and "--strong" in capsys.readouterr().err
