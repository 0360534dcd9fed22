"""Benchmark ClusTR against plain cross-entropy training and write docs/results/BENCHMARKS.md.

    python -m benchmarks.run                 # full run (the report records its duration)
    python -m benchmarks.run --quick         # smoke run of the harness
    python -m benchmarks.run --device cuda --amp --out docs/results/BENCHMARKS_cuda.md

Measured in one process (the scaling sizes in one process each), on whatever device is
present: R1 step ratio, R2 epoch ratio, R3 PGD shrinking ratio, R4 per-step overhead, and
epoch time and peak memory at 1x, 2x and 4x the training-set size.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from base.cli import ArgParser, pos_int
from base.device import resolve_device
from base.errors import UsageError, exit_status
from base.progress import set_quiet
from utils.attacks.pgd import PGD

from . import measures
from .machine import collect_env, contention_warnings, load_average, machine_info
from .report import render
from .seed_command import estimate as seed_estimate
from .seed_command import measure as seed_measure
from .workloads import Setup, default_data_dir, load_data, make_workload, real_data_present

log = logging.getLogger("benchmarks")

K, L, RESTARTS = 2, 20, 1  # clusters per class; R3's voting clusters and PGD restarts
SIZES = {  # flag: (full run, --quick, what it sizes); a flag given explicitly wins over both
    "m": (12, 4, "clusters per batch"),
    "d": (20, 8, "examples per cluster (batch = m*d)"),
    "train_size": (2400, 160, "training images of the R1/R2/R4 epochs"),
    "repeats": (7, 1, "timed epochs per method after one warm-up round"),
    "scaling_base": (1200, 80, "training images at 1x (2x and 4x follow)"),
    "scaling_repeats": (2, 1, "timed epochs per size after one warm-up epoch"),
    "pgd_images": (200, 20, "test images attacked in R3"),
    "pgd_train": (5000, 600, "training images whose embeddings give R3's clusters"),
    "iterations": (10, 2, "PGD steps in R3"),
    "pgd_repeats": (7, 1, "timed sweeps per mode"),
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0],
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke-test sizes: batch 4x8, 160 images, 1 repeat, short PGD")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                   help="sections to run (epochs = R1, R2, R4 and the epoch phases; seed = "
                        "the seed's command end to end: measured whole on CUDA, estimated "
                        "from the epochs and pgd sections on a CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda[:N]")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--kmeans-device", action="store_true",
                   help="the trainers' k-means on the device (as main_clustr.py's flag)")
    p.add_argument("--data", choices=("auto", "synthetic", "real"), default="auto",
                   help="synthetic: CIFAR-shaped random images everywhere; real: the shared "
                        "CIFAR-10 subset and weights everywhere; auto: synthetic for the "
                        "training measurements, real for R3 when present")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help="folder with cifar10-subset/ and weights/ ($CLUSTR_DATA or "
                        "../shared/data)")
    p.add_argument("--seed", type=int, default=111)
    g = p.add_argument_group("sizes (defaults: full run; --quick: the smaller value)")
    for name, (full, quick, what) in SIZES.items():
        g.add_argument("--" + name.replace("_", "-"), type=pos_int, default=None,
                       help=f"{what} ({full}; --quick {quick})")
    g.add_argument("--test-size", type=pos_int, default=None,
                   help="test images per epoch (default: a fifth of the training images, "
                        "CIFAR's proportion)")
    g.add_argument("--test-batch", type=pos_int, default=64, help="batch of the PGD sweep")
    p.add_argument("--out", type=Path, default=Path("docs/results/BENCHMARKS.md"),
                   help="the Markdown report")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--profile", type=Path, default=None,
                   help="also profile one more ClusTR epoch with torch.profiler and write "
                        "its operator tables here (epochs section)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name, (full, quick, _) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.test_size = args.test_size or max(10, args.train_size // 5)
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


def epochs_section(args, setup: Setup, res: dict) -> None:
    """R1, R2 and R4, the epoch by phases, the residuals and the embedding batches."""
    kind = data_for("epochs", args)
    log.info("epochs: %s data, %d training images, batch %d x %d", kind, args.train_size,
             args.m, args.d)
    w = make_workload(*load_data(kind, args.data_dir, args.train_size, args.test_size,
                                 args.seed), setup)
    res["epochs"] = {**measures.measure_epochs(w, args.repeats), "data": kind}
    phases = measures.epoch_phases(w)
    res["overheads"] = measures.measure_overheads(w, phases.pop("embeddings"),
                                                  res["epochs"]["step_s"]["clustr"],
                                                  args.repeats)
    res["phases"] = phases
    res["residuals"] = measures.parts_residuals(res["epochs"], phases)
    res["embed_batches"] = measures.embedding_batch_sweep(w, (64, 128, 256, 512), args.repeats,
                                                          min(512, args.train_size))
    if args.profile:
        args.profile.write_text(measures.profile_epoch(w))
        log.info("wrote %s", args.profile)


def pgd_section(args, setup: Setup, res: dict) -> None:
    """R3 on a cluster classifier fitted to ``--pgd-train`` images."""
    kind = data_for("pgd", args)
    log.info("PGD: %s data, %d test images", kind, args.pgd_images)
    train, test, weights = load_data(kind, args.data_dir, args.pgd_train, args.pgd_images,
                                     args.seed)
    model = measures.cluster_classifier(train, weights, setup.device, K, L, args.seed)
    res["pgd"] = {**measures.measure_pgd(model, test, setup.device,
                                         PGD(iterations=args.iterations, restarts=RESTARTS),
                                         args.test_batch, args.pgd_repeats, args.seed),
                  "data": kind}


def scaling_section(args, setup: Setup, res: dict) -> None:
    res["scaling"] = measures.measure_scaling(data_for("scaling", args), args.data_dir, args.scaling_base,
                                 args.test_size, setup, args.scaling_repeats)


def seed_section(args, setup: Setup, res: dict) -> None:
    """The seed's command: measured whole on CUDA, estimated from the other sections else."""
    if setup.device.type == "cuda":
        res["seed_command"] = seed_measure(setup.device, setup.amp, args.seed,
                                           kmeans_device=setup.kmeans_device)
    elif "epochs" in res and "pgd" in res:
        res["seed_command"] = seed_estimate(res)
    else:
        res["warnings"].append("the seed's command is estimated on a CPU from the epochs "
                               "and pgd sections: run them too")


SECTIONS = {"epochs": epochs_section, "pgd": pgd_section, "scaling": scaling_section,
            "seed": seed_section}


def run(args) -> dict:
    device = resolve_device(args.device)
    if args.amp and device.type != "cuda":
        raise UsageError("--amp is bfloat16 autocast on CUDA: it needs --device cuda")
    set_quiet(True)
    start = time.time()
    res = {"machine": machine_info(device),
           "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": shlex.join(["python", "-m", "benchmarks.run", *sys.argv[1:]]),
           "load": {"start": load_average()}, "warnings": []}
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
    log.info("wrote %s", args.out)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    for w in res["warnings"]:
        log.warning("%s", w)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    return exit_status(lambda: run_and_write(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
