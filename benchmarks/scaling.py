"""Epoch time and peak memory at 1x, 2x and 4x the training-set size, one process each.

Peak memory is a per-process figure (the peak resident set size on a CPU, torch's peak
CUDA allocation on a GPU), so each size runs in its own subprocess:

    python -m benchmarks.scaling --size 1200 ...   # prints one JSON line
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import torch

from .machine import peak_memory_mib, reset_peak_memory
from .timing import median, timed

log = logging.getLogger("benchmarks")

MULTIPLIERS = (1, 2, 4)


def worker_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling",
                                description="Time ClusTR epochs on one training-set size.")
    p.add_argument("--size", type=int, required=True, help="training images")
    p.add_argument("--test-size", type=int, required=True)
    p.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--m", type=int, default=12)
    p.add_argument("--d", type=int, default=20)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed epochs after one warm-up")
    p.add_argument("--seed", type=int, default=111)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def run_worker(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from .workloads import make_workload, real_data, synthetic_data

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data == "real":
        train, test = real_data(Path(args.data_dir), args.size, args.test_size, args.seed)
        weights = Path(args.data_dir) / "weights" / "resnet18_cifar10.pt"
    else:
        train = synthetic_data(args.size, args.seed)
        test = synthetic_data(args.test_size, args.seed + 1)
        weights = None
    w = make_workload(train, test, weights, args.m, args.d, args.k, args.seed, device,
                      args.amp)
    setup_mib = peak_memory_mib(device)
    reset_peak_memory(device)
    times = [timed(w.trainer.run_epoch, device)[1] for _ in range(1 + args.repeats)][1:]
    return {"size": len(train), "steps": w.trainer.sampler.steps_per_epoch(),
            "epoch_s": median(times), "samples": times, "peak_mib": peak_memory_mib(device),
            "setup_peak_mib": setup_mib,
            "data_mib": (train.images.numel() + test.images.numel()) / 2**20}


def run_scaling(base: int, test_size: int, data: str, data_dir, m: int, d: int, k: int,
                repeats: int, seed: int, device: torch.device, amp: bool,
                threads: int | None) -> list[dict]:
    """One subprocess per size; returns their results in order of size."""
    rows = []
    for mult in MULTIPLIERS:
        cmd = [sys.executable, "-m", "benchmarks.scaling", "--size", str(base * mult),
               "--test-size", str(test_size), "--data", data, "--m", str(m), "--d", str(d),
               "--k", str(k), "--repeats", str(repeats), "--seed", str(seed),
               "--device", str(device)]
        cmd += ["--data-dir", str(data_dir)] if data_dir else []
        cmd += ["--amp"] if amp else []
        cmd += ["--threads", str(threads)] if threads else []
        log.info("scaling %dx: %s", mult, " ".join(cmd[1:]))
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                              env={**os.environ, "CLUSTR_QUIET": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"scaling worker {base * mult} failed:\n{done.stderr[-2000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["multiplier"] = mult
        log.info("scaling %dx: %.2fs per epoch, peak %.0f MiB", mult, row["epoch_s"],
                 row["peak_mib"])
        rows.append(row)
    return rows


def main(argv=None) -> int:
    from base.errors import exit_status

    logging.basicConfig(level=logging.WARNING)
    return exit_status(lambda: print(json.dumps(run_worker(worker_args(argv)))))


if __name__ == "__main__":
    sys.exit(main())
