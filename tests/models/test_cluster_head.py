"""Nearest-L inference against hand-computed examples."""
import math

import torch

from models.cluster_head import ClusterHead


def head(L=2, normalize=True):
    # 3 classes x K=2, centroids on a line in 1-D so distances are easy to read
    centers = torch.tensor([[0.0], [10.0], [1.0], [20.0], [3.0], [30.0]])
    classes = torch.tensor([0, 0, 1, 1, 2, 2])
    return ClusterHead(centers, classes, torch.full((6,), 0.5), 3, L=L, normalize=normalize)


def test_top_L_per_class_sums_by_hand():
    r = torch.tensor([[0.5]])
    # squared distances 0.25, 90.25, 0.25, 380.25, 6.25, 870.25; 2 sigma^2 = 1
    s = [math.exp(-0.25), math.exp(-90.25), math.exp(-0.25), math.exp(-380.25),
         math.exp(-6.25), math.exp(-870.25)]
    got = head(L=3).paper_scores(r)[0]
    # the 3 nearest: clusters 0, 2, 4 -> one per class
    want = torch.tensor([s[0], s[2], s[4]])
    assert torch.allclose(got, want, rtol=1e-6)
    got1 = head(L=1).paper_scores(torch.tensor([[0.4]]))[0]
    assert got1[1] == 0 and got1[2] == 0 and got1[0] > 0


def test_not_normalize_sums_every_cluster():
    r = torch.tensor([[2.0]])
    d = (r - head().centers.t()).pow(2)[0]
    s = torch.exp(-d)
    got = head(normalize=False).paper_scores(r)[0]
    want = torch.stack([s[0] + s[1], s[2] + s[3], s[4] + s[5]])
    assert torch.allclose(got, want)


def test_logits_are_log_of_paper_scores_and_finite():
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(50, 1, generator=gen) * 4
    for L in (1, 2, 4, 6):
        h = head(L=L)
        logits = h.logits(r)
        assert torch.isfinite(logits).all()
        scores = h.paper_scores(r)
        assert torch.equal(logits.argmax(1), scores.argmax(1))
        counted = scores > 0
        assert torch.allclose(logits[counted], scores[counted].log(), atol=1e-5)
    far = torch.tensor([[1e4]])  # every score underflows; logits stay finite
    assert torch.isfinite(head(L=1).logits(far)).all()
