"""Shared fixtures: the real data in ../shared/data (or $CLUSTR_DATA), skipped when absent."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("CLUSTR_DATA", ROOT.parent / "shared" / "data"))
SUBSET = DATA / "cifar10-subset"
WEIGHTS = DATA / "weights" / "resnet18_cifar10.pt"

os.environ.setdefault("CLUSTR_QUIET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def real_subset() -> Path:
    if not (SUBSET / "test").is_dir():
        pytest.skip(f"real CIFAR-10 subset not found at {SUBSET} (set CLUSTR_DATA)")
    return SUBSET


@pytest.fixture(scope="session")
def real_weights() -> Path:
    if not WEIGHTS.is_file():
        pytest.skip(f"pretrained ResNet18 not found at {WEIGHTS} (set CLUSTR_DATA)")
    return WEIGHTS


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny image folder (3 classes, 32x32 PNGs) made of structured random images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny")
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 24), ("test", 6)):
        for c, name in enumerate(("alpha", "beta", "gamma")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                base = torch.zeros(3, 32, 32)
                base[c] = 0.7  # one dominant channel per class
                img = (base + 0.3 * torch.rand(3, 32, 32, generator=gen)).clamp(0, 1)
                arr = (img * 255).byte().permute(1, 2, 0).numpy()
                Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return root
