"""CIFAR-10, CIFAR-100 and SVHN through torchvision, end to end, on small files written in
each data set's own on-disk format: ``cifar-10-batches-py/`` and ``cifar-100-python/``
pickles, SVHN's ``train_32x32.mat``/``test_32x32.mat`` (MATLAB files, via scipy).

torchvision checks the MD5 sums of the real files; these tests replace only that check, so
everything after it (torchvision's readers, this project's loader, the normalisation and the
k-means settings each data set gets, training and evaluation) is the code a user runs. The
expected values are the SPEC's constants, written out here rather than read from the code.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import main_clustr
from datasets.data import load_dataset
from models.classifier import ClusterClassifier

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
SVHN_MEAN, SVHN_STD = (0.4378, 0.4439, 0.4729), (0.1980, 0.2011, 0.1971)
# (n_init, max_iter) of the original's k-means: CIFAR-10 1 and 20, the others 10 and 40
KMEANS = {"cifar10": (1, 20), "cifar100": (10, 40), "svhn": (10, 40)}


def images(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 32, 32) uint8 images, each class with its own dominant channel, and labels."""
    gen = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = gen.integers(0, 120, (n, 3, 32, 32), dtype=np.uint8)
    x[np.arange(n), labels % 3] += 120
    return x, labels


def write_cifar10(root, per_class_train: int = 5, per_class_test: int = 1) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"class{c}" for c in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": 2 * per_class_train}, f)
    train_x, train_y = images(10 * per_class_train, 10, seed=0)
    for b, rows in enumerate(np.array_split(np.arange(len(train_y)), 5), start=1):
        with open(folder / f"data_batch_{b}", "wb") as f:  # rows of R, G, B planes
            pickle.dump({"data": train_x[rows].reshape(len(rows), 3072),
                         "labels": train_y[rows].tolist()}, f)
    test_x, test_y = images(10 * per_class_test, 10, seed=1)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test_x.reshape(len(test_y), 3072), "labels": test_y.tolist()}, f)
    return {"train": (train_x, train_y), "test": (test_x, test_y), "classes": names}


def write_cifar100(root, per_class_train: int = 2, per_class_test: int = 1) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"fine{c}" for c in range(100)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names,
                     "coarse_label_names": [f"coarse{c}" for c in range(20)]}, f)
    out = {"classes": names}
    for split, n, seed in (("train", per_class_train, 2), ("test", per_class_test, 3)):
        x, y = images(100 * n, 100, seed)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": x.reshape(len(y), 3072), "fine_labels": y.tolist(),
                         "coarse_labels": (y // 5).tolist()}, f)
        out[split] = (x, y)
    return out


def write_svhn(root, per_class_train: int = 5, per_class_test: int = 1) -> dict:
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    out = {"classes": [str(c) for c in range(10)]}
    for split, n, seed in (("train", per_class_train, 4), ("test", per_class_test, 5)):
        x, y = images(10 * n, 10, seed)
        # the .mat layout: X (32, 32, 3, N), y (N, 1) with the digit 0 stored as label 10
        savemat(str(root / f"{split}_32x32.mat"),
                {"X": x.transpose(2, 3, 1, 0), "y": np.where(y == 0, 10, y)[:, None]})
        out[split] = (x, y)
    return out


WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "svhn": write_svhn}


@pytest.fixture
def no_md5(monkeypatch):
    """Accept the small files in place of the real ones (whose MD5 sums torchvision knows)."""
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.SVHN, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(svhn, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tv_utils, "check_integrity", lambda *a, **k: True)  # SVHN's download


@pytest.fixture
def kmeans_calls(monkeypatch):
    """Every KMeans the run constructs: (n_clusters, n_init, max_iter, init)."""
    import sklearn.cluster

    calls = []
    real = sklearn.cluster.KMeans

    class Recording(real):
        def __init__(self, **kwargs):
            calls.append((kwargs["n_clusters"], kwargs["n_init"], kwargs["max_iter"],
                          kwargs["init"]))
            super().__init__(**kwargs)

    monkeypatch.setattr(sklearn.cluster, "KMeans", Recording)
    return calls


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_loader_reads_the_official_format(name, tmp_path, no_md5):
    written = WRITERS[name](tmp_path / "data")
    for split in ("train", "test"):
        data = load_dataset(name, str(tmp_path / "data"), split, download=False)
        x, y = written[split]
        assert data.images.dtype == torch.uint8 and data.images.shape == (len(y), 3, 32, 32)
        assert torch.equal(data.images, torch.from_numpy(x))  # channel order and layout kept
        assert torch.equal(data.labels, torch.from_numpy(y).long())  # SVHN's 10 is digit 0
        assert list(data.classes) == written["classes"]


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_train_and_evaluate_each_torchvision_data_set(name, tmp_path, no_md5, kmeans_calls):
    WRITERS[name](tmp_path / "data")
    out = tmp_path / "run"
    classes = 100 if name == "cifar100" else 10
    k = 1  # one cluster per class: a few random images per class cannot fill two reliably
    m = classes // 2  # batches of half the classes x 2 images: 2 steps per epoch
    rc = main_clustr.main([
        "--checkpoint", str(out), "--dataset", name, "--data-root", str(tmp_path / "data"),
        "--epochs", "1", "--k", str(k), "--m", str(m), "--d", "2", "--L", "4",
        "--iterations", "1", "--restarts", "1", "--test-batch", "50", "--embed-batch", "50",
        "--device", "cpu", "--quiet", "--seed", "0"])
    assert rc == 0
    # k-means with this data set's settings, once per class before training and after
    # the epoch
    n_init, max_iter = KMEANS[name]
    assert kmeans_calls == [(k, n_init, max_iter, "k-means++")] * (2 * classes)
    # the saved model normalises its inputs with this data set's mean and std
    model = ClusterClassifier.from_checkpoint(str(out / "checkpoint.pth"))
    mean, std = (SVHN_MEAN, SVHN_STD) if name == "svhn" else (CIFAR_MEAN, CIFAR_STD)
    assert torch.allclose(model.backbone.mean.flatten(), torch.tensor(mean))
    assert torch.allclose(model.backbone.std.flatten(), torch.tensor(std))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["dataset"] == name and ckpt["cluster_centers"].shape == (classes * k, 512)
    rows = (out / "attack_results_ext.csv").read_text().splitlines()
    assert rows[0] == "epsilons,test_set_accs" and len(rows) == 6
    assert len((out / "log.txt").read_text().splitlines()) == 2
