"""The Magnet batch sampler: batch shape, impostors, loss-proportional seed clusters."""
import torch

from datasets.magnet_sampler import MagnetSampler


def make_sampler(m=4, d=5, C=4, K=3, per_cluster=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(C).repeat_interleave(K * per_cluster)
    assignments = torch.arange(C * K).repeat_interleave(per_cluster)
    centers = torch.randn(C * K, 6, generator=gen)
    s = MagnetSampler(labels, C, K, m, d)
    s.update_clusters(assignments, centers)
    return s, labels, assignments, centers


def test_batch_is_m_clusters_of_d_examples():
    s, labels, assignments, _ = make_sampler()
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        idx, ids = s.sample(gen)
        assert len(idx) == 4 * 5 and len(set(idx.tolist())) == len(idx)
        assert torch.equal(assignments[idx], ids)
        counts = torch.bincount(ids, minlength=12)
        assert sorted(counts[counts > 0].tolist()) == [5] * 4


def test_impostors_are_nearest_other_class_clusters():
    s, labels, _, centers = make_sampler()
    classes = torch.arange(4).repeat_interleave(3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        _, ids = s.sample(gen)
        order = list(dict.fromkeys(ids.tolist()))  # seed first, then impostors
        seed, impostors = order[0], order[1:]
        assert all(classes[c] != classes[seed] for c in impostors)
        others = [c for c in range(12) if classes[c] != classes[seed]]
        dist = {c: (centers[c] - centers[seed]).norm().item() for c in others}
        nearest = sorted(others, key=dist.get)[:3]
        assert sorted(impostors) == sorted(nearest)


def test_small_cluster_is_taken_whole():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    s = MagnetSampler(labels, 2, 1, m=2, d=5)
    s.update_clusters(torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1]), torch.eye(2))
    idx, ids = s.sample(torch.Generator().manual_seed(0))
    assert (ids == 0).sum() == 3 and (ids == 1).sum() == 5


def test_seed_frequency_proportional_to_cluster_loss():
    s, _, assignments, _ = make_sampler(m=2, d=2, C=3, K=2)
    # cluster c's examples all have loss c + 1 except cluster 5 with no loss yet
    losses = (assignments.float() + 1)
    known = assignments != 5
    s.record_losses(known.nonzero().flatten(), losses[known])
    weights = s.cluster_weights()
    means = torch.arange(1, 7).float()
    means[5] = means[:5].mean()  # unknown: the mean of the known cluster losses
    expected = means / means.sum()
    assert torch.allclose(weights, expected)
    gen = torch.Generator().manual_seed(3)
    n = 6000
    seeds = torch.tensor([s.sample(gen)[1][0].item() for _ in range(n)])
    freq = torch.bincount(seeds, minlength=6).float() / n
    # binomial standard error <= 0.0065 at n = 6000: 4 sigma bound
    assert (freq - expected).abs().max() < 0.026, (freq, expected)


def test_uniform_before_any_loss():
    s, *_ = make_sampler()
    w = s.cluster_weights()
    assert torch.allclose(w, torch.full_like(w, 1 / 12))


def test_steps_per_epoch():
    s, *_ = make_sampler()  # 96 examples, m*d = 20
    assert s.steps_per_epoch() == 4
    tiny = MagnetSampler(torch.zeros(5, dtype=torch.long), 1, 1, 12, 20)
    assert tiny.steps_per_epoch() == 1


def tensor_sample(s: MagnetSampler, generator: torch.Generator):
    """The batch drawn with tensor bookkeeping at every step, as the sampler did before it
    kept Python lists per refresh: the reference for the stream of batches."""
    order = s.assignments.argsort(stable=True)
    counts = torch.bincount(s.assignments, minlength=s.num_clusters)
    start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    dist = torch.cdist(s.centers, s.centers)
    same = s.cluster_classes[:, None] == s.cluster_classes[None, :]
    impostors = dist.masked_fill(same, float("inf")).argsort(1)[:, : s.m - 1]
    seed = torch.multinomial(s.cluster_weights(), 1, generator=generator)
    picked, ids = [], []
    for c in torch.cat([seed, impostors[seed.item()]]).tolist():
        take = torch.randperm(int(counts[c]), generator=generator)[: s.d]
        picked.append(order[start[c] + take])
        ids.append(torch.full((len(take),), c, dtype=torch.long))
    return torch.cat(picked), torch.cat(ids)


def test_batches_and_generator_stream_equal_the_tensor_bookkeeping():
    """Uneven clusters (one smaller than d), losses recorded between draws, a refresh with
    new assignments: the same batches, ids and generator state after every draw."""
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 4, (200,), generator=gen)
    assignments = labels * 3 + torch.randint(0, 3, (200,), generator=gen)
    assignments[(assignments == 5).nonzero().flatten()[3:]] = 4  # cluster 5 keeps 3 (< d)
    s = MagnetSampler(labels, 4, 3, m=5, d=6)
    s.update_clusters(assignments, torch.randn(12, 8, generator=gen))
    ours, ref = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for step in range(40):
        if step == 20:
            s.update_clusters(labels * 3 + torch.randint(0, 3, (200,), generator=gen),
                              torch.randn(12, 8, generator=gen))
        want_idx, want_ids = tensor_sample(s, ref)
        idx, ids = s.sample(ours)
        assert torch.equal(idx, want_idx) and torch.equal(ids, want_ids)
        assert torch.equal(ours.get_state(), ref.get_state())
        s.record_losses(idx, torch.rand(len(idx), generator=gen) * 5)
