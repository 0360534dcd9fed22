"""The fast paths give the results of the straightforward ones on the same inputs and seed.

Each test writes the plain version (a loop, torchvision's own transforms, one example at a
time) and compares: augmentation, the Magnet loss in both forms, the sampler's seed-cluster
weights and batches, and the embedding pass with the clusters and predictions built on it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from benchmarks.workloads import synthetic_data
from datasets.data import augment, crop_flip, crop_flip_draws
from datasets.magnet_sampler import MagnetSampler
from models.cluster_head import ClusterHead
from models.resnet import ResNet18
from utils.train.clustering import KMeansSettings, fit_clusters
from utils.train.embeddings import compute_embeddings
from utils.train.magnet_loss import EPS, magnet_loss, magnet_loss_full


# -- augmentation --------------------------------------------------------------------------
class _CropAt(T.RandomCrop):
    """torchvision's RandomCrop(32, padding=4) with the offsets given instead of drawn."""

    def __init__(self, top: int, left: int):
        super().__init__(32, padding=4)
        self.top, self.left = top, left

    def get_params(self, img, output_size):
        return self.top, self.left, *output_size


def _torchvision_augment(images: torch.Tensor, dy, dx, flip) -> torch.Tensor:
    """The original pipeline on PIL images: RandomCrop(32, padding=4), RandomHorizontalFlip."""
    out = []
    for img, top, left, f in zip(images, dy.tolist(), dx.tolist(), flip.tolist()):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        pil = T.RandomHorizontalFlip(p=1.0 if f else 0.0)(_CropAt(top, left)(pil))
        out.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
    return torch.stack(out)


def test_augment_equals_torchvision_crop_and_flip_with_the_same_offsets():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    dy, dx, flip = crop_flip_draws(len(images), torch.Generator().manual_seed(7))
    assert dy.min() == 0 and dy.max() == 8 and flip.any() and not flip.all()
    expected = _torchvision_augment(images, dy, dx, flip)
    assert torch.equal(crop_flip(images, dy, dx, flip), expected)
    # augment() draws exactly those offsets from the generator, in that order
    assert torch.equal(augment(images, "cifar10", torch.Generator().manual_seed(7)), expected)


def test_augment_covers_the_extreme_offsets_and_leaves_svhn_alone():
    images = torch.arange(2 * 3 * 32 * 32).remainder(251).to(torch.uint8).view(2, 3, 32, 32)
    corners = (torch.tensor([0, 8]), torch.tensor([8, 0]), torch.tensor([True, False]))
    assert torch.equal(crop_flip(images, *corners), _torchvision_augment(images, *corners))
    assert augment(images, "svhn", torch.Generator().manual_seed(0)) is images


# -- Magnet loss ---------------------------------------------------------------------------
def _loop_loss(dists: list[float], own: int, other: list[bool], var: float,
               alpha: float) -> float:
    """The formula of SPEC section 3 for one example, in float64."""
    num = math.exp(-dists[own] / (2 * var) - alpha)
    den = sum(math.exp(-d / (2 * var)) for d, o in zip(dists, other) if o)
    return max(0.0, -math.log(num / (den + EPS) + EPS))


def test_magnet_loss_full_equals_a_loop_over_examples():
    gen = torch.Generator().manual_seed(1)
    classes = torch.arange(4).repeat_interleave(3)  # 4 classes x 3 clusters
    centers = torch.randn(12, 8, generator=gen) * 2
    labels = torch.randint(0, 4, (40,), generator=gen)
    emb = torch.randn(40, 8, generator=gen) * 2
    variance = torch.full((12,), 3.0)
    fast = magnet_loss_full(emb, labels, centers, classes, variance, alpha=1.0)
    for n in range(len(emb)):
        d = [float(((emb[n].double() - c.double()) ** 2).sum()) for c in centers]
        own = min((i for i in range(12) if classes[i] == labels[n]), key=lambda i: d[i])
        other = [bool(classes[i] != labels[n]) for i in range(12)]
        assert fast[n].item() == pytest.approx(_loop_loss(d, own, other, 3.0, 1.0),
                                               rel=1e-4, abs=1e-5)


