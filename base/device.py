"""The ``--device`` argument: auto, cpu, cuda or cuda:N."""
from __future__ import annotations

import torch

from base.errors import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)"
                         ) from exc
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only auto, cpu, cuda and cuda:N are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s)")
    return device
