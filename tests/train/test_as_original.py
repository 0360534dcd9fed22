"""``--as-original``: each of the original's rules against a plain loop restating it, the
default path unchanged, and a tiny run with its ``--resume`` end to end.

The unit tests use the tiny 3-class data and network of ``test_variants``; the CLI test runs
the real command on the tiny image folder.
"""
from __future__ import annotations

import copy
import json
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from base.tensors import to_device
from datasets.data import augment
from models.cluster_head import ClusterHead, squared_distances
from tests.test_cli import run_cli
from tests.train.test_variants import CPU, a_batch, make_trainer
from utils.train import as_original
from utils.train.clustering import KMeansSettings, fit_clusters
from utils.train.consistency import RADIUS as EPS
from utils.train.embeddings import compute_embeddings
from utils.train.magnet_loss import magnet_loss, magnet_loss_full


def original_trainer(**variant):
    trainer = make_trainer(as_original=True, **variant)
    trainer.first_clusters()
    return trainer


def wide_head(head: ClusterHead, emb: torch.Tensor) -> ClusterHead:
    """The head with a variance as large as the largest squared distance, so that no score
    of the tiny network underflows."""
    wide = squared_distances(emb.detach(), head.centers).max().expand(len(head.centers))
    return ClusterHead(head.centers, head.classes, wide, 3, 6, True)


def batchnorm_stats(model) -> list[torch.Tensor]:
    return [b.clone() for name, b in model.named_buffers() if "running" in name]


# -- the passes: test images update BatchNorm -------------------------------------------------
def original_passes_bn(model, trainer, generator, with_test: bool) -> list[torch.Tensor]:
    """The original's epoch end, restated: compute_reps (batch ceil(N/400)) in eval mode on
    augmented images for k-means, then compute_real_losses in train mode on augmented training
    images and on the test images; eval_model afterwards changes nothing."""
    train, test, ds = trainer.train.images, trainer.test.images, trainer.cfg.dataset
    b = math.ceil(len(train) / 400)
    model.eval()
    with torch.no_grad():
        for s in range(0, len(train), b):  # the refresh: eval mode, augmented
            model(to_device(augment(train[s:s + b], ds, generator), CPU))
        model.train()
        for s in range(0, len(train), b):  # sigma^2 and the training loss: train mode
            model(to_device(augment(train[s:s + b], ds, generator), CPU))
        if with_test:
            bt = math.ceil(len(test) / 400)
            for s in range(0, len(test), bt):  # the test loss: train mode, test images
                model(to_device(test[s:s + bt], CPU))
    return batchnorm_stats(model)


def test_the_test_loss_pass_updates_batchnorm_as_the_original():
    trainer = original_trainer()
    model, gen = copy.deepcopy(trainer.model), torch.Generator()
    gen.set_state(trainer.generator.get_state())
    expected = original_passes_bn(model, trainer, gen, with_test=True)
    gen2 = torch.Generator()
    gen2.set_state(trainer.generator.get_state())
    without_test = original_passes_bn(copy.deepcopy(trainer.model), trainer, gen2,
                                      with_test=False)
    trainer.epoch_end(True)
    got = batchnorm_stats(trainer.model)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, without_test))


def test_the_passes_follow_the_stored_order_and_return_the_data_sets():
    """The original reads the examples in their stored order (CIFAR-10's official one, class-
    mixed): a train-mode pass in that order, its embeddings handed back in the data set's."""
    trainer = original_trainer()
    test = trainer.test
    test.stored_rank = torch.arange(len(test)).flip(0)  # stored in reverse
    ref = copy.deepcopy(trainer.model).train()
    with torch.no_grad():
        expected = torch.cat([ref(to_device(test.images[i:i + 1], CPU))
                              for i in reversed(range(len(test)))]).flip(0)
    got = as_original.OriginalPasses(trainer)._embed(test, train_mode=True, augmented=False)
    assert torch.allclose(got, expected, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(batchnorm_stats(trainer.model),
                                                                batchnorm_stats(ref)))


def test_the_default_passes_leave_batchnorm_alone():
    trainer = make_trainer()
    before = batchnorm_stats(trainer.model)
    trainer.epoch_end(True)
    assert all(torch.equal(a, b) for a, b in zip(before, batchnorm_stats(trainer.model)))