def test_magnet_loss_batch_equals_a_loop_with_its_gradient():
    gen = torch.Generator().manual_seed(2)
    classes = torch.arange(5).repeat_interleave(2)  # 10 clusters
    ids = torch.tensor([7, 7, 7, 0, 0, 0, 0, 4, 4, 9, 9, 9])  # 4 clusters in the batch
    emb = torch.randn(len(ids), 6, generator=gen, dtype=torch.float64)
    alpha = 0.5
    fast_emb = emb.clone().float().requires_grad_(True)
    fast, var = magnet_loss(fast_emb, ids, classes, alpha)
    fast.mean().backward()

    slow_emb = emb.clone().requires_grad_(True)
    uniq = sorted(set(ids.tolist()))
    means = {c: slow_emb[ids == c].mean(0) for c in uniq}
    sq = [((slow_emb[n] - means[int(c)]) ** 2).sum() for n, c in enumerate(ids)]
    slow_var = sum(sq) / (len(ids) - 1)
    losses = []
    for n, c in enumerate(ids.tolist()):
        d = {k: ((slow_emb[n] - means[k]) ** 2).sum() for k in uniq}
        num = torch.exp(-d[c] / (2 * slow_var) - alpha)
        den = sum(torch.exp(-d[k] / (2 * slow_var)) for k in uniq if classes[k] != classes[c])
        losses.append(torch.relu(-torch.log(num / (den + EPS) + EPS)))
    slow = torch.stack(losses)
    slow.mean().backward()
    assert var.item() == pytest.approx(slow_var.item(), rel=1e-5)
    torch.testing.assert_close(fast.double(), slow.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_emb.grad.double(), slow_emb.grad, rtol=1e-3, atol=1e-5)


# -- sampler -------------------------------------------------------------------------------
def _loop_weights(s: MagnetSampler) -> torch.Tensor:
    """Seed-cluster probabilities as the module docstring states them, one cluster at a time."""
    means, known_means = [], []
    for c in range(s.num_clusters):
        members = [i for i in range(len(s.labels)) if s.assignments[i] == c]
        known = [float(s.losses[i]) for i in members if not math.isnan(s.losses[i])]
        means.append(sum(known) / len(known) if known else None)
        if known:
            known_means.append(means[-1])
    if not known_means:
        return torch.full((s.num_clusters,), 1.0 / s.num_clusters)
    fill = sum(known_means) / len(known_means)
    w = torch.tensor([(fill if m is None else m) if (s.assignments == c).any() else 0.0
                      for c, m in enumerate(means)], dtype=torch.float64)
    return (w / w.sum()).float()


def _sampler(n=300, num_classes=5, K=3, m=4, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    assignments = labels * K + torch.randint(0, K, (n,), generator=gen)
    s = MagnetSampler(labels, num_classes, K, m, d)
    s.update_clusters(assignments, torch.randn(num_classes * K, 4, generator=gen))
    return s, gen


def test_cluster_weights_equal_a_loop_through_recording_reloading_and_refreshing():
    s, gen = _sampler()
    torch.testing.assert_close(s.cluster_weights(), _loop_weights(s))  # nothing known: uniform
    for step in range(30):  # batches overwrite earlier losses, some of them NaN
        idx, _ = s.sample(gen)
        losses = torch.rand(len(idx), generator=gen) * 3
        if step % 7 == 0:
            losses[:3] = float("nan")
        s.record_losses(idx, losses)
        torch.testing.assert_close(s.cluster_weights(), _loop_weights(s))
    state = s.state_dict()
    fresh, _ = _sampler()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.cluster_weights(), _loop_weights(fresh))
    # new assignments (one cluster left empty): the sums are recounted
    new = s.assignments.clone()
    new[new == 4] = 5
    s.update_clusters(new, s.centers)
    assert s.cluster_weights()[4] == 0
    torch.testing.assert_close(s.cluster_weights(), _loop_weights(s))


def test_record_losses_repeated_index_keeps_the_last_loss():
    s, _ = _sampler()
    s.record_losses(torch.tensor([3, 5, 3]), torch.tensor([1.0, 4.0, 2.0]))
    assert s.losses[3] == 2.0 and s.losses[5] == 4.0
    running = s.cluster_weights()
    s._recount_losses()  # the incremental sums equal a recount from scratch
    assert torch.allclose(running, s.cluster_weights())


