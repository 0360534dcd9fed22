"""Benchmark ClusTR against plain cross-entropy training and write docs/results/BENCHMARKS.md.

``python -m benchmarks.run [--quick] [--device cuda --amp] [--only epochs pgd seed]``: the
sections, their ratios and the seed's command are described in docs/benchmarking.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from base.cli import ArgParser, pos_int
from base.device import resolve_device
from base.errors import UsageError, exit_status
from base.progress import set_quiet
from utils.attacks.pgd import PGD
from utils.train.clustering import KMeansSettings, fit_cluster_classifier
from utils.train.embeddings import default_embed_batch

from . import measures, seed_command, workloads
from .machine import collect_env, contention_warnings, load_average, machine_info
from .report import render
from .workloads import Setup, load_data

log = logging.getLogger("benchmarks")

K, L, RESTARTS = 2, 20, 1  # clusters per class; R3's voting clusters and PGD restarts
SEED_ON_CUDA = "the seed's command is measured whole only on CUDA (on a CPU it takes days)"
SIZES = {  # flag: (full run, --quick, what it sizes); a flag given explicitly wins over both
    "m": (12, 4, "clusters per batch"),
    "d": (20, 8, "examples per cluster (batch = m*d)"),
    "train_size": (2400, 160, "training images of the R1/R2/R4 epochs"),
    "repeats": (7, 1, "timed epochs per method after one warm-up round"),
    "pgd_images": (200, 20, "test images attacked in R3"),
    "pgd_train": (5000, 600, "training images whose embeddings give R3's clusters"),
    "iterations": (10, 2, "PGD steps in R3"),
    "pgd_repeats": (7, 1, "timed sweeps per mode"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0],
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (see below)")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS),
                   help="sections to run, always in this order; none given: every section "
                        "the device runs (seed, the seed's command measured whole: CUDA only)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda[:N]")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--kmeans-device", action="store_true",
                   help="the trainers' k-means on the device (as main_clustr.py's flag)")
    p.add_argument("--data", choices=("auto", "synthetic", "real"), default="auto",
                   help="synthetic: CIFAR-shaped random images; real: the shared CIFAR-10 "
                        "subset and weights; auto: real for R3 when present, else synthetic")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get(
                       "CLUSTR_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")),
                   help="holds cifar10-subset/ and weights/ ($CLUSTR_DATA or ../shared/data)")
    p.add_argument("--seed", type=int, default=111)
    g = p.add_argument_group("sizes (defaults: full run; --quick: the smaller value)")
    for name, (full, quick, what) in SIZES.items():
        g.add_argument("--" + name.replace("_", "-"), type=pos_int,
                       help=f"{what} ({full}; --quick {quick})")
    g.add_argument("--test-size", type=pos_int, help="test images per epoch (default: a "
                   "fifth of the training images, CIFAR's proportion)")
    g.add_argument("--test-batch", type=pos_int, default=64, help="batch of the PGD sweep")
    p.add_argument("--out", type=Path, default=Path("docs/results/BENCHMARKS.md"),
                   help="the Markdown report")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "-m", "benchmarks.run", *argv])
    for name, (full, quick, _) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.test_size = args.test_size or max(10, args.train_size // 5)
    return args


def data_for(section: str, args) -> str:
    """'real' or 'synthetic' for a section, refusing --data real without the files."""
    present = ((args.data_dir / "cifar10-subset" / "train").is_dir()
               and (args.data_dir / workloads.WEIGHTS).is_file())
    if args.data == "real" and not present:
        raise UsageError(f"--data real: no cifar10-subset/ and weights/resnet18_cifar10.pt "
                         f"under {args.data_dir}; pass --data-dir or use --data synthetic")
    if args.data == "auto":
        return "real" if section == "pgd" and present else "synthetic"
    return args.data


def epochs_section(args, setup: Setup, res: dict) -> None:
    kind = data_for("epochs", args)
    log.info("epochs: %s data, %d training images, batch %d x %d", kind, args.train_size,
             args.m, args.d)
    w = workloads.make_workload(*load_data(kind, args.data_dir, args.train_size,
                                           args.test_size, args.seed), setup)
    res["epochs"] = {**measures.measure_epochs(w, args.repeats), "data": kind}
    res["phases"] = measures.epoch_phases(w)
    res["overheads"] = measures.measure_overheads(w, res["phases"].pop("embeddings"),
                                                  res["epochs"]["step_s"]["clustr"],
                                                  args.repeats)
    res["residuals"] = measures.parts_residuals(res["epochs"], res["phases"])


def pgd_section(args, setup: Setup, res: dict) -> None:
    """R3 on the classifier the CLI evaluates: the network, per-class k-means (CIFAR-10
    settings) on ``--pgd-train`` images' embeddings, the L nearest clusters voting."""
    kind, dev = data_for("pgd", args), setup.device
    log.info("PGD: %s data, %d test images", kind, args.pgd_images)
    train, test, weights = load_data(kind, args.data_dir, args.pgd_train, args.pgd_images,
                                     args.seed)
    backbone = workloads.build_model(train.num_classes, weights, dev, args.seed)
    kmeans = KMeansSettings.for_dataset("cifar10", K, args.seed)
    model = fit_cluster_classifier(backbone, train, kmeans, L, batch=default_embed_batch(dev),
                                   device=dev).to(dev)
    attack = PGD(iterations=args.iterations, restarts=RESTARTS)
    res["pgd"] = {**measures.measure_pgd(model, test, dev, attack, args.test_batch,
                                         args.pgd_repeats, args.seed), "data": kind}


def seed_section(args, setup: Setup, res: dict) -> None:
    res["seed_command"] = seed_command.measure(setup)


SECTIONS = {"epochs": epochs_section, "pgd": pgd_section, "seed": seed_section}


def run(args) -> dict:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.amp and not cuda:
        raise UsageError("--amp is bfloat16 autocast on CUDA: it needs --device cuda")
    if "seed" in (args.only or []) and not cuda:
        raise UsageError(f"--only seed: {SEED_ON_CUDA}; pass --device cuda or leave seed out")
    skipped = [] if cuda or args.only else [f"{SEED_ON_CUDA}: this run on {device} leaves it out"]
    args.only = args.only or [name for name in SECTIONS if cuda or name != "seed"]
    set_quiet(True)
    start = time.time()
    res = {"machine": machine_info(device),
           "config": {k: v for k, v in vars(args).items() if k != "command"},
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": args.command,
           "load": {"start": load_average()}, "warnings": skipped}
    setup = Setup(args.m, args.d, K, args.seed, device, args.amp, args.kmeans_device)
    for name, section in SECTIONS.items():
        if name in args.only:
            section(args, setup, res)
            res["load"][f"after {name}"] = load_average()
    if not args.quick:  # a few seconds: it runs pip and lscpu
        res["collect_env"] = collect_env()
    res["duration_s"] = time.time() - start
    res["warnings"] += contention_warnings(res["load"], res["machine"]["torch_threads"])
    return res


def run_and_write(args) -> None:
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    log.info("wrote %s", ", ".join(str(f) for f in (args.out, args.json) if f))
    for w in res["warnings"]:
        log.warning("%s", w)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    return exit_status(lambda: run_and_write(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
