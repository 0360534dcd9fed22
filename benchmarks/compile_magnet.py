"""Does ``torch.compile`` pay for the Magnet loss? Eager against compiled, same inputs.

    python -m benchmarks.compile_magnet                  # CPU
    python -m benchmarks.compile_magnet --device cuda

Times the Magnet loss forward and backward on a batch of the seed's shape (12 clusters x
20 examples, 512-d embeddings), eager and under ``torch.compile`` (after its compilation,
whose time is reported apart), alternated, and checks that both give the same loss and
gradient to float32 rounding. The training step keeps the eager loss unless this shows a
gain worth a compilation at every start.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from base.device import resolve_device
from base.errors import exit_status
from utils.train.magnet_loss import magnet_loss

from .machine import load_average
from .timing import spread, timed


def measure(device: torch.device, repeats: int, m: int = 12, d: int = 20,
            dim: int = 512, alpha: float = 12.5) -> dict:
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(m * d, dim, generator=gen).to(device)
    cluster_ids = torch.arange(m).repeat_interleave(d).to(device)
    classes = torch.arange(m).to(device)

    def step(fn):
        e = emb.clone().requires_grad_(True)
        per_example, _ = fn(e, cluster_ids, classes, alpha)
        loss = per_example.mean()
        loss.backward()
        return loss.detach(), e.grad

    compiled = torch.compile(magnet_loss)
    (ref_loss, ref_grad), _ = timed(lambda: step(magnet_loss), device)
    (c_loss, c_grad), first = timed(lambda: step(compiled), device)  # compiles
    times = {"eager": [], "compiled": []}
    for _ in range(repeats):
        for name, fn in (("eager", magnet_loss), ("compiled", compiled)):
            times[name].append(timed(lambda fn=fn: step(fn), device)[1])
    return {"compile_s": first, "spread": {n: spread(t) for n, t in times.items()},
            "loss_difference": float((ref_loss - c_loss).abs()),
            "grad_difference": float((ref_grad - c_grad).abs().max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_magnet",
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)

    def run():
        device = resolve_device(args.device)
        start = load_average()
        res = measure(device, args.repeats)
        print(f"Magnet loss forward + backward, batch 240 x 512, {device}, load average "
              f"{start} -> {load_average()}")
        print(f"first compiled call (compilation): {res['compile_s']:.1f} s")
        for name, sp in res["spread"].items():
            print(f"{name}: min {sp['min'] * 1e3:.2f} ms, median {sp['median'] * 1e3:.2f} ms, "
                  f"max {sp['max'] * 1e3:.2f} ms ({args.repeats} repeats)")
        print(f"loss difference {res['loss_difference']:.3g}, largest gradient difference "
              f"{res['grad_difference']:.3g}")

    return exit_status(run)


if __name__ == "__main__":
    os.environ.setdefault("CLUSTR_QUIET", "1")
    sys.exit(main())