# -- the reported loss: same-class clusters in the denominator --------------------------------
def test_reported_loss_counts_same_class_clusters_as_the_original():
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    centers = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    classes = torch.arange(3).repeat_interleave(2)
    labels = torch.randint(0, 3, (30,), generator=gen)
    variance = torch.full((6,), 4.0, dtype=torch.float64)
    alpha, eps = 1.0, 1e-8
    expected = []
    for n in range(30):  # compute_total_loss, one example at a time
        d = ((emb[n] - centers) ** 2).sum(1)
        same = classes == labels[n]
        own = d.masked_fill(~same, float("inf")).min()
        num = math.exp(-own / (2 * 4.0) - alpha)
        den = sum(math.exp(-(0.0 if same[c] else d[c]) / (2 * 4.0)) for c in range(6))
        expected.append(max(0.0, -math.log(num / (den + eps) + eps)))
    got = as_original.loss_with_same_class_clusters(emb, labels, centers, classes, variance,
                                                    alpha)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-9)
    ours = magnet_loss_full(emb, labels, centers, classes, variance, alpha)
    assert (got > ours).all()  # the project's denominator has the other classes only


# -- the adversary: train mode, gradients left on the parameters, clean side attached ---------
def test_the_adversary_leaves_its_gradient_on_the_parameters():
    trainer = original_trainer(consistency_lambda=1.0)
    x, _, head = a_batch(trainer)
    trainer.model.train()
    emb = trainer.model(x).detach()
    head = wide_head(head, emb)
    ref = copy.deepcopy(trainer.model)
    gen = torch.Generator().manual_seed(3)
    start = torch.empty(x.shape).uniform_(-EPS, EPS, generator=torch.Generator().manual_seed(3))
    # the original: rand start, model.zero_grad(), train-mode forward, mean cross-entropy of
    # the clean probabilities against the scores, backward; nothing clears the gradients
    p = head.paper_scores(emb)
    p = p / p.sum(1, keepdim=True)
    ref.zero_grad()
    xa = (x + start).clamp(0, 1)
    (-(p * F.log_softmax(head.paper_scores(ref(xa)), 1)).sum(1)).mean().backward()
    trainer.model.zero_grad()
    trainer.extras.adversary(trainer.model, head, x, emb, gen)
    for (name, a), b in zip(trainer.model.named_parameters(), ref.parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert any(b.grad.abs().sum() > 0 for b in ref.parameters())
    assert all(torch.equal(a, b) for a, b in zip(batchnorm_stats(trainer.model),
                                                 batchnorm_stats(ref)))  # train mode


def test_the_default_adversary_leaves_no_gradient():
    trainer = make_trainer(consistency_lambda=1.0)
    x, _, head = a_batch(trainer)
    trainer.model.zero_grad()
    trainer.extras.adversary(trainer.model, head, x, trainer.model(x), torch.Generator())
    assert all(p.grad is None for p in trainer.model.parameters())


def test_the_clean_side_keeps_its_graph_only_as_the_original():
    for flag, attached in ((False, False), (True, True)):
        trainer = make_trainer(consistency_lambda=1.0, as_original=flag)
        x, _, head = a_batch(trainer)
        emb = trainer.model(x)
        head = wide_head(head, emb)
        term = trainer.extras.consistency(trainer.model, head, x, emb, torch.Generator())
        grad, = torch.autograd.grad(term, emb, allow_unused=True)
        assert (grad is not None and grad.abs().sum() > 0) == attached


# -- short batches: skipped ---------------------------------------------------------------------
def test_a_short_batch_is_skipped_as_drop_last_does():
    full = 12  # m x d
    keep = make_trainer(as_original=True).keep_batch
    for n in (5, 11, 12):  # the original: DataLoader(batch_size=m*d, drop_last=True)
        batches = list(DataLoader(list(range(n)), batch_size=full, drop_last=True))
        assert keep(n) == (len(batches) == 1)


def test_a_skipped_step_changes_nothing_and_the_last_one_skips_the_refresh():
    trainer = original_trainer()
    real = trainer.sampler.sample

    def short(gen):
        indices, ids = real(gen)
        return indices[:-1], ids[:-1]

    trainer.sampler.sample = short
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    losses, clusters = trainer.sampler.losses.clone(), trainer.clusters
    metrics = trainer.run_epoch()
    assert metrics.components == {} and not trainer.last_step_trained
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters()))
    assert losses.isnan().all() and trainer.sampler.losses.isnan().all()  # none recorded
    assert torch.equal(trainer.clusters.centers, clusters.centers)  # no refresh


