"""Wall-clock timing that waits for the device, and per-step times of a training loop."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), seconds) with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values),
            "mean": statistics.fmean(values), "max": max(values)}


def median_call(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one untimed call."""
    fn()
    return statistics.median(timed(fn, device)[1] for _ in range(repeats))


@contextmanager
def step_times(optimizer: torch.optim.Optimizer, device: torch.device):
    """The wall times of the ``optimizer.step()`` calls made inside the block, stamped by a
    post-step hook so that the loop runs unchanged: a step runs from the previous step's end
    (the first from entering the block) to its own, sampling to bookkeeping included."""
    times: list[float] = []
    sync(device)
    last = time.perf_counter()

    def stamp(*_):
        nonlocal last
        sync(device)
        now = time.perf_counter()
        times.append(now - last)
        last = now

    handle = optimizer.register_step_post_hook(stamp)
    try:
        yield times
    finally:
        handle.remove()
