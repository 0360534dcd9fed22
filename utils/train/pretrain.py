"""Cross-entropy pre-training of the CIFAR ResNet18: the weights ``--pretrained-path`` takes.

    python -m utils.train.pretrain --dataset cifar10 --data-root ./data \
        --out pretrained_weights/resnet18.pt --epochs 200

The standard CIFAR recipe through the linear head, and with ``--adversarial`` the
cross-entropy baseline of fast adversarial training (Wong et al. 2020): docs/usage.md. After
every epoch the weights are written atomically as a plain ``state_dict`` with the original's
key names, so an interrupted run still leaves a usable file.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from base.cli import ArgParser, config, nonneg_float, nonneg_int, pos_float, pos_int, run_command
from base.device import resolve_device
from base.errors import UsageError
from base.io import save_atomic
from base.progress import progress, set_quiet
from base.tensors import autocast, eval_mode, to_device
from datasets.data import (
    DATASETS,
    ImageData,
    augment,
    balanced_subset,
    check_available,
    load_dataset,
)
from models.checkpoint import load_weights
from models.resnet import ResNet18, normalization_for
from utils.outputs.output_files import check_outputs
from utils.train.consistency import PGD_STEP, RADIUS, maximise

log = logging.getLogger("clustr")

SCHEDULES = ("cosine", "multistep", "onecycle")
ADVERSARIAL = ("none", "fgsm", "pgd")
FGSM_STEP = 1.25 * RADIUS  # fast adversarial training's alpha: 10/255 at eps 8/255
PGD_STEPS = 7  # --adv-steps default, as fast_adversarial's train_pgd.py


@dataclass
class PretrainConfig:
    dataset: str
    epochs: int = 200
    batch_size: int = 128
    test_batch: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = (100, 150)  # for the multi-step schedule (gamma 0.1)
    seed: int = 111
    amp: bool = False
    adversarial: str = "none"  # or "fgsm" / "pgd": train on adversarial examples
    adv_steps: int = PGD_STEPS  # steps of 2/255 with "pgd"


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig, steps_per_epoch: int = 1):
    """SGD with momentum and weight decay, and its learning-rate schedule: per epoch, or per
    step for ``onecycle`` (a triangle from 0 up to ``cfg.lr`` at half of the ``epochs *
    steps_per_epoch`` steps and back to 0, fast adversarial training's cyclic rate)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    if cfg.schedule == "onecycle":
        total = cfg.epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: max(0.0, 1.0 - abs(2.0 * t / total - 1.0)))
    elif cfg.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.milestones), gamma=0.1)
    return optimizer, scheduler


def adversarial_batch(model: ResNet18, x: torch.Tensor, y: torch.Tensor, cfg: PretrainConfig,
                      generator: torch.Generator) -> torch.Tensor:
    """x itself, or its FGSM / PGD examples maximising the linear head's cross-entropy from a
    uniform start in the ball drawn from ``generator``, by ``maximise``: eval mode, input
    gradients only (fast_adversarial crafts in train mode), float32."""
    if cfg.adversarial == "none":
        return x
    start = torch.empty(x.shape).uniform_(-RADIUS, RADIUS, generator=generator)

    def objective(xa):
        return F.cross_entropy(model.classify(xa), y, reduction="none")

    step, steps = (FGSM_STEP, 1) if cfg.adversarial == "fgsm" else (PGD_STEP, cfg.adv_steps)
    return maximise(model, x, objective, start, step, steps)


def train_one_epoch(model: ResNet18, optimizer: torch.optim.Optimizer, data: ImageData,
                    cfg: PretrainConfig, generator: torch.Generator,
                    device: torch.device, step_scheduler=None) -> tuple[float, float]:
    """One shuffled pass of augmented (with ``cfg.adversarial``, adversarial) batches;
    (mean loss, accuracy %) over the pass. ``step_scheduler`` is stepped after every
    optimiser step (the one-cycle schedule)."""
    model.train()
    order = torch.randperm(len(data), generator=generator)
    loss_sum, correct = 0.0, 0
    bar = progress(range(0, len(data), cfg.batch_size), desc="pretrain", leave=False)
    for start in bar:
        rows = order[start:start + cfg.batch_size]
        x = to_device(augment(data.images[rows], cfg.dataset, generator), device)
        y = data.labels[rows].to(device)
        x = adversarial_batch(model, x, y, cfg, generator)
        with autocast(device, cfg.amp):
            logits = model.classify(x).float()  # (B, C)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at example {start}: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        loss_sum += loss.item() * len(rows)
        correct += int((logits.argmax(1) == y).sum())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss_sum / len(data), 100.0 * correct / len(data)


