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


# -- the batch form as it was before it stopped waiting for the device ----------------------
def scatter_add_magnet(emb, clusters, cluster_classes, alpha):
    """The earlier formulation (scatter-adds, the own distance scattered into the matrix, eps
    added with logaddexp): the reference the current one must equal up to float rounding."""
    total = len(cluster_classes)
    counts = emb.new_zeros(total).index_add_(0, clusters, emb.new_ones(len(emb)))
    means = emb.new_zeros(total, emb.shape[1]).index_add_(0, clusters, emb)
    means = means / counts.clamp_min(1.0)[:, None]
    sq = (emb.pow(2).sum(1, keepdim=True) - 2.0 * emb @ means.t()
          + means.pow(2).sum(1)).clamp_min(0.0)
    own_dist = (emb - means[clusters]).pow(2).sum(1)
    var = own_dist.sum() / (len(emb) - 1)
    sq = sq.scatter(1, clusters[:, None], own_dist[:, None])
    other = (counts > 0)[None, :] & (cluster_classes[None, :]
                                     != cluster_classes[clusters][:, None])
    log_s = -sq / (2.0 * var)
    log_num = log_s.gather(1, clusters[:, None]).squeeze(1) - alpha
    log_den = torch.logaddexp(
        torch.logsumexp(log_s.masked_fill(~other, torch.finfo(log_s.dtype).min), 1),
        log_s.new_tensor(math.log(EPS)))
    return torch.relu(-torch.log((log_num - log_den).exp() + EPS)), var


def test_batch_form_equals_the_scatter_add_formulation_with_its_gradient():
    """Seed-shaped batches (12 clusters x 20, 512-d, 20 clusters of 10 classes), uneven
    cluster sizes, and embeddings so spread that every ratio underflows: same losses, sigma^2
    and gradients in float32 up to rounding."""
    gen = torch.Generator().manual_seed(3)
    classes = torch.arange(10).repeat_interleave(2)
    for scale, sizes in ((1.0, [20] * 12), (3.0, [2, 5, 20, 7] * 3), (1e3, [20] * 12)):
        picked = torch.randperm(20, generator=gen)[:12]
        ids = picked.repeat_interleave(torch.tensor(sizes))
        emb = torch.randn(len(ids), 512, generator=gen) * scale + ids[:, None] * 0.05
        got_emb, ref_emb = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
        got, got_var = magnet_loss(got_emb, ids, classes, 12.5)
        ref, ref_var = scatter_add_magnet(ref_emb, ids, classes, 12.5)
        (got.mean() + got_var).backward()
        (ref.mean() + ref_var).backward()
        torch.testing.assert_close(got_var, ref_var, rtol=1e-5, atol=0)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_emb.grad, ref_emb.grad, rtol=1e-4, atol=1e-7)


def test_written_out_gradient_passes_gradcheck():
    """Finite differences in float64 for both outputs (losses and sigma^2), with a cluster
    absent from the batch and clusters of unequal sizes."""
    gen = torch.Generator().manual_seed(5)
    classes = torch.arange(3).repeat_interleave(2)
    ids = torch.tensor([0, 0, 0, 3, 3, 4, 4, 4])  # clusters 1, 2 and 5 absent
    emb = torch.randn(8, 5, generator=gen, dtype=torch.double).requires_grad_(True)
    losses, _ = magnet_loss(emb, ids, classes, 3.0)
    assert (losses > 0.1).all()  # away from relu's kink, where differences are one-sided
    assert torch.autograd.gradcheck(lambda e: magnet_loss(e, ids, classes, 3.0), (emb,))