# -- cluster weights: kept across a refresh -----------------------------------------------------
def test_cluster_weights_follow_the_original_batch_builder():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(10)
    sampler = as_original.OriginalWeightSampler(labels, 3, 2, 3, 4)
    first = labels * 2 + (torch.arange(30) % 2)
    sampler.update_clusters(first, torch.randn(6, 4, generator=gen))
    assert torch.allclose(sampler.cluster_weights(), torch.full((6,), 1 / 6))
    example, has, cluster_losses = torch.zeros(30), torch.zeros(30, dtype=torch.bool), None
    assign = first
    for step in range(4):
        if step == 2:  # a refresh: new assignments, the weights stay
            assign = labels * 2 + (torch.arange(30) // 5 % 2)
            sampler.update_clusters(assign, torch.randn(6, 4, generator=gen))
        idx = torch.randperm(30, generator=gen)[:8]
        loss = torch.rand(8, generator=gen)
        sampler.record_losses(idx, loss)
        # ClusterBatchBuilder.update_losses, restated
        cluster_losses = torch.zeros(6) if cluster_losses is None else cluster_losses
        example[idx], has[idx] = loss, True
        for c in assign[idx].unique():
            members = assign == c
            cluster_losses[c] = example[members][has[members]].mean()
        assert torch.allclose(sampler.cluster_weights(),
                              cluster_losses / cluster_losses.sum(), atol=1e-6)


def test_carried_delta_is_not_clipped_to_the_new_batch():
    free = as_original.UnclippedFreePerturbation()
    x = torch.full((2, 3, 4, 4), 0.5, requires_grad=False)
    free.perturb(x)
    free.delta = torch.full_like(x, EPS)
    new = torch.ones_like(x)  # x + delta leaves [0, 1]
    assert (free.perturb(new) > 1).all()


# -- without the flag: the project's own epoch, unchanged ---------------------------------------
def plain_project_epoch(t) -> tuple[float, float, float, float]:
    """The project's epoch restated with its building blocks: Magnet steps on augmented
    batches, then one eval-mode pass per set for the refresh and the metrics."""
    head, alpha = t.head(), t.cfg.alpha
    t.model.train()
    for _ in range(t.steps_per_epoch()):
        idx, ids = t.sampler.sample(t.generator)
        x = to_device(augment(t.train.images[idx], t.cfg.dataset, t.generator), CPU)
        t.optimizer.zero_grad(set_to_none=True)
        per, _ = magnet_loss(t.model(x), ids, head.classes, alpha)
        per.mean().backward()
        t.optimizer.step()
        t.sampler.record_losses(idx, per.detach())
    emb = compute_embeddings(t.model, t.train.images, 64, CPU)
    c = fit_clusters(emb, t.train.labels, 3, KMeansSettings(2, 1, 20, 1))
    head = ClusterHead(c.centers, c.classes, c.variance, 3, t.cfg.L, True)
    out = []
    for data, e in ((t.train, emb), (t.test, compute_embeddings(t.model, t.test.images, 64, CPU))):
        loss = magnet_loss_full(e, data.labels, c.centers, c.classes, c.variance, alpha)
        out += [loss.mean().item(), 100.0 * int((head.predict(e) == data.labels).sum()) / len(data)]
    return tuple(out)


def test_without_the_flag_an_epoch_gives_the_projects_own_numbers_exactly():
    trainer, plain = make_trainer(), make_trainer()
    m = trainer.run_epoch()
    assert (m.train_loss, m.train_acc, m.test_loss, m.test_acc) == plain_project_epoch(plain)
    flagged = original_trainer().run_epoch()
    assert (flagged.train_loss, flagged.test_loss) != (m.train_loss, m.test_loss)


# -- the command: a tiny run and its --resume ---------------------------------------------------
def test_an_as_original_run_resumes_end_to_end(tiny_folder, tmp_path, monkeypatch):
    # few images: the original's passes run batches of ceil(N/400), here single images,
    # which one thread runs faster than two
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = ["--dataset", "imagefolder", "--data-root", tiny_folder, "--train-subset", 36,
              "--test-subset", 9, "--k", 2, "--m", 3, "--d", 4, "--L", 4, "--iterations", 1,
              "--restarts", 1, "--as-original"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_cli("--checkpoint", whole, "--epochs", 2, *common).returncode == 0
    assert run_cli("--checkpoint", part, "--epochs", 1, *common).returncode == 0
    changed = [a for a in common if a != "--as-original"]
    res = run_cli("--checkpoint", part, "--epochs", 2, "--resume", *changed)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--as-original" in res.stderr
    res = run_cli("--checkpoint", part, "--epochs", 2, "--resume", *common)
    assert res.returncode == 0, res.stderr
    assert (part / "log.txt").read_text() == (whole / "log.txt").read_text()
    assert "as_original: True" in (part / "params.txt").read_text()
    assert json.loads((part / "args.json").read_text())["as_original"] is True
