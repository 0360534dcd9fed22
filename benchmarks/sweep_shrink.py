"""Cost of the paper's PGD sweep with and without shrinking the batch, in one run.

Builds the cluster classifier of pretrained weights as the CLI does (per-class k-means with
K clusters on the un-augmented training embeddings, L nearest clusters), then runs the same
sweep twice on the test set: examples that stop being classified correctly leave the batch
(``shrink``), or stay in it masked (``mask``). Prints one JSON object: seconds and robust
accuracy per eps for both, how many per-example predictions differ, and the load average.
On a shared machine wall times depend on the load: the process CPU seconds are the fairer
comparison, and times should only be compared within one run.

    python benchmarks/sweep_shrink.py --data-root ../shared/data/cifar10-subset \
        --weights ../shared/data/weights/resnet18_cifar10.pt --iterations 10 --restarts 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.data import balanced_subset, load_dataset  # noqa: E402
from models.resnet import ResNet18, normalization_for  # noqa: E402
from utils.checkpoint import load_weights  # noqa: E402
from utils.clustering import fit_cluster_classifier  # noqa: E402
from utils.evaluation import EPSILONS, run_sweep  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", required=True,
                   help="image folder with train/<class>/ and test/<class>/")
    p.add_argument("--weights", required=True, help="ResNet18 state_dict")
    p.add_argument("--dataset", default="imagefolder",
                   help="data set name (normalisation and k-means settings)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--L", type=int, default=20)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--test-batch", type=int, default=64)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--seed", type=int, default=111)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def sweep_summary(result, seconds: float, cpu_seconds: float) -> dict:
    return {"seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "clean_acc": result.clean_acc,
            "robust_acc": {f"{r.eps:g}": r.accuracy(result.labels) for r in result.per_eps},
            "seconds_per_eps": {f"{r.eps:g}": round(r.seconds, 1) for r in result.per_eps},
            "gradient_steps": int(sum(int(r.steps.sum()) for r in result.per_eps))}


def measure(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    train = load_dataset(args.dataset, args.data_root, "train")
    test = balanced_subset(load_dataset(args.dataset, args.data_root, "test"),
                           args.test_subset, args.seed)
    mean, std = normalization_for(args.dataset)
    backbone = ResNet18(train.num_classes, mean, std)
    load_weights(backbone, args.weights)
    start = time.perf_counter()
    model = fit_cluster_classifier(backbone, train, args.dataset, args.k, args.L,
                                   seed=args.seed, batch=256)
    report = {"test_images": len(test), "train_images": len(train), "K": args.k, "L": args.L,
              "iterations": args.iterations, "restarts": args.restarts,
              "test_batch": args.test_batch, "threads": torch.get_num_threads(),
              "cluster_fit_seconds": round(time.perf_counter() - start, 1),
              "loadavg_before": os.getloadavg()}
    results = {}
    for mode in ("shrink", "mask"):
        start, cpu = time.perf_counter(), time.process_time()
        results[mode] = run_sweep(model, test, EPSILONS, args.iterations, args.restarts,
                                  args.seed, args.test_batch, "cpu", shrink=mode == "shrink")
        report[mode] = sweep_summary(results[mode], time.perf_counter() - start,
                                     time.process_time() - cpu)
    report["loadavg_after"] = os.getloadavg()
    report["speedup"] = round(report["mask"]["seconds"] / report["shrink"]["seconds"], 2)
    report["cpu_speedup"] = round(report["mask"]["cpu_seconds"]
                                  / report["shrink"]["cpu_seconds"], 2)
    report["differing_predictions"] = {
        f"{a.eps:g}": int((a.adv_pred != b.adv_pred).sum())
        for a, b in zip(results["shrink"].per_eps, results["mask"].per_eps)}
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    report = json.dumps(measure(args), indent=2)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
