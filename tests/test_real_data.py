"""On the real CIFAR-10 subset with the real pretrained ResNet18 (skipped where absent)."""
import subprocess
import sys

import pytest
import torch

from datasets.data import load_dataset
from models.checkpoint import load_weights
from models.cluster_head import ClusterHead
from models.resnet import ResNet18
from tests.conftest import ROOT
from utils.train.clustering import fit_clusters
from utils.train.embeddings import compute_embeddings

pytestmark = pytest.mark.slow


def test_pretrained_clusters_score_at_least_90(real_subset, real_weights):
    model = ResNet18(10)
    load_weights(model, str(real_weights))
    cpu = torch.device("cpu")
    train = load_dataset("imagefolder", str(real_subset), "train")
    test = load_dataset("imagefolder", str(real_subset), "test")
    assert len(test) == 1017
    train_emb = compute_embeddings(model, train.images, 256, cpu)
    clusters = fit_clusters(train_emb, train.labels, 10, 2, n_init=1, max_iter=20, seed=111)
    head = ClusterHead(clusters.centers, clusters.classes, clusters.variance, 10, L=20)
    test_emb = compute_embeddings(model, test.images, 256, cpu)
    acc = (head.predict(test_emb) == test.labels).float().mean().item()
    linear = (model.linear(test_emb).argmax(1) == test.labels).float().mean().item()
    assert acc >= 0.90, acc
    assert linear >= 0.93, linear


def test_one_short_clustr_epoch_keeps_85(real_subset, real_weights, tmp_path):
    out = tmp_path / "exp"
    res = subprocess.run(
        [sys.executable, str(ROOT / "main_clustr.py"), "--checkpoint", str(out), "--dataset",
         "imagefolder", "--data-root", str(real_subset), "--pretrained-path", str(real_weights),
         "--epochs", "1", "--L", "20", "--train-subset", "1500", "--iterations", "1",
         "--restarts", "1", "--test-subset", "300"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    row = (out / "log.txt").read_text().splitlines()[1].split("\t")
    assert float(row[5]) >= 85.0, row
