"""The cross-entropy adversarial-training baseline: ``python -m utils.train.pretrain
--adversarial`` from given weights, and its file evaluated through ``--evaluate-ckpt``."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from models.resnet import ResNet18
from utils.train.consistency import RADIUS as EPS
from utils.train.pretrain import PretrainConfig, adversarial_batch, main, make_optimizer


def tiny_net() -> ResNet18:
    torch.manual_seed(0)
    return ResNet18(3).train()


@pytest.mark.parametrize("mode, steps", [("fgsm", 1), ("pgd", 3)])
def test_adversarial_batch_stays_in_the_ball_raises_the_loss_and_leaves_gradients(mode, steps):
    model = tiny_net()
    x = torch.rand(4, 3, 32, 32)
    x[:, :, 0, 0] = 1.0  # image-range edges
    x[:, :, 0, 1] = 0.0
    y = torch.tensor([0, 1, 2, 0])
    cfg = PretrainConfig(dataset="imagefolder", adversarial=mode, adv_steps=steps)
    gen = torch.Generator().manual_seed(3)
    copy = torch.Generator().set_state(gen.get_state())
    x_adv = adversarial_batch(model, x, y, cfg, gen)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    start = (x + torch.empty(x.shape).uniform_(-EPS, EPS, generator=copy)).clamp(0, 1)
    with torch.no_grad():
        model.eval()
        loss_start = F.cross_entropy(model.classify(start), y)
        loss_adv = F.cross_entropy(model.classify(x_adv), y)
    assert loss_adv > loss_start
    if mode == "fgsm":  # one step of 1.25 eps from the start: every pixel moved off it
        inside = (x > EPS) & (x < 1 - EPS)
        assert ((x_adv - start)[inside].abs() > 1 / 255).float().mean() > 0.5
    none = PretrainConfig(dataset="imagefolder")
    assert adversarial_batch(model, x, y, none, gen) is x


def test_onecycle_rises_to_lr_at_half_and_falls_to_zero():
    model = torch.nn.Linear(2, 2)
    cfg = PretrainConfig(dataset="imagefolder", epochs=2, lr=0.2, schedule="onecycle")
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch=5)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == 0 and rates[5] == pytest.approx(0.2) and rates[10] == pytest.approx(0)
    assert rates[:6] == sorted(rates[:6]) and rates[5:] == sorted(rates[5:], reverse=True)


def test_missing_or_misused_flags_are_refused(tmp_path, capsys):
    out = str(tmp_path / "w.pt")
    assert main(["--out", out, "--pretrained-path", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pretrained-path" in err[0] and "no such file" in err[0]
    assert main(["--out", out, "--adv-steps", "3"]) == 2  # PGD only
    assert "--adversarial pgd" in capsys.readouterr().err
    for bad in (["--adversarial", "cw"], ["--adversarial", "pgd", "--adv-steps", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["--out", out, *bad])
        assert exc.value.code == 2
    assert not (tmp_path / "w.pt").exists()


def test_fgsm_baseline_from_given_weights_evaluates_through_evaluate_ckpt(tiny_folder,
                                                                           tmp_path, caplog):
    start = tmp_path / "start.pt"
    torch.save(tiny_net().state_dict(), start)
    out = tmp_path / "fgsm.pt"
    with caplog.at_level("INFO", logger="clustr"):
        assert main(["--dataset", "imagefolder", "--data-root", str(tiny_folder),
                     "--epochs", "1", "--batch-size", "12", "--train-subset", "12",
                     "--test-subset", "3", "--workers", "0", "--quiet", "--pretrained-path",
                     str(start), "--out", str(out), "--adversarial", "fgsm"]) == 0
    assert "fgsm at eps 8/255, onecycle schedule" in caplog.text
    first, trained = torch.load(start), torch.load(out)
    assert list(trained) == list(first)  # a plain state_dict with the original's keys
    # one step, taken at the cycle's learning rate of 0: the starting weights themselves,
    # while BatchNorm's running statistics saw the (adversarial) batch
    assert torch.equal(trained["conv1.weight"], first["conv1.weight"])
    assert not torch.equal(trained["bn1.running_mean"], first["bn1.running_mean"])

    from main_clustr import main as clustr_main

    exp = tmp_path / "eval"
    rc = clustr_main(["--checkpoint", str(exp), "--evaluate-ckpt", str(out), "--dataset",
                      "imagefolder", "--data-root", str(tiny_folder), "--test-subset", "3",
                      "--iterations", "1", "--restarts", "1", "--workers", "0", "--quiet",
                      "--device", "cpu", "--strong"])
    assert rc == 0
    summary = json.loads((exp / "eval_summary.json").read_text())
    assert summary["classifier"] == "linear head"
    assert (exp / "attack_results_strong.csv").is_file()
