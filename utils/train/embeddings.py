"""The no-grad, eval-mode embedding pass over a whole data set."""
from __future__ import annotations

import contextlib

import torch

from datasets.data import to_float
from base.progress import progress


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Put ``module`` in eval mode and restore the caller's mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def compute_embeddings(model: torch.nn.Module, images: torch.Tensor, batch_size: int,
                       device: torch.device, desc: str = "embed",
                       amp: bool = False) -> torch.Tensor:
    """Embeddings (N, 512), float32 on the CPU, of uint8 images (N, 3, H, W), in order."""
    out = []
    with eval_mode(model):
        for start in progress(range(0, len(images), batch_size), desc=desc, leave=False):
            x = to_device(images[start:start + batch_size], device)
            with autocast(device, amp):
                out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 512)


def default_embed_batch(device: torch.device) -> int:
    """Batch size of the embedding pass when none is given: 256 on a GPU, which needs large
    batches to stay busy, 64 on a CPU, where a batch's activations should fit in cache (the
    first stage's output is 16 MB for 64 images, 67 MB for 256). On a 2-core EPYC, 64 took
    about 2.7 ms per image against 3.3-4.3 ms at 256; ``python -m benchmarks.run`` lists
    the time per image at each batch size."""
    return 256 if device.type == "cuda" else 64


def to_device(images_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 batch -> float [0, 1] on ``device`` in channels_last, copied without blocking."""
    if device.type == "cuda":
        images_uint8 = images_uint8.pin_memory().to(device, non_blocking=True)
    x = to_float(images_uint8.to(device))
    return x.contiguous(memory_format=torch.channels_last)


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when ``enabled``; a no-op otherwise."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_embeddings_split(model: torch.nn.Module, images: torch.Tensor, batch_size: int,
                             device: torch.device, dist, desc: str = "embed",
                             amp: bool = False) -> torch.Tensor:
    """``compute_embeddings`` with each process embedding its own disjoint slice
    (``dist.shard``), gathered back in data-set order on every process: (N, 512)."""
    start, end = dist.shard(len(images))
    local = compute_embeddings(model, images[start:end], batch_size, device, desc, amp)
    return dist.gather_rows(local, len(images))
