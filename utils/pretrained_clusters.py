"""The untouched pretrained network as a cluster classifier: ClusTR at epoch 0.

Embeds the un-augmented training set with the pretrained ResNet18 in eval mode, runs the
per-class k-means of training (k-means++, the data set's settings, fixed seed), computes
sigma^2, and writes a checkpoint with the original's keys (``epoch`` 0) that
``main_clustr.py --evaluate-ckpt`` evaluates like any trained one. No weight changes:
this is exactly the state ClusTR training starts its first epoch from.

    python -m utils.pretrained_clusters --pretrained-path WEIGHTS.pt --data-root DIR \
        --dataset imagefolder --k 2 --L 20 --out runs/pretrained_clusters/checkpoint.pth
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from base.cli import run_command
from base.device import resolve_device
from base.errors import UsageError
from base.io import save_atomic
from base.progress import set_quiet
from datasets.data import DATASETS, balanced_subset, load_dataset
from models.checkpoint import build_checkpoint, load_weights
from models.resnet import ResNet18, normalization_for
from utils.train.clustering import KMeansSettings, fit_cluster_classifier
from utils.train.embeddings import compute_embeddings

log = logging.getLogger("clustr")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.pretrained_clusters",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--dataset", default="cifar10", choices=DATASETS)
    p.add_argument("--data-root", default="./data")
    p.add_argument("--pretrained-path", required=True, help="ResNet18 weights")
    p.add_argument("--k", type=int, default=2, help="clusters per class")
    p.add_argument("--L", type=int, default=20, help="nearest clusters used at inference")
    p.add_argument("--seed", type=int, default=111, help="k-means random state")
    p.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="seeded, class-balanced subset of N training images")
    p.add_argument("--test-subset", type=int, default=None, metavar="N",
                   help="test images for the checkpoint's test_acc")
    p.add_argument("--embed-batch", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def write_clusters(args) -> None:
    """The epoch-0 ClusTR checkpoint of the pretrained weights, written to ``args.out``."""
    set_quiet(args.quiet)
    start = time.time()
    device = resolve_device(args.device)
    train = balanced_subset(load_dataset(args.dataset, args.data_root, "train",
                                         workers=args.workers), args.train_subset, args.seed)
    test = balanced_subset(load_dataset(args.dataset, args.data_root, "test",
                                        workers=args.workers), args.test_subset, args.seed)
    model = ResNet18(train.num_classes, *normalization_for(args.dataset))
    load_weights(model, args.pretrained_path)
    model.to(device).eval()
    if args.L > train.num_classes * args.k:
        raise UsageError(f"--L {args.L} is larger than the {train.num_classes * args.k} "
                         f"clusters ({train.num_classes} classes x --k {args.k})")
    head = fit_cluster_classifier(model, train, KMeansSettings.for_dataset(
        args.dataset, args.k, args.seed), args.L, batch=args.embed_batch, device=device).head
    test_emb = compute_embeddings(model, test.images, args.embed_batch, device,
                                  desc="embed test")
    test_acc = (head.predict(test_emb) == test.labels).float().mean()  # on the CPU
    log.info("pretrained clusters: %d training images, %d clusters, test accuracy %.2f%% on "
             "%d images", len(train), head.num_clusters, 100 * test_acc.item(), len(test))
    extra = {"args": vars(args), "dataset": args.dataset, "classes": list(train.classes)}
    ckpt = build_checkpoint(model, head, args.k, 0, 100 * test_acc.item(), extra)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_atomic(ckpt, args.out)
    log.info("wrote %s (%.0fs)", args.out, time.time() - start)


def main(argv=None) -> int:
    return run_command(build_parser(), write_clusters, argv)


if __name__ == "__main__":
    sys.exit(main())