@torch.no_grad()
def head_metrics(model: ResNet18, data: ImageData, batch: int, device: torch.device,
                 amp: bool = False) -> tuple[float, float]:
    """(mean cross-entropy, accuracy %) of the linear head on un-augmented images."""
    loss_sum, correct = 0.0, 0
    with eval_mode(model):
        for start in progress(range(0, len(data), batch), desc="test", leave=False):
            x = to_device(data.images[start:start + batch], device)
            y = data.labels[start:start + batch].to(device)
            with autocast(device, amp):
                logits = model.classify(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return loss_sum / max(1, len(data)), 100.0 * correct / max(1, len(data))


def pretrain(model: ResNet18, train: ImageData, test: ImageData, cfg: PretrainConfig,
             device: torch.device, out: str | None = None) -> list[dict]:
    """Train ``model`` with cross-entropy; one history row per epoch; saves to ``out``."""
    generator = torch.Generator().manual_seed(cfg.seed)
    per_step = cfg.schedule == "onecycle"
    optimizer, scheduler = make_optimizer(model, cfg, math.ceil(len(train) / cfg.batch_size))
    history = []
    for epoch in range(1, cfg.epochs + 1):
        start = time.time()
        lr = optimizer.param_groups[0]["lr"]  # at the epoch's start
        train_loss, train_acc = train_one_epoch(model, optimizer, train, cfg, generator, device,
                                                scheduler if per_step else None)
        if not per_step:
            scheduler.step()
        test_loss, test_acc = head_metrics(model, test, cfg.test_batch, device, cfg.amp)
        if out:  # the original's keys, CPU tensors, no normalisation buffers
            save_atomic({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, out)
        row = dict(epoch=epoch, lr=lr, train_loss=train_loss, train_acc=train_acc,
                   test_loss=test_loss, test_acc=test_acc, seconds=time.time() - start)
        history.append(row)
        log.info("epoch %d/%d  lr %.3g  train loss %.4f acc %.2f%%  test loss %.4f acc "
                 "%.2f%%  (%.0fs)", epoch, cfg.epochs, lr, train_loss, train_acc, test_loss,
                 test_acc, row["seconds"])
    return history


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m utils.train.pretrain",
                description="Cross-entropy pre-training of the CIFAR ResNet18 for "
                            "--pretrained-path.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=DATASETS, help="data set")
    p.add_argument("--data-root", default="./data", help="data folder (as main_clustr.py)")
    p.add_argument("--out", default="pretrained_weights/resnet18.pt",
                   help="weight file to write (a plain state_dict)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--epochs", type=pos_int, default=200, help="training epochs")
    p.add_argument("--batch-size", type=pos_int, default=128, help="training batch size")
    p.add_argument("--test-batch", type=pos_int, default=256, help="evaluation batch size")
    p.add_argument("--lr", type=pos_float, default=0.1,
                   help="initial SGD learning rate (the peak with --schedule onecycle)")
    p.add_argument("--momentum", type=nonneg_float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=nonneg_float, default=5e-4, help="weight decay")
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="learning-rate schedule: per epoch (cosine, multistep) or per step "
                        "(onecycle: 0 -> --lr at half of the steps -> 0); none given: "
                        "cosine, or onecycle with --adversarial fgsm/pgd")
    p.add_argument("--milestones", type=pos_int, nargs="*", default=[100, 150],
                   help="epochs at which the multistep schedule multiplies lr by 0.1")
    p.add_argument("--seed", type=int, default=111, help="seed of weights, order, augmentation")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=nonneg_int, default=4,
                   help="threads decoding image-folder files at load time")
    p.add_argument("--train-subset", type=pos_int, default=None, metavar="N",
                   help="seeded, class-balanced subset of N training images")
    p.add_argument("--test-subset", type=pos_int, default=None, metavar="N",
                   help="seeded, class-balanced subset of N test images")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--pretrained-path", default=None, metavar="PATH",
                   help="start from these ResNet18 weights (as main_clustr.py's) instead of "
                        "random ones")
    p.add_argument("--adversarial", default="none", choices=ADVERSARIAL,
                   help="train on adversarial examples of the cross-entropy, eps 8/255: fgsm "
                        "= one step of 10/255 from a uniform start (fast adversarial "
                        "training), pgd = --adv-steps steps of 2/255")
    p.add_argument("--adv-steps", type=pos_int, default=None, metavar="N",
                   help=f"PGD steps with --adversarial pgd (none given: {PGD_STEPS})")
    return p


def run(args: argparse.Namespace) -> int:
    check_outputs({"--out": args.out}, "--force", args.force, make_folder=True)
    if args.momentum >= 1:
        raise UsageError(f"--momentum {args.momentum}: must be below 1")
    if args.adv_steps is not None and args.adversarial != "pgd":
        raise UsageError(f"--adv-steps {args.adv_steps} applies to --adversarial pgd only")
    if args.pretrained_path and not os.path.isfile(args.pretrained_path):
        raise UsageError(f"--pretrained-path {args.pretrained_path}: no such file")
    args.adv_steps = args.adv_steps or PGD_STEPS
    args.schedule = args.schedule or ("cosine" if args.adversarial == "none" else "onecycle")
    device = resolve_device(args.device)
    check_available(args.dataset, args.data_root)  # before anything is read
    set_quiet(args.quiet)
    torch.manual_seed(args.seed)
    train = balanced_subset(load_dataset(args.dataset, args.data_root, "train",
                                         workers=args.workers), args.train_subset, args.seed)
    test = balanced_subset(load_dataset(args.dataset, args.data_root, "test",
                                        workers=args.workers), args.test_subset, args.seed)
    log.info("pre-training a ResNet18 on %s: %d training and %d test images, %d classes",
             args.dataset, len(train), len(test), train.num_classes)
    model = ResNet18(train.num_classes, *normalization_for(args.dataset))
    if args.pretrained_path:
        load_weights(model, args.pretrained_path)
        log.info("starting from %s", args.pretrained_path)
    model.to(device, memory_format=torch.channels_last)
    if args.adversarial != "none":
        log.info("adversarial training: %s at eps 8/255%s, %s schedule", args.adversarial,
                 f", {args.adv_steps} steps" if args.adversarial == "pgd" else "",
                 args.schedule)
    cfg = config(PretrainConfig, args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    pretrain(model, train, test, cfg, device, out=args.out)
    log.info("wrote %s (use it with main_clustr.py --pretrained-path %s)", args.out, args.out)
    return 0


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
