"""Data loading: image folders, balanced subsets, the tensor augmentation, offline errors."""
import pytest
import torch

from base.errors import UsageError
from datasets.data import augment, balanced_subset, load_dataset


def test_image_folder_loads_uint8(tiny_folder):
    data = load_dataset("imagefolder", str(tiny_folder), "train")
    assert data.images.dtype == torch.uint8 and data.images.shape == (72, 3, 32, 32)
    assert data.classes == ["alpha", "beta", "gamma"]
    assert torch.equal(torch.bincount(data.labels), torch.tensor([24, 24, 24]))


def test_balanced_subset_is_seeded_and_balanced(tiny_folder):
    data = load_dataset("imagefolder", str(tiny_folder), "train")
    a = balanced_subset(data, 30, seed=5)
    b = balanced_subset(data, 30, seed=5)
    c = balanced_subset(data, 30, seed=6)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    assert torch.bincount(a.labels).tolist() == [10, 10, 10]
    assert torch.equal(a.images, data.images[a.indices])


def test_augment_is_a_crop_of_the_padded_image_possibly_flipped():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = augment(x, "cifar10", gen)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for n in range(16):
        found = False
        for dy in range(9):
            for dx in range(9):
                crop = padded[n, :, dy:dy + 32, dx:dx + 32]
                if torch.equal(out[n], crop) or torch.equal(out[n], crop.flip(2)):
                    found = True
        assert found
    assert torch.equal(augment(x, "svhn", gen), x)


def test_missing_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="train/<class>"):
        load_dataset("imagefolder", str(tmp_path), "train")


def test_wrong_image_size_refused(tmp_path):
    from PIL import Image
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (28, 28)).save(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(UsageError, match="28x28.*32x32"):
        load_dataset("imagefolder", str(tmp_path), "train")


def test_offline_cifar_names_folder_and_files(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*a, **k):
        raise RuntimeError("network unreachable")
    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(UsageError, match="cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path), "train")
