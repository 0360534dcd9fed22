"""Cross-entropy pre-training: it learns, and its file is what ``--pretrained-path`` takes."""
from __future__ import annotations

import math

import torch

from base.io import load_checkpoint
from datasets.data import balanced_subset, load_dataset
from models.checkpoint import load_weights
from models.resnet import ResNet18
from utils.train.pretrain import PretrainConfig, main, pretrain

CPU = torch.device("cpu")


def test_a_tiny_run_lowers_the_loss(tiny_folder):
    train = balanced_subset(load_dataset("imagefolder", str(tiny_folder), "train", workers=0),
                            24, 0)
    test = balanced_subset(load_dataset("imagefolder", str(tiny_folder), "test", workers=0),
                           3, 0)
    torch.manual_seed(0)
    model = ResNet18(3)
    cfg = PretrainConfig(dataset="imagefolder", epochs=3, batch_size=12, lr=0.05, seed=0)
    history = pretrain(model, train, test, cfg, CPU)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert all(math.isfinite(row[k]) for row in history
               for k in ("train_loss", "train_acc", "test_loss", "test_acc"))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["lr"] < history[0]["lr"]  # the cosine schedule decays


def test_cli_output_loads_with_pretrained_path(tiny_folder, tmp_path, caplog):
    out = tmp_path / "weights" / "resnet18.pt"
    common = ["--dataset", "imagefolder", "--data-root", str(tiny_folder), "--out", str(out),
              "--epochs", "1", "--batch-size", "12", "--train-subset", "12",
              "--test-subset", "3", "--workers", "0", "--quiet"]
    assert main(common) == 0
    sd = load_checkpoint(str(out))
    assert list(sd) == list(ResNet18(3).state_dict())  # plain state_dict, original keys
    model = ResNet18(3)
    load_weights(model, str(out))
    assert torch.equal(model.conv1.weight, sd["conv1.weight"])

    before = out.read_bytes()
    assert main(common) == 2  # refuses to overwrite ...
    assert out.read_bytes() == before
    assert main(common + ["--force"]) == 0  # ... unless told to

    from main_clustr import main as clustr_main

    caplog.clear()
    rc = clustr_main(["--checkpoint", str(tmp_path / "exp"), "--dataset", "imagefolder",
                      "--data-root", str(tiny_folder), "--pretrained-path", str(out),
                      "--k", "1", "--m", "3", "--d", "4", "--L", "3", "--epochs", "1",
                      "--iterations", "1", "--restarts", "1", "--train-subset", "12",
                      "--test-subset", "3", "--workers", "0", "--quiet"])
    assert rc == 0
    assert "random weights" not in caplog.text
    assert (tmp_path / "exp" / "checkpoint.pth").is_file()