def test_sample_is_the_seed_cluster_and_its_nearest_impostors():
    s, gen = _sampler(m=5, d=6)
    for _ in range(10):
        idx, ids = s.sample(gen)
        clusters = list(dict.fromkeys(ids.tolist()))  # in batch order: the seed first
        seed = clusters[0]
        others = [c for c in range(s.num_clusters)
                  if s.cluster_classes[c] != s.cluster_classes[seed]]
        dist = {c: float(((s.centers[c] - s.centers[seed]) ** 2).sum()) for c in others}
        assert clusters[1:] == sorted(others, key=lambda c: dist[c])[: s.m - 1]
        assert len(set(idx.tolist())) == len(idx)  # without replacement
        for c in clusters:
            members = idx[ids == c]
            assert (s.assignments[members] == c).all()
            assert len(members) == min(s.d, int((s.assignments == c).sum()))


# -- the embedding pass and what is built on it ---------------------------------------------
def test_embedding_pass_clusters_and_predictions_do_not_depend_on_the_batch_size():
    torch.manual_seed(0)
    model = ResNet18(3).to(memory_format=torch.channels_last)
    model.train()  # the caller's mode, which the pass must restore
    data = synthetic_data(24, seed=3, num_classes=3)  # two looks per class
    images, labels = data.images, data.labels
    cpu = torch.device("cpu")
    big = compute_embeddings(model, images, 24, cpu)
    small = compute_embeddings(model, images, 5, cpu)
    assert model.training
    torch.testing.assert_close(small, big, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # one image at a time, eval mode: the straightforward pass
        model.eval()
        single = torch.cat([model(images[i:i + 1].float() / 255) for i in range(24)])
    torch.testing.assert_close(big, single, rtol=1e-4, atol=1e-4)
    a = fit_clusters(big, labels, 3, KMeansSettings(2, 1, 20, 111))
    b = fit_clusters(small, labels, 3, KMeansSettings(2, 1, 20, 111))
    assert torch.equal(a.assignments, b.assignments)
    head = ClusterHead(a.centers, a.classes, a.variance, 3, L=4)
    assert torch.equal(head.predict(big), head.predict(small))


# -- k-means under a thread limit ----------------------------------------------------------
def test_single_threaded_kmeans_gives_the_centroids_of_scikit_learns_default():
    """``fit_clusters`` limits each fit to one thread; the centroids are those of plain
    scikit-learn k-means with its own thread pools, to 1e-12 in float64 (to a float32
    rounding in the float32 that ``fit_clusters`` stores)."""
    from sklearn.cluster import KMeans

    from utils.train import clustering

    gen = torch.Generator().manual_seed(4)
    classes, per_class, K = 3, 400, 2
    centres = 3 * torch.randn(classes * K, 512, generator=gen)
    which = torch.arange(classes * per_class) // (per_class // K)  # K blobs per class
    emb = centres[which] + torch.randn(classes * per_class, 512, generator=gen)
    labels = torch.arange(classes).repeat_interleave(per_class)
    fit = fit_clusters(emb, labels, classes, KMeansSettings(K, n_init=1, max_iter=20, seed=1))
    x = emb.numpy().astype(np.float64)
    for c in range(classes):
        members = (labels == c).nonzero().flatten().numpy()
        plain = KMeans(n_clusters=K, init="k-means++", n_init=1, max_iter=20,
                       random_state=1).fit(x[members]).cluster_centers_
        with clustering.threadpool_limits(limits=1):
            limited = KMeans(n_clusters=K, init="k-means++", n_init=1, max_iter=20,
                             random_state=1).fit(x[members]).cluster_centers_
        assert np.abs(plain - limited).max() <= 1e-12
        # float32 storage: the same value, or one rounding apart where float64 sums
        # taken in another order straddle a float32 boundary
        plain32 = torch.from_numpy(plain).float()
        assert ((fit.centers[c * K:(c + 1) * K] - plain32).abs()
                <= plain32.abs() * 2 ** -23).all()
