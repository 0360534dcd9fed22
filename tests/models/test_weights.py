"""Pretrained weights are copied by name, strictly, with a shape check."""
import pytest
import torch

from base.errors import UsageError
from models.checkpoint import load_weights
from models.resnet import ResNet18


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return ResNet18(10).state_dict()


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"net": sd},
    lambda sd: {"model": sd},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
])
def test_wrappers_and_prefixes_accepted(tmp_path, reference, wrap):
    path = tmp_path / "w.pt"
    torch.save(wrap(reference), path)
    model = ResNet18(10)
    load_weights(model, str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_renamed_key_refused(tmp_path, reference):
    sd = dict(reference)
    sd["layer1.0.conv_one.weight"] = sd.pop("layer1.0.conv1.weight")
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(UsageError, match="missing: layer1.0.conv1.weight.*unexpected: "
                                         "layer1.0.conv_one.weight"):
        load_weights(ResNet18(10), str(tmp_path / "w.pt"))


def test_wrong_shape_refused(tmp_path, reference):
    sd = dict(reference)
    sd["linear.weight"] = torch.zeros(100, 512)
    sd["linear.bias"] = torch.zeros(100)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(UsageError, match="mis-shaped.*linear.weight"):
        load_weights(ResNet18(10), str(tmp_path / "w.pt"))


def test_not_a_weight_file_refused(tmp_path):
    (tmp_path / "w.pt").write_text("hello")
    with pytest.raises(UsageError, match="not a readable PyTorch file"):
        load_weights(ResNet18(10), str(tmp_path / "w.pt"))


def test_normalisation_buffers_stay_out_of_state_dict():
    model = ResNet18(10)
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 512)
    assert model.classify(torch.rand(2, 3, 32, 32)).shape == (2, 10)
