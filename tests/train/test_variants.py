"""ClusTR's training variants: QTRADES and its options, cross-entropy, free training, metrics.csv.

The unit tests run the real trainer on tiny random data (3 classes) with a small embedding
network in place of the ResNet18 (the trainer only needs ``model(x) -> (N, D)``), so each
costs about a second on a CPU; the CLI test runs the real command with the ResNet18.
"""
from __future__ import annotations

import csv

import pytest
import torch

from datasets.data import ImageData
from models.resnet import CIFAR_MEAN, CIFAR_STD
from utils.train.clustering import KMeansSettings, fit_clusters
from utils.train.consistency import RADIUS as EPS
from utils.train.consistency import (
    TRADES_STEP,
    TRADES_STEPS,
    ExtraTerms,
    class_probabilities,
    maximise,
    soft_cross_entropy,
)
from utils.train.free_adversarial import FreePerturbation
from utils.train.magnet_loss import magnet_loss
from utils.train.training import ClusTRTrainer, TrainConfig

CPU = torch.device("cpu")


class TinyEmbedder(torch.nn.Module):
    """Two strided convolutions with BatchNorm (so train and eval mode differ), (N, 16)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten())

    def forward(self, x):
        return self.net(x)


def tiny_data(n_per_class: int, seed: int) -> ImageData:
    """3 classes with a dominant channel each, two brightness modes per class (so K = 2
    clusters are natural), and pure black and white pixels."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c in range(3):
        img = torch.randint(0, 60, (n_per_class, 3, 32, 32), generator=gen, dtype=torch.uint8)
        img[:, c] += 120
        img[n_per_class // 2:] += 60
        img[:, :, 0, 0] = 0      # image-range edges, to exercise the [0, 1] clipping
        img[:, :, 0, 1] = 255
        images.append(img)
        labels.append(torch.full((n_per_class,), c))
    return ImageData(torch.cat(images), torch.cat(labels), ["a", "b", "c"])


def make_trainer(**variant) -> ClusTRTrainer:
    torch.manual_seed(0)
    model = TinyEmbedder()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    cfg = TrainConfig(dataset="imagefolder", K=2, m=3, d=4, L=6, seed=1, **variant)
    trainer = ClusTRTrainer(model, optimizer, tiny_data(8, 0), tiny_data(2, 1), cfg, CPU)
    trainer.check_batch_shape()
    trainer.refresh_clusters()
    return trainer


def a_batch(trainer: ClusTRTrainer):
    indices, cluster_ids = trainer.sampler.sample(trainer.generator)
    x = trainer.train.images[indices].float() / 255
    return x, cluster_ids, trainer.head()


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# -- lambda = 0 is plain ClusTR -----------------------------------------------------------------
def test_lambda_zero_gives_exactly_the_plain_magnet_loss():
    trainer = make_trainer(consistency_lambda=0.0, xent_lambda=0.0)
    trainer.model.eval()  # deterministic forward for the comparison
    x, ids, head = a_batch(trainer)
    terms, per_example = trainer.batch_terms(x, ids, head.classes, head)
    assert set(terms) == {"magnet"}
    plain, _ = magnet_loss(trainer.model(x), ids, head.classes, trainer.cfg.alpha)
    assert torch.equal(sum(terms.values()), plain.mean())
    assert torch.equal(per_example, plain)


def test_lambda_zero_trains_exactly_like_plain_clustr():
    """Option flags without a lambda change nothing: same parameters after an epoch."""
    plain, flagged = make_trainer(), make_trainer(mse_consistency=True, actual_trades=True)
    assert plain.train_epoch() == flagged.train_epoch()
    for a, b in zip(plain.model.parameters(), flagged.model.parameters()):
        assert torch.equal(a, b)


def test_consistency_term_adds_lambda_times_the_divergence():
    """loss = magnet + lambda * CE(p, s(x')): the Magnet term is unchanged, lambda scales."""
    plain = make_trainer()
    plain.model.eval()
    x, ids, head = a_batch(plain)
    magnet = plain.batch_terms(x, ids, head.classes, head)[0]["magnet"]
    values = {}
    for lam in (1.0, 3.0):
        trainer = make_trainer(consistency_lambda=lam)
        trainer.model.eval()
        trainer.generator.manual_seed(5)  # the same random start for both lambdas
        terms, _ = trainer.batch_terms(x, ids, head.classes, head)
        assert torch.equal(terms["magnet"], magnet)
        values[lam] = terms["consistency"]
    assert torch.allclose(values[3.0], 3.0 * values[1.0], rtol=1e-5)
    assert values[1.0] > 0


# -- every variant runs a real step -------------------------------------------------------------
VARIANTS = {
    "qtrades": dict(consistency_lambda=8.0),
    "mse": dict(consistency_lambda=8.0, mse_consistency=True),
    "actual_trades": dict(consistency_lambda=8.0, actual_trades=True),
    "xent": dict(xent_lambda=0.5),
    "free": dict(minibatch_replays=2),
    "qtrades_xent_free": dict(consistency_lambda=2.0, xent_lambda=0.5, minibatch_replays=2),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_runs_a_real_step(name):
    variant = VARIANTS[name]
    trainer = make_trainer(**variant)
    before = params(trainer.model)
    steps = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    components = trainer.train_epoch()
    replays = max(1, variant.get("minibatch_replays", 0))
    assert len(steps) == trainer.sampler.steps_per_epoch() * replays
    free = variant.get("minibatch_replays", 0) > 0  # free replays: the Magnet loss alone
    expected = {"magnet"} | ({"consistency"} if variant.get("consistency_lambda") and not free
                             else set()) \
        | ({"xent"} if variant.get("xent_lambda") and not free else set())
    assert set(components) == expected
    for value in components.values():
        assert value >= 0 and torch.isfinite(torch.tensor(value))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert not trainer.sampler.losses.isnan().all()  # per-sample losses were recorded


# -- the consistency adversary ------------------------------------------------------------------
@pytest.mark.parametrize("option", [{}, {"mse_consistency": True}, {"actual_trades": True}])
def test_adversary_in_ball_and_range_without_parameter_gradients(option):
    trainer = make_trainer(consistency_lambda=1.0, **option)
    model = trainer.model
    model.train()
    x, ids, head = a_batch(trainer)
    emb = model(x)
    x_adv = trainer.extras.adversary(model, head, x, emb, trainer.generator)
    assert model.training  # the caller's mode is restored
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > 0
    # (whether the steps move it depends on the scores' gradient, which vanishes far from
    # the clusters: the gradient masking of the paper's scores; see test_maximise_steps)
    assert all(p.grad is None for p in model.parameters())


def test_maximise_steps_to_the_ball_and_leaves_parameters_alone():
    """With a gradient of constant sign, TRADES's 10 steps of 0.03 reach +eps (or the
    image range), from a start that is projected too."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.BatchNorm2d(2)).train()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    x = torch.rand(4, 3, 8, 8)
    x[:, :, 0, 0] = 1.0
    start = torch.full_like(x, -1.0)  # far outside the ball: projected first
    x_adv = maximise(model, x, lambda xa: model(xa).flatten(1).sum(1), start, TRADES_STEP,
                     TRADES_STEPS)
    expected = (x + EPS).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-6)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_parameter_gradients_are_empty_before_the_training_backward():
    """Inside the real step, after the adversary and before backward, no .grad exists."""
    trainer = make_trainer(consistency_lambda=8.0, actual_trades=True)
    batch_terms, seen = trainer.batch_terms, []

    def checked(*args, **kwargs):
        out = batch_terms(*args, **kwargs)
        seen.append(all(p.grad is None for p in trainer.model.parameters()))
        return out

    trainer.batch_terms = checked
    trainer.train_epoch()
    assert seen and all(seen)


def test_class_probabilities_are_the_normalised_paper_scores():
    trainer = make_trainer()
    head = trainer.head()
    head.L = 3  # some clusters do not count
    emb = trainer.model.eval()(a_batch(trainer)[0]).detach()
    scores = head.paper_scores(emb)
    p = class_probabilities(head, emb)
    assert torch.allclose(p, scores / scores.sum(1, keepdim=True), atol=1e-6)
    far = class_probabilities(head, emb * 1e4)  # every exp underflows: still a distribution
    assert torch.isfinite(far).all() and torch.allclose(far.sum(1), torch.ones(len(emb)))
    assert (soft_cross_entropy(p, scores) >= 0).all()


def test_extra_terms_empty_when_disabled():
    terms = ExtraTerms(TrainConfig(dataset="cifar10")).terms(None, None, None, None, None, None)
    assert terms == {}


# -- free adversarial training ------------------------------------------------------------------
def test_free_delta_persists_across_batches_and_stays_in_the_ball():
    trainer = make_trainer(minibatch_replays=3)
    free = trainer.free
    perturb, step, starts, ends = free.perturb, free.step, [], []

    def record_perturb(x):
        out = perturb(x)
        starts.append((x.clone(), (out - x).detach().clone()))
        return out

    def record_step(x):
        step(x)
        ends.append(free.delta.clone())

    free.perturb, free.step = record_perturb, record_step
    trainer.train_epoch()
    assert len(starts) == trainer.sampler.steps_per_epoch() * 3
    assert starts[0][1].abs().max() == 0  # delta starts at zero
    for (x, used), previous_end in zip(starts[1:], ends[:-1]):
        # each replay (and each new batch) starts from the last delta, made valid for x
        state = torch.zeros_like(x)  # a state shorter than the batch grows with zeros
        state[:min(len(x), len(previous_end))] = previous_end[:len(x)]
        carried = (x + state.clamp(-EPS, EPS)).clamp(0, 1) - x
        assert torch.allclose(used, carried, atol=1e-6)
    for delta in ends:
        assert delta.abs().max() <= EPS + 1e-6
    assert ends[-1].abs().max() > 0
    for x, used in starts:
        assert (x + used).min() >= 0 and (x + used).max() <= 1


def test_free_smaller_batch_uses_the_leading_rows():
    free = FreePerturbation()
    model = torch.nn.Conv2d(3, 1, 3)
    full = torch.rand(6, 3, 8, 8)
    model(free.perturb(full)).sum().backward()
    free.step(full)
    kept = free.delta.clone()
    small = torch.rand(4, 3, 8, 8)
    model(free.perturb(small)).sum().backward()
    free.step(small)
    assert free.delta.shape == kept.shape
    assert torch.equal(free.delta[4:], kept[4:])  # untouched rows wait for a full batch
    assert free.delta.abs().max() <= EPS + 1e-6


# -- metrics.csv, end to end --------------------------------------------------------------------
def test_cli_writes_metrics_csv_and_keeps_log_txt(tiny_folder, tmp_path):
    from main_clustr import main

    out = tmp_path / "exp"
    rc = main(["--checkpoint", str(out), "--dataset", "imagefolder", "--data-root",
               str(tiny_folder), "--k", "1", "--m", "3", "--d", "4", "--L", "3",
               "--epochs", "2", "--iterations", "1", "--restarts", "1", "--workers", "0",
               "--train-subset", "24", "--test-subset", "6",
               "--consistency-lambda", "2", "--xent-lambda", "0.5", "--quiet"])
    assert rc == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == ["epoch", "lr", "magnet", "consistency", "xent", "train_loss",
                             "train_acc", "test_loss", "test_acc", "seconds"]
    for row in rows:
        assert float(row["consistency"]) > 0 and float(row["xent"]) > 0
        assert float(row["magnet"]) >= 0 and float(row["seconds"]) > 0
    log_lines = (out / "log.txt").read_text().splitlines()
    assert log_lines[0] == "Epoch\tLR\tTrain loss\tTrain acc.\tTest loss\tTest acc."
    assert len(log_lines) == 3 and all(len(line.split("\t")) == 6 for line in log_lines)
    log_acc = [float(line.split("\t")[5]) for line in log_lines[1:]]
    assert log_acc == pytest.approx([float(r["test_acc"]) for r in rows], abs=1e-5)


# -- the original's rules, restated as plain loops ----------------------------------------------
# The original (utils/magnet_training.py, utils/magnet_tools.py) attacks *normalised* images
# z = (x - mean) / std, so its eps and steps are per channel in those units.
STD = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
MEAN = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)


def test_actual_trades_step_is_0_03_normalised_units_per_channel():
    """One step on a gradient of constant sign moves every channel c by 0.03 * std_c pixels."""
    trainer = make_trainer(consistency_lambda=1.0, actual_trades=True)
    step = trainer.extras.trades_step
    assert torch.allclose(step.flatten(), 0.03 * torch.tensor(CIFAR_STD))
    x = torch.full((2, 3, 4, 4), 0.5)
    x_adv = maximise(torch.nn.Identity(), x, lambda xa: xa.flatten(1).sum(1),
                     torch.zeros_like(x), step, 1)
    moved = (x_adv - x)[:, :, 0, 0]  # (2, 3)
    assert torch.allclose(moved, (0.03 * STD).view(1, 3).expand(2, 3), atol=1e-7)


def test_actual_trades_start_is_uniform_in_the_ball(monkeypatch):
    """With no step the adversary is its start: uniform in the 8/255 ball, clipped to [0, 1]."""
    import utils.train.consistency as consistency

    monkeypatch.setattr(consistency, "TRADES_STEPS", 0)
    trainer = make_trainer(consistency_lambda=1.0, actual_trades=True)
    x, _, head = a_batch(trainer)
    emb = trainer.model(x)
    gen_copy = torch.Generator().set_state(trainer.generator.get_state())
    start = trainer.extras.adversary(trainer.model, head, x, emb, trainer.generator) - x
    expected = (x + torch.empty(x.shape).uniform_(-EPS, EPS, generator=gen_copy)).clamp(0, 1) - x
    assert torch.allclose(start, expected, atol=1e-7)
    inside = (x > EPS) & (x < 1 - EPS)
    assert start.abs().max() <= EPS + 1e-7
    assert start[inside].abs().mean() == pytest.approx(EPS / 2, rel=0.05)  # uniform, not 0.001 N


def original_trades_adversary(model, head, x, p, u):
    """The original's kl_loss branch in normalised units: start z + u/std clamped to the
    image range, 10 steps z += 0.03 * sign(grad KL), then the ball and the range."""
    std, mean = STD.to(x.dtype), MEAN.to(x.dtype)
    eps_n, lo, hi = EPS / std, (0 - mean) / std, (1 - mean) / std
    z0 = (x - mean) / std
    z = torch.max(torch.min(z0 + u.to(x.dtype) / std, hi), lo)
    for _ in range(10):
        z = z.detach().requires_grad_(True)
        scores = head.paper_scores(model(z * std + mean))
        kl = torch.nn.functional.kl_div(scores.log_softmax(1), p, reduction="sum")
        grad, = torch.autograd.grad(kl, z)
        z = z.detach() + 0.03 * grad.sign()
        noise = torch.max(torch.min(z - z0, eps_n), -eps_n)
        z = torch.max(torch.min(z0 + noise, hi), lo)
    return z * std + mean


def test_actual_trades_adversary_equals_the_original_rule():
    trainer = make_trainer(consistency_lambda=1.0, actual_trades=True)
    model = trainer.model.eval()
    x, _, head = a_batch(trainer)
    emb = model(x).detach()
    gen_copy = torch.Generator().set_state(trainer.generator.get_state())
    ours = trainer.extras.adversary(model, head, x, emb, trainer.generator)
    u = torch.empty(x.shape).uniform_(-EPS, EPS, generator=gen_copy)
    theirs = original_trades_adversary(model, head, x, class_probabilities(head, emb), u)
    assert (ours - x).abs().max() > 2 / 255  # it moved
    # the same point up to float rounding between the two unit systems; a sign step on a
    # gradient within rounding of 0 may differ on another CPU's kernels: at most 0.1% of pixels
    assert ((ours - theirs).abs() > 1e-5).float().mean() < 1e-3


def one_step_trainer(monkeypatch, **variant):
    trainer = make_trainer(**variant)
    monkeypatch.setattr(trainer, "steps_per_epoch", lambda: 1)
    return trainer


def spy_free_training(monkeypatch, trainer):
    """Lists that fill during training: each replay's clean batch x (before delta) and each
    (indices, losses) the sampler records."""
    seen, recorded = [], []
    perturb, record = trainer.free.perturb, trainer.sampler.record_losses
    monkeypatch.setattr(trainer.free, "perturb", lambda x: (seen.append(x.clone()),
                                                              perturb(x))[1])
    monkeypatch.setattr(trainer.sampler, "record_losses", lambda i, v: (
        recorded.append((i.clone(), v.clone())), record(i, v))[1])
    return seen, recorded

def test_free_replays_follow_the_original_rule(monkeypatch):
    """M replays of the Magnet loss alone (the consistency and cross-entropy lambdas are
    ignored, as the original's free path has no such term), delta stepped by eps * sign,
    clipped to the ball and the image range; the sampler gets the losses of one no-grad
    training-mode forward of the UPDATED network on x + the FINAL delta."""
    replays = 3
    variant = dict(minibatch_replays=replays, consistency_lambda=2.0, xent_lambda=0.5)
    trainer = one_step_trainer(monkeypatch, **variant)
    reference = make_trainer(**variant)  # the same initial weights and clusters
    for t in (trainer, reference):  # SGD: parameters linear in the gradients (Adam's first
        t.optimizer = torch.optim.SGD(t.model.parameters(), lr=0.5)  # steps amplify rounding)
    seen, recorded = spy_free_training(monkeypatch, trainer)
    trainer.train_epoch()
    x = seen[0]
    indices, losses = recorded[0]
    ids = reference.sampler.assignments[indices]
    classes = reference.head().classes

    model, opt = reference.model.train(), reference.optimizer
    delta = torch.zeros_like(x)
    for _ in range(replays):
        delta.requires_grad_(True)
        per_example, _ = magnet_loss(model(x + delta), ids, classes, reference.cfg.alpha)
        opt.zero_grad()
        per_example.mean().backward()
        with torch.no_grad():
            delta = (delta + EPS * delta.grad.sign()).clamp(-EPS, EPS)
            delta = torch.max(torch.min(delta, 1 - x), -x)
        opt.step()
    with torch.no_grad():
        expected, _ = magnet_loss(model(x + delta), ids, classes, reference.cfg.alpha)
    assert torch.allclose(losses, expected, atol=1e-5)
    for a, b in zip(trainer.model.parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_free_delta_is_zero_at_each_epochs_first_batch():
    trainer = make_trainer(minibatch_replays=2)
    perturb, first = trainer.free.perturb, []

    def record(x):
        out = perturb(x)
        first.append((out - x).detach().abs().max().item())
        return out

    trainer.free.perturb = record
    per_epoch = trainer.sampler.steps_per_epoch() * 2
    for _ in range(2):
        trainer.train_epoch()
    assert len(first) == 2 * per_epoch
    assert first[0] == 0 and first[per_epoch] == 0  # reset at each epoch's start
    assert max(first[per_epoch - 1:per_epoch]) > 0  # and carried within the epoch


def test_kmeans_centroids_equal_scikit_learns_with_random_state_1():
    """The original: KMeans(n_clusters=K, init='k-means++', random_state=1, n_init=1,
    max_iter=20) per class (CIFAR-10), cluster c*K + i = class c's i-th centroid."""
    from sklearn.cluster import KMeans

    trainer = make_trainer()  # --kmeans-seed default 1
    assert trainer.cfg.kmeans_seed == 1
    emb = trainer.embed(trainer.train.images, 64, "embed")
    trainer.refresh_clusters()
    labels = trainer.train.labels
    for c in range(3):
        km = KMeans(n_clusters=2, init="k-means++", random_state=1, n_init=1,
                    max_iter=20).fit(emb[labels == c].double().numpy())
        assert torch.allclose(trainer.clusters.centers[2 * c:2 * c + 2],
                              torch.from_numpy(km.cluster_centers_).float(), atol=1e-6)
        assert torch.equal(trainer.clusters.assignments[labels == c],
                           torch.from_numpy(km.labels_).long() + 2 * c)


def test_kmeans_seed_is_a_flag_with_default_1():
    from utils.train_setting import parse_args

    assert parse_args(["--checkpoint", "x"]).kmeans_seed == 1
    assert parse_args(["--checkpoint", "x", "--kmeans-seed", "7"]).kmeans_seed == 7


def test_a_cluster_left_with_one_example_takes_the_nearest_of_its_class(caplog):
    """k-means isolates an outlier; the rule (restated here) gives its cluster the example of
    the class nearest to its centroid from a cluster holding more than 2, and warns."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.cat([torch.randn(9, 4, generator=gen), torch.full((1, 4), 50.0),
                     torch.randn(10, 4, generator=gen) + 5])
    labels = torch.tensor([0] * 10 + [1] * 10)
    with caplog.at_level("WARNING", logger="clustr"):
        c = fit_clusters(emb, labels, 2, KMeansSettings(2, 1, 20, 1))
    sizes = torch.bincount(c.assignments, minlength=4)
    assert (sizes >= 2).all()
    assert "fewer than 2 examples" in caplog.text
    lone = int(c.assignments[9])  # the outlier's cluster
    nearest = min(range(9), key=lambda i: float((emb[i] - c.centers[lone]).pow(2).sum()))
    assert sorted((c.assignments == lone).nonzero().flatten().tolist()) == sorted([9, nearest])
    # sigma^2 is computed with the assignments the sampler uses
    d2 = (emb - c.centers[c.assignments]).pow(2).sum(1)
    assert torch.allclose(c.variance, (d2.sum() / 19).expand(4))


def test_an_epoch_whose_refresh_isolates_an_example_finishes(monkeypatch, caplog):
    """The refresh after an epoch's steps meets an outlier: the epoch still ends, with every
    cluster of at least 2 examples for the sampler, and a warning in the log."""
    trainer = make_trainer()
    embed = trainer.embed

    def with_outlier(images, batch, desc):
        emb = embed(images, batch, desc)
        if desc == "embed train":
            emb[0] = emb[0] + 1e3  # far from everything of its class
        return emb

    monkeypatch.setattr(trainer, "embed", with_outlier)
    with caplog.at_level("WARNING", logger="clustr"):
        metrics = trainer.run_epoch()
    assert "fewer than 2 examples" in caplog.text
    assert (torch.bincount(trainer.sampler.assignments, minlength=6) >= 2).all()
    assert metrics.train_acc >= 0
    trainer.sampler.sample(trainer.generator)  # the next epoch can draw its batches


def test_free_delta_survives_a_resume_within_an_epoch_only():
    """A run resumed mid-epoch continues with the saved delta; one resumed at an epoch's
    start begins at zero, as an uninterrupted run does."""
    trainer = make_trainer(minibatch_replays=2)
    trainer.train_epoch()
    saved = trainer.state_dict()
    assert saved["free_delta"].abs().max() > 0
    first = {}
    for start_step in (1, 0):
        resumed = make_trainer(minibatch_replays=2)
        resumed.load_state_dict(saved)
        perturb = resumed.free.perturb

        def record(x, perturb=perturb, start_step=start_step):
            out = perturb(x)
            first.setdefault(start_step, (out - x).detach())
            return out

        resumed.free.perturb = record
        resumed.train_epoch(start_step=start_step)
    assert first[1].abs().max() > 0 and first[0].abs().max() == 0
