"""Result files compared byte for byte with files written by an earlier version of the code.

A tiny cluster checkpoint (a seeded ResNet18 and k-means clusters on the synthetic
``tiny_folder``) is evaluated with ``--strong --save-adv``, 2 iterations and 2 restarts, on
the CPU. ``tests/data/golden_eval/`` holds what the code wrote before the attack loops were
merged into one engine; a change to the attacks, their random starts, their restart rules or
the result writers shows up here as a diff. Run with ``CLUSTR_WRITE_GOLDEN=1`` to rewrite the
files (only after a deliberate change of the results).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import main_clustr
from datasets.data import load_dataset
from models.resnet import ResNet18, normalization_for
from utils.outputs import files
from utils.train.clustering import KMeansSettings, fit_cluster_classifier

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_eval"
WRITTEN_ON = GOLDEN / "written_on.json"  # float results are exact only on the same build
EXACT = [files.PAPER_RESULTS] + [files.PREDICTIONS.format(eps=e) for e in (2, 8, 16, 25.5)]


@pytest.fixture(scope="module")
def close_folder(tmp_path_factory) -> Path:
    """3 classes of 32x32 PNGs that differ by a faint colour shift, so that small
    perturbations flip some predictions and not others."""
    from PIL import Image

    root = tmp_path_factory.mktemp("close")
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("test", 4)):
        for c, name in enumerate(("alpha", "beta", "gamma")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = 0.35 + 0.3 * torch.rand(3, 32, 32, generator=gen)
                img[c] += 0.04
                arr = (img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
                Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, close_folder):
    train = load_dataset("imagefolder", str(close_folder), "train", workers=1)
    mean, std = normalization_for("imagefolder")
    with torch.random.fork_rng():
        torch.manual_seed(5)
        backbone = ResNet18(train.num_classes, mean, std).eval()
    model = fit_cluster_classifier(backbone, train, KMeansSettings.for_dataset("imagefolder", 2),
                                   L=4, batch=72)
    head = model.head
    ckpt = {"state_dict": backbone.state_dict(), "epoch": 0, "test_acc": 0.0,
            "cluster_centers": head.centers, "cluster_classes": head.classes,
            "variance": head.variance, "K": 2, "L": 4, "normalize_probs": True}
    path = tmp_path_factory.mktemp("golden_ckpt") / "checkpoint.pth"
    torch.save(ckpt, path)
    return path


def comparable(out: Path) -> dict[str, bytes]:
    """Every deterministic result: the paper's CSV files as written, the strong table
    without its seconds, and the adversarial images as a digest of their tensors."""
    found = {name: (out / name).read_bytes() for name in EXACT}
    lines = (out / files.STRONG_RESULTS).read_text().splitlines()
    found[files.STRONG_RESULTS] = "".join(line.rsplit(",", 1)[0] + "\n"
                                          for line in lines).encode()
    adv = torch.load(out / files.ADVERSARIAL, weights_only=True)
    digest = {}
    for key, value in sorted(_flat(adv)):
        digest[key] = hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest() \
            if isinstance(value, torch.Tensor) else repr(value)
    found["adversarial_digest.json"] = (json.dumps(digest, indent=1) + "\n").encode()
    return found


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def machine() -> dict:
    """What exact CPU floating-point results depend on: torch's build and its vector ISA."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def test_result_files_match_the_golden_files(tiny_ckpt, close_folder, tmp_path):
    writing = bool(os.environ.get("CLUSTR_WRITE_GOLDEN"))
    if not writing and json.loads(WRITTEN_ON.read_text()) != machine():
        pytest.skip(f"golden files written with {WRITTEN_ON.read_text().strip()}; here "
                    f"{machine()}: bitwise results differ between builds")
    out = tmp_path / "ev"
    argv = ["--checkpoint", str(out), "--evaluate-ckpt", str(tiny_ckpt), "--dataset",
            "imagefolder", "--data-root", str(close_folder), "--iterations", "2",
            "--restarts", "2", "--attack-batch", "7", "--workers", "1", "--quiet",
            "--device", "cpu", "--strong", "--save-adv"]
    assert main_clustr.main(argv) == 0
    found = comparable(out)
    if writing:
        for name, data in found.items():
            (GOLDEN / name).write_bytes(data)
        WRITTEN_ON.write_text(json.dumps(machine()) + "\n")
    for name, data in found.items():
        assert data == (GOLDEN / name).read_bytes(), f"{name} differs from the golden file"
