"""pretrained_weights.from_autoattack: the stand-in resnet18.pt made from pyautoattack's model."""
from __future__ import annotations

import hashlib
import os
import stat
import sys

import pytest
import torch

from base.io import load_checkpoint
from models.checkpoint import load_weights
from models.resnet import CIFAR_MEAN, CIFAR_STD, ResNet18
from pretrained_weights import from_autoattack


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _require_package():
    pytest.importorskip("pyautoattack", reason="pyautoattack not installed "
                        "(pip install pyautoattack==0.2.0)")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The command's output, made once for this module."""
    _require_package()
    out = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    assert from_autoattack.main(["--out", str(out)]) == 0
    return out


def _first_layer(model: ResNet18, x: torch.Tensor) -> torch.Tensor:
    """bn1(conv1(.)) of the model's own input normalisation applied to x in [0, 1]."""
    with torch.no_grad():
        return model.bn1(model.conv1((x - model.mean) / model.std))


def test_folding_matches_the_package_model_away_from_the_padding(written):
    source, _ = from_autoattack.package_source()
    package = ResNet18(10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).eval()  # inputs in [0, 1]
    load_weights(package, str(source))
    ours = ResNet18(10, mean=CIFAR_MEAN, std=CIFAR_STD).eval()
    load_weights(ours, str(written))
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = _first_layer(package, x), _first_layer(ours, x)  # (6, 64, 32, 32)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert (a[inner] - b[inner]).abs().max() < 1e-4
    # the border really differs (the two zero paddings mean different images), so the
    # interior check above is not vacuous
    assert (a - b).abs().max() > 1e-3


def test_written_file_has_the_usual_permissions(written):
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(written).st_mode) == 0o666 & ~umask


def test_only_conv1_and_bn1_mean_change(written):
    source, _ = from_autoattack.package_source()
    src = load_checkpoint(str(source))
    out = load_checkpoint(str(written))
    assert list(out) == list(src)
    changed = [k for k in src if not torch.equal(src[k], out[k])]
    assert changed == ["conv1.weight", "bn1.running_mean"]


def test_same_tensors_as_the_shared_weights(written, real_weights):
    """The shared file was made the same way from the same package file."""
    shared = load_checkpoint(str(real_weights))
    out = load_checkpoint(str(written))
    assert list(out) == list(shared)
    assert all(torch.equal(out[k], shared[k]) for k in shared)


@pytest.mark.slow
def test_written_weights_reach_93_percent_with_the_linear_head(written, real_subset):
    from datasets.data import load_dataset
    from models.classifier import LinearClassifier
    from utils.attacks.sweep import predictions

    model = ResNet18(10)
    load_weights(model, str(written))  # what --pretrained-path does
    test = load_dataset("imagefolder", str(real_subset), "test", workers=2)
    assert len(test) == 1017
    pred = predictions(LinearClassifier(model), test.images, 256, torch.device("cpu"))
    acc = (pred == test.labels).float().mean().item() * 100
    assert acc >= 93.0, f"{acc:.2f}%"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_package_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import now fails
    out = tmp_path / "resnet18.pt"
    assert from_autoattack.main(["--out", str(out)]) == 2
    assert "pip install pyautoattack==0.2.0" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_needs_force(tmp_path, capsys):
    out = tmp_path / "resnet18.pt"
    out.write_bytes(b"keep me")
    assert from_autoattack.main(["--out", str(out)]) == 2
    assert "--force" in _one_error_line(capsys)
    assert out.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["resnet18.pt"]


def test_force_overwrites(tmp_path, written, capsys):
    out = tmp_path / "resnet18.pt"
    out.write_bytes(b"old")
    assert from_autoattack.main(["--out", str(out), "--force"]) == 0
    printed = capsys.readouterr().out
    assert _sha256(out) in printed
    assert "pyautoattack 0.2.0" in printed
    assert _sha256(out) == _sha256(written)  # deterministic


def test_unexpected_shape_is_refused(tmp_path, monkeypatch, capsys):
    state = ResNet18(100).state_dict()  # a CIFAR-100 head: linear is (100, 512)
    source = tmp_path / "model_test.pt"
    torch.save(state, source)
    monkeypatch.setattr(from_autoattack, "package_source", lambda: (source, "test"))
    out = tmp_path / "out" / "resnet18.pt"
    assert from_autoattack.main(["--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert "linear.weight (100, 512) vs (10, 512)" in err
    assert not out.parent.exists()
