"""The vectorised Magnet loss against a plain per-example loop written here."""
import math

import torch

from utils.train.magnet_loss import EPS, magnet_loss, magnet_loss_full


def loop_magnet(emb, clusters, cluster_classes, alpha):
    """Rippel et al.'s stochastic Magnet loss, one example at a time."""
    ids = sorted(set(clusters.tolist()))
    means = {c: emb[clusters == c].mean(0) for c in ids}
    var = sum(((emb[n] - means[int(clusters[n])]) ** 2).sum() for n in range(len(emb)))
    var = var / (len(emb) - 1)
    losses = []
    for n in range(len(emb)):
        own = int(clusters[n])
        num = math.exp(-((emb[n] - means[own]) ** 2).sum().item() / (2 * var) - alpha)
        den = sum(math.exp(-((emb[n] - means[c]) ** 2).sum().item() / (2 * var))
                  for c in ids if cluster_classes[c] != cluster_classes[own])
        losses.append(max(0.0, -math.log(num / (den + EPS) + EPS)))
    return torch.tensor(losses, dtype=torch.double), var


def test_matches_loop_on_random_embeddings():
    gen = torch.Generator().manual_seed(0)
    cluster_classes = torch.arange(4).repeat_interleave(2)  # 4 classes x K=2
    clusters = torch.tensor([0, 0, 0, 3, 3, 3, 4, 4, 6, 6, 6, 7])
    emb = torch.randn(len(clusters), 16, generator=gen) + clusters[:, None] * 0.3
    for alpha in (0.0, 1.0, 12.5):
        got, var = magnet_loss(emb.double(), clusters, cluster_classes, alpha)
        want, want_var = loop_magnet(emb.double(), clusters, cluster_classes, alpha)
        assert torch.allclose(var, want_var, rtol=1e-10)
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10), (got, want)


def test_gradient_finite_where_distances_are_large():
    gen = torch.Generator().manual_seed(1)
    cluster_classes = torch.arange(3).repeat_interleave(2)
    clusters = torch.tensor([0, 0, 2, 2, 4, 4])
    emb = (torch.randn(6, 8, generator=gen) * 1e4).requires_grad_(True)
    losses, _ = magnet_loss(emb, clusters, cluster_classes, 12.5)
    losses.mean().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(emb.grad).all()


def test_sigma_is_not_detached():
    cluster_classes = torch.arange(2).repeat_interleave(1)
    clusters = torch.tensor([0, 0, 1, 1])
    emb = torch.randn(4, 3, requires_grad=True)
    _, var = magnet_loss(emb, clusters, cluster_classes, 1.0)
    assert var.requires_grad


def test_full_set_loss_matches_loop():
    gen = torch.Generator().manual_seed(2)
    C, K, D = 3, 2, 5
    centers = torch.randn(C * K, D, generator=gen).double()
    classes = torch.arange(C).repeat_interleave(K)
    emb = torch.randn(20, D, generator=gen).double()
    labels = torch.randint(0, C, (20,), generator=gen)
    var = torch.tensor(0.7, dtype=torch.double)
    got = magnet_loss_full(emb, labels, centers, classes, var.expand(C * K), alpha=2.0)
    for n in range(20):
        d = ((emb[n] - centers) ** 2).sum(1)
        own = min((d[c].item(), c) for c in range(C * K) if classes[c] == labels[n])[1]
        num = math.exp(-d[own].item() / (2 * var.item()) - 2.0)
        den = sum(math.exp(-d[c].item() / (2 * var.item())) for c in range(C * K)
                  if classes[c] != labels[n])
        want = max(0.0, -math.log(num / (den + EPS) + EPS))
        assert abs(got[n].item() - want) < 1e-9
