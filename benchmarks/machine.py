"""What a benchmark figure depends on: processor, cores, threads, torch, device, load."""
from __future__ import annotations

import os
import platform
import resource
import sys

import torch


def cpu_model() -> str:
    """The processor's marketing name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# instruction-set extensions that decide which kernels torch and oneDNN pick
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "neon", "asimd", "sve")


def instruction_sets() -> str:
    """The processor's relevant instruction-set flags (/proc/cpuinfo), and the kernel
    level torch dispatches to on it (``torch.backends.cpu.get_cpu_capability``)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    present = [f for f in ISA_FLAGS if f in flags] or ["unknown"]
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        capability = "unknown"
    return f"{' '.join(present)}; torch kernels: {capability}"


def pinned_torch() -> str | None:
    """The torch version requirements.txt pins, if it pins one."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "requirements.txt")
    try:
        with open(path) as f:
            for line in f:
                if line.strip().startswith("torch=="):
                    return line.strip().split("==", 1)[1]
    except OSError:
        pass
    return None


def collect_env() -> str:
    """``torch.utils.collect_env``'s report (a few seconds: it runs pip and lscpu)."""
    from torch.utils import collect_env as env

    try:
        return env.get_pretty_env_info()
    except Exception as exc:  # it shells out; a missing tool must not sink the benchmark
        return f"torch.utils.collect_env failed: {type(exc).__name__}: {exc}"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_loads(load: dict, threads: int) -> dict:
    """The load averages in ``load`` (named points of a run) that show other work.

    At ``start`` (before the run) the whole load average is other work; afterwards the run
    itself accounts for up to ``threads`` (at most the cores). Other work above a quarter of
    the cores (at least 1) counts, whatever their number, so a 16-core host with 4 busy
    cores of other jobs counts too."""
    cores = usable_cores()
    own, limit = min(threads, cores), max(1.0, 0.25 * cores)
    return {k: v for k, v in load.items()
            if v is not None and v - (0 if k == "start" else own) > limit}


def load_average() -> float | None:
    """One-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return "cpu"


def machine_info(device: torch.device) -> dict:
    return {
        "cpu": cpu_model(),
        "isa": instruction_sets(),
        "torch_pinned": pinned_torch(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device_name(device),
    }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of THIS process: torch's peak CUDA allocation on a GPU, else the peak
    resident set size, which also sees torch's native allocations that tracemalloc misses.

    On Linux the peak is ``VmHWM`` of /proc/self/status: ``ru_maxrss`` would do, but Linux
    carries it over fork and exec, so a worker started by a large parent would report the
    parent's size. Elsewhere ``ru_maxrss``. Measure one workload per process.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # KiB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes vs KiB
