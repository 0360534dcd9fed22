"""Wall-clock timing that waits for the device, and per-step times of a training loop."""
from __future__ import annotations

import statistics
import time

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


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def spread(values) -> dict:
    """min, median, mean and max of a sample (NaN for an empty one)."""
    values = sorted(values) or [float("nan")]
    return {"min": values[0], "median": median(values), "mean": statistics.fmean(values),
            "max": values[-1]}


def median_call(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one untimed call."""
    fn()
    return median(timed(fn, device)[1] for _ in range(repeats))


class StepClock:
    """Per-step wall times of any loop that calls ``optimizer.step()`` once per batch.

    An optimizer post-step hook stamps the clock, so the loop's own code is measured
    unchanged: a step's time runs from the previous step's end (or from ``start()``) to its
    own end and so covers sampling, augmentation, copies, forward, loss, backward, update and
    the bookkeeping after the update. ``record`` switches collection on and off (warm-up).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.device, self.times, self.record = device, [], False
        self._last: float | None = None
        self._handle = optimizer.register_step_post_hook(self._stamp)

    def start(self) -> None:
        """Mark the start of a loop: its first step is timed from here."""
        sync(self.device)
        self._last = time.perf_counter()

    def _stamp(self, *_) -> None:
        sync(self.device)
        now = time.perf_counter()
        if self.record and self._last is not None:
            self.times.append(now - self._last)
        self._last = now

    def close(self) -> None:
        self._handle.remove()
