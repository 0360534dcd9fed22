"""What a benchmark figure depends on: processor, cores, threads, torch, device, load."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

# instruction-set extensions that decide which kernels torch and oneDNN pick
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "neon", "asimd", "sve")
REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"


def field(path, prefixes, sep: str = ":") -> str | None:
    """What follows ``sep`` on the first line of a file that starts with one of
    ``prefixes``; None where there is none."""
    try:
        with open(path) as f:
            return next((line.split(sep, 1)[1].strip() for line in f
                         if line.startswith(prefixes)), None)
    except OSError:
        return None


def instruction_sets() -> str:
    """The relevant flags of /proc/cpuinfo, and the kernel level torch dispatches to."""
    flags = (field("/proc/cpuinfo", ("flags", "Features")) or "").split()
    present = " ".join(f for f in ISA_FLAGS if f in flags) or "unknown"
    return f"{present}; torch kernels: {torch.backends.cpu.get_cpu_capability()}"


def collect_env() -> str:
    """``torch.utils.collect_env``'s report (a few seconds: it runs pip and lscpu)."""
    from torch.utils import collect_env as env

    try:
        return env.get_pretty_env_info()
    except Exception as exc:  # it shells out; a missing tool must not sink the benchmark
        return f"torch.utils.collect_env failed: {type(exc).__name__}: {exc}"


def usable_cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def load_average() -> float | None:
    """One-minute load average (None where the system has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def contention_warnings(load: dict, threads: int) -> list[str]:
    """A warning where the load averages at named points of a run show other work: all of it
    at ``start``, afterwards all but the run's ``threads`` (at most the cores). Other work
    above a quarter of the cores (at least 1) counts, on 2 cores as on 16."""
    cores = usable_cores()
    own, limit = min(threads, cores), max(1.0, 0.25 * cores)
    busy = {k: v for k, v in load.items()
            if v is not None and v - (0 if k == "start" else own) > limit}
    if not busy:
        return []
    return [f"the machine was busy ({', '.join(f'{k} {v:.1f}' for k, v in busy.items())} "
            f"load average on {cores} cores, of which this harness accounts for at most "
            f"{own}): other processes shared the processor, so these times are not "
            f"representative and the targets are not judged by them."]


def machine_info(device: torch.device) -> dict:
    cpu = field("/proc/cpuinfo", ("model name",)) or platform.processor() or platform.machine()
    gpu = (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
           if device.type == "cuda" else "cpu")
    return {"cpu": cpu, "isa": instruction_sets(),
            "torch_pinned": field(REQUIREMENTS, ("torch==",), sep="=="),  # as pinned there
            "cores": os.cpu_count(), "usable_cores": usable_cores(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(), "device": gpu}

