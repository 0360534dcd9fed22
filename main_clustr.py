"""ClusTR: train a ResNet18 with the Magnet loss over per-class clusters, then attack it.

    python main_clustr.py --checkpoint expA --dataset cifar10 --L 20 \
        --pretrained-path pretrained_weights/resnet18.pt --lr 0.0001 --epochs 30
    python main_clustr.py --checkpoint expA_pgd --evaluate-ckpt expA/checkpoint.pth

This file only wires the pieces together; see README.md for the outputs.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np
import torch

from datasets.data import balanced_subset, load_dataset
from models.resnet import ResNet18, normalization_for
from utils.checkpoint import build_checkpoint, load_weights, save_atomic, write_text_atomic
from utils.device import resolve_device
from utils.errors import UsageError
from utils.evaluation import evaluate_checkpoint
from utils.progress import set_quiet
from utils.results import EpochLog, MetricsCSV
from utils.train_setting import params_line, parse_args
from utils.training import ClusTRTrainer, TrainConfig

log = logging.getLogger("clustr")


def load_data(args):
    train = load_dataset(args.dataset, args.data_root, "train", workers=args.workers)
    test = load_dataset(args.dataset, args.data_root, "test", workers=args.workers)
    train = balanced_subset(train, args.train_subset, args.seed)
    test = balanced_subset(test, args.test_subset, args.seed)
    return train, test


def train(args, out_dir: str, device: torch.device) -> str:
    """Train ClusTR and return the path of the last checkpoint."""
    train_set, test_set = load_data(args)
    log.info("data: %s, %d training and %d test images, %d classes", args.dataset,
             len(train_set), len(test_set), train_set.num_classes)
    mean, std = normalization_for(args.dataset)
    model = ResNet18(train_set.num_classes, mean, std)
    if args.pretrained_path:
        load_weights(model, args.pretrained_path)
    else:
        log.warning("no --pretrained-path: ClusTR starts from random weights")
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, gamma=0.1)
    cfg = TrainConfig(dataset=args.dataset, K=args.k, m=args.m, d=args.d, L=args.L,
                      normalize=not args.not_normalize, alpha=args.alpha, seed=args.seed,
                      test_batch=args.test_batch, embed_batch=args.embed_batch, amp=args.amp,
                      consistency_lambda=args.consistency_lambda, xent_lambda=args.xent_lambda,
                      mse_consistency=args.mse_consistency, actual_trades=args.actual_trades,
                      minibatch_replays=args.minibatch_replays)
    trainer = ClusTRTrainer(model, optimizer, train_set, test_set, cfg, device)
    trainer.check_batch_shape()
    trainer.refresh_clusters()
    epoch_log = EpochLog(os.path.join(out_dir, "log.txt"))
    metrics_csv = MetricsCSV(os.path.join(out_dir, "metrics.csv"))
    extra = {"args": {k: v for k, v in vars(args).items()}, "dataset": args.dataset,
             "classes": list(train_set.classes)}
    ckpt_path = os.path.join(out_dir, "checkpoint.pth")
    log.info("%d steps of %d x %d examples per epoch", trainer.sampler.steps_per_epoch(),
             args.m, args.d)
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        lr = optimizer.param_groups[0]["lr"]
        metrics = trainer.run_epoch()
        scheduler.step()
        epoch_log.append(epoch, lr, metrics.train_loss, metrics.train_acc, metrics.test_loss,
                         metrics.test_acc)
        metrics_csv.append(epoch, lr, metrics, time.time() - start)
        ckpt = build_checkpoint(model, trainer.head(), args.k, epoch, metrics.test_acc, extra,
                                assignments=trainer.clusters.assignments)
        save_atomic(ckpt, ckpt_path)
        if args.save_all:
            save_atomic(ckpt, os.path.join(out_dir, f"checkpoint_{epoch}.pth"))
        log.info("epoch %d/%d  lr %.2g  train loss %.4f acc %.2f%%  test loss %.4f acc "
                 "%.2f%%  (%.0fs)", epoch, args.epochs, lr, metrics.train_loss,
                 metrics.train_acc, metrics.test_loss, metrics.test_acc, time.time() - start)
    return ckpt_path


def run(args) -> int:
    device = resolve_device(args.device)
    set_quiet(args.quiet)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out_dir = args.checkpoint
    os.makedirs(out_dir, exist_ok=True)
    if args.evaluate_ckpt is None:
        args.L = 10 if args.L is None else args.L
        args.not_normalize = bool(args.not_normalize)
    write_text_atomic(os.path.join(out_dir, "params.txt"), params_line(args) + "\n")
    ckpt_path = args.evaluate_ckpt or train(args, out_dir, device)
    evaluate_checkpoint(args, ckpt_path, out_dir, device)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        return run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
