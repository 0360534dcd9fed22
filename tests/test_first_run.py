"""A first run's inputs are checked before any data is read, and a missing input says how
to get it: the weights file (the stand-in converter, pretraining) and an offline data set."""
from __future__ import annotations

import socket
import time

import pytest

import datasets.data as data
import main_clustr
from utils.train import pretrain


@pytest.fixture
def unreadable_folder(tmp_path):
    """A data folder whose images fail on read: reaching it would give another error."""
    for split in ("train", "test"):
        for name in ("a", "b"):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            (folder / "0.png").write_bytes(b"not an image")
    return tmp_path / "data"


@pytest.fixture
def offline(monkeypatch):
    """No network: every connection is refused, and torchvision must not be asked."""
    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("simulated: offline")

    def no_torchvision(self, *args, **kwargs):
        raise AssertionError("the data set was read or downloaded despite the check")

    monkeypatch.setattr(data.socket, "create_connection", refuse)
    import torchvision.datasets as tvd
    for name in ("CIFAR10", "CIFAR100", "SVHN"):  # the classes keep their URLs
        cls = getattr(tvd, name)
        monkeypatch.setattr(tvd, name, type(name, (cls,), {"__init__": no_torchvision}))


def test_missing_weights_named_before_data_is_read(unreadable_folder, tmp_path, capsys):
    status = main_clustr.main(["--checkpoint", str(tmp_path / "exp"), "--dataset",
                               "imagefolder", "--data-root", str(unreadable_folder),
                               "--pretrained-path", str(tmp_path / "resnet18.pt"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and "unreadable" not in err
    for hint in ("resnet18.pt: no such file", "python -m pretrained_weights.from_autoattack",
                 "python -m utils.train.pretrain", "pretrained_weights/README.md"):
        assert hint in err, err
    assert not (tmp_path / "exp").exists()


def test_unreadable_folder_is_read_without_the_weights_check(unreadable_folder, tmp_path,
                                                              capsys):
    """The control: the same folder does fail on read once the weights are not the issue."""
    status = main_clustr.main(["--checkpoint", str(tmp_path / "exp"), "--dataset",
                               "imagefolder", "--data-root", str(unreadable_folder),
                               "--quiet", "--workers", "0"])
    assert status == 2 and "unreadable image" in capsys.readouterr().err


@pytest.mark.parametrize("name, expected", [("cifar10", "cifar-10-batches-py/"),
                                            ("cifar100", "cifar-100-python/"),
                                            ("svhn", "train_32x32.mat")])
def test_offline_dataset_fails_fast_naming_the_files(name, expected, offline, tmp_path,
                                                     capsys):
    root = tmp_path / "data"
    status = main_clustr.main(["--checkpoint", str(tmp_path / "exp"), "--dataset", name,
                               "--data-root", str(root), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert f"{name} train set not found in {root}" in err and expected in err, err
    assert "(offline)" in err
    assert not root.exists() and not (tmp_path / "exp").exists()


def test_offline_evaluation_and_pretraining_fail_the_same_way(offline, tmp_path, capsys):
    status = pretrain.main(["--dataset", "cifar10", "--data-root", str(tmp_path / "d"),
                            "--out", str(tmp_path / "w.pt"), "--quiet"])
    assert status == 2 and "cifar-10-batches-py/" in capsys.readouterr().err
    status = main_clustr.main(["--checkpoint", str(tmp_path / "exp"), "--evaluate-ckpt",
                               str(tmp_path / "ckpt.pth"), "--data-root", str(tmp_path / "d")])
    assert status == 2  # the checkpoint or the data: each is named before anything is read


def test_files_on_disk_need_no_network(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "reachable", lambda *a: pytest.fail("network probed"))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / f).write_bytes(b"")
    data.check_available("cifar10", str(tmp_path))
    (tmp_path / "test_32x32.mat").write_bytes(b"")
    data.check_available("svhn", str(tmp_path), ("test",))


def test_probe_does_not_wait_for_a_hanging_resolver(monkeypatch):
    def hang(*args, **kwargs):  # a resolver that answers long after the probe gave up
        time.sleep(3)
        raise OSError("simulated: timed out")

    monkeypatch.setattr(data.socket, "create_connection", hang)
    assert data.reachable("example.invalid", 443, seconds=0.2) is False


def test_probe_sees_an_open_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert data.reachable("127.0.0.1", server.getsockname()[1], seconds=5)
