"""Small tensor helpers every stage uses: eval mode, device transfer, bfloat16 autocast,
a hash of tensors' contents."""
from __future__ import annotations

import contextlib
import hashlib

import torch


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Put ``module`` in eval mode and restore the caller's mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def to_device(images_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 batch -> float [0, 1] on ``device`` in channels_last, copied without blocking."""
    if device.type == "cuda" and images_uint8.device.type == "cpu":
        images_uint8 = images_uint8.pin_memory().to(device, non_blocking=True)
    x = images_uint8.to(device).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when ``enabled``; a no-op otherwise."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' bytes: a fingerprint of images and labels."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
