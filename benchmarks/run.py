"""Benchmark ClusTR against plain cross-entropy training and write docs/results/BENCHMARKS.md.

    python -m benchmarks.run                 # full run (the report records its duration)
    python -m benchmarks.run --quick         # smoke run of the harness
    python -m benchmarks.run --device cuda --amp --out docs/results/BENCHMARKS_cuda.md

Measured in one process (the scaling sizes in one subprocess each), on whatever device is
present: R1 step ratio, R2 epoch ratio, R3 PGD shrinking ratio, R4 per-step overhead, and
epoch time and peak memory at 1x, 2x and 4x the training-set size.
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

import torch

from base.device import resolve_device
from base.errors import UsageError, exit_status
from base.progress import set_quiet
from utils.attacks.pgd import EPSILONS

from .machine import busy_loads, collect_env, load_average, machine_info, usable_cores
from .measures import (
    cluster_classifier,
    embedding_batch_sweep,
    epoch_phases,
    measure_epochs,
    measure_overheads,
    measure_pgd,
    parts_residuals,
    profile_epoch,
)
from .report import render
from .scaling import run_scaling
from .seed_command import estimate as seed_estimate
from .seed_command import measure as seed_measure
from .workloads import (
    default_data_dir,
    make_workload,
    real_data,
    real_data_present,
    synthetic_data,
)

log = logging.getLogger("benchmarks")

SECTIONS = ("epochs", "pgd", "scaling", "seed")
# full run / --quick; a flag given explicitly wins over both
PRESETS = {
    "m": (12, 4), "d": (20, 8), "train_size": (2400, 160), "repeats": (7, 1),
    "scaling_base": (1200, 80), "scaling_repeats": (2, 1), "pgd_images": (200, 20),
    "pgd_train": (5000, 600), "iterations": (10, 2), "pgd_repeats": (7, 1),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__
                                .splitlines()[0], formatter_class=argparse
                                .ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke-test sizes: batch 4x8, 160 images, 1 repeat, short PGD")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="sections to run (epochs = R1, R2, R4 and the epoch phases; seed = "
                        "the seed's command end to end: measured whole on CUDA, estimated "
                        "from the epochs and pgd sections on a CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda[:N]")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--kmeans-device", action="store_true",
                   help="the trainers' k-means on the device (as main_clustr.py's flag)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's "
                   "default if not given)")
    p.add_argument("--data", choices=("auto", "synthetic", "real"), default="auto",
                   help="synthetic: CIFAR-shaped random images everywhere; real: the shared "
                        "CIFAR-10 subset and weights everywhere; auto: synthetic for the "
                        "training measurements, real for R3 when present")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with cifar10-subset/ and weights/ (default $CLUSTR_DATA or "
                        "../shared/data)")
    p.add_argument("--seed", type=int, default=111)
    g = p.add_argument_group("sizes (defaults: full run; --quick: the smaller value)")
    for name, help_ in (
            ("m", "clusters per batch"), ("d", "examples per cluster (batch = m*d)"),
            ("train_size", "training images of the R1/R2/R4 epochs"),
            ("repeats", "timed epochs per method after one warm-up round"),
            ("scaling_base", "training images at 1x (2x and 4x follow)"),
            ("scaling_repeats", "timed epochs per size after one warm-up epoch"),
            ("pgd_images", "test images attacked in R3"),
            ("pgd_train", "training images whose embeddings give R3's clusters"),
            ("iterations", "PGD steps in R3"), ("pgd_repeats", "timed sweeps per mode")):
        full, quick = PRESETS[name]
        g.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{help_} ({full}; --quick {quick})")
    g.add_argument("--test-size", type=int, default=None,
                   help="test images per epoch (default: a fifth of the training images, "
                        "CIFAR's proportion)")
    g.add_argument("--k", type=int, default=2, help="clusters per class")
    g.add_argument("--L", type=int, default=20, help="nearest clusters voting in R3")
    g.add_argument("--restarts", type=int, default=1, help="PGD restarts in R3")
    g.add_argument("--test-batch", type=int, default=64, help="batch of the PGD sweep")
    p.add_argument("--out", type=Path, default=Path("docs/results/BENCHMARKS.md"),
                   help="the Markdown report")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--profile", type=Path, default=None,
                   help="also profile one more ClusTR epoch with torch.profiler and write "
                        "its operator tables here (epochs section)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name, (full, quick) in PRESETS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.test_size is None:
        args.test_size = max(10, args.train_size // 5)
    for name in (*PRESETS, "test_size", "k", "L", "restarts", "test_batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.data_dir is None:
        args.data_dir = default_data_dir()
    return args


def data_for(section: str, args) -> str:
    """'real' or 'synthetic' for a section, refusing --data real without the files."""
    present = real_data_present(args.data_dir)
    if args.data == "real" and not present:
        raise UsageError(f"--data real: no cifar10-subset/ and weights/resnet18_cifar10.pt "
                         f"under {args.data_dir}; pass --data-dir or use --data synthetic")
    if args.data == "auto":
        return "real" if section == "pgd" and present else "synthetic"
    return args.data


def training_data(args, kind: str):
    if kind == "real":
        train, test = real_data(args.data_dir, args.train_size, args.test_size, args.seed)
        return train, test, args.data_dir / "weights" / "resnet18_cifar10.pt"
    return (synthetic_data(args.train_size, args.seed),
            synthetic_data(args.test_size, args.seed + 1), None)


def run(args) -> dict:
    device = resolve_device(args.device)
    if args.amp and device.type != "cuda":
        raise UsageError("--amp is bfloat16 autocast on CUDA: it needs --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_quiet(not args.progress)
    start = time.time()
    res = {"machine": machine_info(device), "config": vars(args).copy(),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": "python -m benchmarks.run " + " ".join(map(shlex.quote, sys.argv[1:])),
           "load": {"start": load_average()}, "warnings": []}
    res["config"]["data_dir"] = str(args.data_dir)
    res["config"]["out"] = str(args.out)
    for key in ("json", "profile"):
        res["config"][key] = str(res["config"][key]) if res["config"][key] else None
    if "epochs" in args.only:
        kind = data_for("epochs", args)
        log.info("epochs: %s data, %d training images, batch %d x %d", kind, args.train_size,
                 args.m, args.d)
        train, test, weights = training_data(args, kind)
        w = make_workload(train, test, weights, args.m, args.d, args.k, args.seed, device,
                          args.amp)
        w.trainer.cfg.kmeans_device = args.kmeans_device
        res["epochs"] = measure_epochs(w, args.repeats)
        res["epochs"]["data"] = kind
        res["load"]["after epochs"] = load_average()
        phases = epoch_phases(w)
        res["overheads"] = measure_overheads(w, phases.pop("embeddings"),
                                             res["epochs"]["step_s"]["clustr"], args.repeats)
        res["phases"] = phases
        res["residuals"] = parts_residuals(res["epochs"], phases)
        res["embed_batches"] = embedding_batch_sweep(w, (64, 128, 256, 512), args.repeats,
                                                     min(512, args.train_size))
        if args.profile:
            args.profile.write_text(profile_epoch(w))
            log.info("wrote %s", args.profile)
    if "pgd" in args.only:
        kind = data_for("pgd", args)
        log.info("PGD: %s data, %d test images", kind, args.pgd_images)
        if kind == "real":
            train, test = real_data(args.data_dir, args.pgd_train, args.pgd_images, args.seed)
            weights = args.data_dir / "weights" / "resnet18_cifar10.pt"
        else:
            train, weights = synthetic_data(args.pgd_train, args.seed), None
            test = synthetic_data(args.pgd_images, args.seed + 1)
        model = cluster_classifier(train, weights, device, args.k, args.L, args.seed)
        res["pgd"] = measure_pgd(model, test, device, args.iterations, args.restarts,
                                 EPSILONS, args.test_batch, args.pgd_repeats, args.seed)
        res["pgd"]["data"] = kind
        res["load"]["after PGD"] = load_average()
    if "scaling" in args.only:
        kind = data_for("scaling", args)
        res["scaling"] = run_scaling(args.scaling_base, args.test_size, kind,
                                     args.data_dir if kind == "real" else None, args.m,
                                     args.d, args.k, args.scaling_repeats, args.seed, device,
                                     args.amp, args.threads)
        res["load"]["after scaling"] = load_average()
    if "seed" in args.only:
        if device.type == "cuda":
            res["seed_command"] = seed_measure(device, args.amp, args.seed,
                                                kmeans_device=args.kmeans_device)
            res["load"]["after the seed's command"] = load_average()
        elif "epochs" in res and "pgd" in res:
            res["seed_command"] = seed_estimate(res)
        else:
            res["warnings"].append("the seed's command is estimated on a CPU from the epochs "
                                   "and pgd sections: run them too")
    if not args.quick:  # a few seconds: it runs pip and lscpu
        res["collect_env"] = collect_env()
    res["duration_s"] = time.time() - start
    res["warnings"] += contention_warnings(res["load"], res["machine"]["torch_threads"])
    return res


def contention_warnings(load: dict, threads: int) -> list[str]:
    """One warning where other work shared the processor (``machine.busy_loads``)."""
    cores, own = usable_cores(), min(threads, usable_cores())
    busy = busy_loads(load, threads)
    if not busy:
        return []
    return [f"the machine was busy ({', '.join(f'{k} {v:.1f}' for k, v in busy.items())} "
            f"load average on {cores} cores, of which this harness accounts for at most "
            f"{own}): other processes shared the processor, so these times are not "
            f"representative and the targets are not judged by them."]


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    return exit_status(lambda: run_and_write(parse_args(argv)))


def run_and_write(args) -> None:
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(res))
    log.info("wrote %s", args.out)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    for w in res["warnings"]:
        log.warning("%s", w)


if __name__ == "__main__":
    os.environ.setdefault("CLUSTR_QUIET", "1")
    sys.exit(main())
