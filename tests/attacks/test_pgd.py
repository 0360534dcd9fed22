"""PGD (utils/attacks/pgd.py): eps-ball and image range, mode and gradients, restarts, random
starts, and the batch shrinking that must not change what the attack finds."""
from __future__ import annotations

import math

import pytest
import torch

import utils.attacks.pgd as attacks
from tests.eval_helpers import (
    TinyNet,
    edge_images,
    images_of,
    pgd,
    real_cluster_classifier,
    real_test_data,
)
from utils.attacks.pgd import logit_ce_loss, paper_loss, random_start, start_keys

EPS = 8 / 255
STEP = 2 / 255


def keys_for(n: int, seed: int = 0, eps_index: int = 0):
    indices = torch.arange(n)
    return lambda restart: start_keys(seed, eps_index, restart, indices)


def assert_admissible(x: torch.Tensor, delta: torch.Tensor, eps: float) -> None:
    assert delta.abs().max().item() <= eps + 1e-6
    adv = x + delta
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded (and the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("eps", [2 / 255, 25.5 / 255])
def test_random_start_is_uniform_in_the_ball_and_clipped_to_the_image(eps):
    x = edge_images(4)
    delta = random_start(x, eps, start_keys(111, 0, 0, torch.arange(4)))
    assert_admissible(x, delta, eps)
    assert (delta[:, :, :8] >= 0).all() and (delta[:, :, 8:16] <= 0).all()  # at 0 and at 1
    interior = delta[:, :, 24:][(x[:, :, 24:] > eps) & (x[:, :, 24:] < 1 - eps)]
    assert interior.abs().max().item() > 0.95 * eps  # not clipped where it need not be
    assert abs(interior.abs().mean().item() / eps - 0.5) < 0.05  # uniform on [-eps, eps]


def test_random_start_of_an_example_does_not_depend_on_its_batch():
    x = torch.rand(6, 3, 32, 32)
    keys = start_keys(111, 2, 3, torch.tensor([10, 11, 12, 13, 14, 15]))
    first = random_start(x[:4], EPS, keys[:4])
    second = random_start(x[2:], EPS, keys[2:])
    assert torch.equal(first[2:], second[:2])
    assert not torch.equal(first[2], first[3])  # examples get different starts
    for other in (start_keys(112, 2, 3, torch.tensor([12])), start_keys(111, 3, 3,
                  torch.tensor([12])), start_keys(111, 2, 4, torch.tensor([12]))):
        assert other[0] != keys[2]  # seed, eps and restart all change the start


@pytest.mark.parametrize("shrink", [True, False])
@pytest.mark.parametrize("loss_fn", [paper_loss, logit_ce_loss])
def test_every_kept_perturbation_is_in_the_ball_and_the_image(shrink, loss_fn):
    model = TinyNet(10).eval()
    x = edge_images(32)
    y = model.predict(x)
    # big steps and several restarts push deltas against every bound
    res = pgd(model, x, y, EPS, 4 / 255, 6, 3, keys_for(32), loss_fn, shrink)
    assert_admissible(x, res.delta, EPS)
    assert res.delta.abs().amax().item() > 0.99 * EPS
    # the reported predictions are what the model does on the kept perturbations
    with torch.no_grad():
        pred = model(x + res.delta).argmax(1)
    assert torch.equal(res.pred, pred) and torch.equal(res.correct, pred == y)
    assert (res.steps <= 6).all()


def test_attack_runs_in_eval_mode_restores_the_mode_and_leaves_grads_alone():
    model = TinyNet(10)
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    model.train()
    bn = model.features[1]
    running = bn.running_mean.clone(), bn.running_var.clone()
    first = pgd(model, x, y, EPS, STEP, 5, 2, keys_for(16))
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    # train mode would have updated BatchNorm statistics and made dropout random
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])
    second = pgd(model, x, y, EPS, STEP, 5, 2, keys_for(16))
    assert torch.equal(first.delta, second.delta)
    model.eval()
    pgd(model, x, y, EPS, STEP, 2, 1, keys_for(16))
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_restarts_never_lower_the_kept_loss():
    """The paper's rule keeps, per example, the restart with the highest loss; with the
    same first restart, adding restarts can only raise the kept loss (SPEC section 6)."""
    model = TinyNet(10, seed=1).eval()
    x = torch.rand(96, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = model.predict(x)
    runs = [pgd(model, x, y, 2 / 255, 0.5 / 255, 2, r, keys_for(96)) for r in (1, 2, 4)]
    for fewer, more in zip(runs, runs[1:]):
        assert (more.loss >= fewer.loss).all()
    assert (runs[-1].loss > runs[0].loss).any()  # the later restarts did contribute


def test_more_restarts_never_leave_more_examples_correct_when_the_loss_tracks_errors():
    """Not true in general: the kept perturbation is the one with the highest loss, and a
    higher cross-entropy need not mean misclassified (bounded cluster scores, or logits of
    more than two classes), so a later restart can replace a successful perturbation
    (SPEC section 6). It is true for the cross-entropy on the logits of two classes, where
    misclassified <=> loss >= log 2: a kept successful perturbation is only ever replaced
    by a successful one."""
    model = TinyNet(2, seed=1).eval()
    x = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = model.predict(x)
    one = pgd(model, x, y, 2 / 255, 0.5 / 255, 1, 1, keys_for(200), logit_ce_loss)
    four = pgd(model, x, y, 2 / 255, 0.5 / 255, 1, 4, keys_for(200), logit_ce_loss)
    assert 0 < int(four.correct.sum()) < 200  # a mix: the comparison means something
    assert not (four.correct & ~one.correct).any()
    assert int(four.correct.sum()) <= int(one.correct.sum())
    assert ((one.loss >= math.log(2)) == ~one.correct).all()


def test_padding_the_shrinking_set_changes_nothing(monkeypatch):
    """The GPU's shape-limited shrinking (active rows padded to a power of two with rows
    that are evaluated but never moved) finds what plain shrinking finds; run here on the
    CPU by padding on it too."""
    model = TinyNet(3, seed=2).eval()
    x = torch.rand(50, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    y = model.predict(x)
    plain = pgd(model, x, y, 4 / 255, 1 / 255, 6, 2, keys_for(50), logit_ce_loss)
    monkeypatch.setattr(attacks, "PADDED_DEVICES", {"cpu"})
    sizes = []

    def spy(active, n):
        rows, movable = padded_rows(active, n)
        sizes.append((len(active), len(rows)))
        return rows, movable

    padded_rows = attacks.padded_rows
    monkeypatch.setattr(attacks, "padded_rows", spy)
    padded = pgd(model, x, y, 4 / 255, 1 / 255, 6, 2, keys_for(50), logit_ce_loss)
    assert any(a < r for a, r in sizes)  # some steps did run padded batches
    assert {r for _, r in sizes} <= {1, 2, 4, 8, 16, 32, 50}
    assert torch.equal(padded.pred, plain.pred) and torch.equal(padded.steps, plain.steps)
    assert torch.allclose(padded.delta, plain.delta, atol=1e-6)


@pytest.mark.slow
def test_shrinking_and_masking_find_the_same_adversarial_examples(real_subset, real_weights):
    """Same attack, fewer rows: SPEC section 6 allows one example per thousand to differ
    (floating-point differences between batch shapes)."""
    torch.set_num_threads(2)
    model = real_cluster_classifier(str(real_subset), str(real_weights))
    data = real_test_data(str(real_subset), 40)
    x, y = images_of(data), data.labels
    keys = lambda r: start_keys(111, 1, r, data.indices)  # noqa: E731
    shrunk = pgd(model, x, y, EPS, STEP, 4, 1, keys, paper_loss, shrink=True)
    masked = pgd(model, x, y, EPS, STEP, 4, 1, keys, paper_loss, shrink=False)
    allowed = math.ceil(len(y) / 1000)
    assert int((shrunk.pred != masked.pred).sum()) <= allowed
    assert int((shrunk.steps != masked.steps).sum()) <= allowed
    assert 0 < int(shrunk.correct.sum()) < int((model.predict(x) == y).sum())
