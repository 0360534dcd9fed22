"""The no-grad, eval-mode embedding pass over a whole data set."""
from __future__ import annotations

import torch

from base.progress import progress
from base.tensors import autocast, eval_mode, to_device


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
    """The embedding pass's batch when none is given: 256 on a GPU, which needs large batches
    to stay busy, 64 on a CPU, where a batch's activations should fit in cache (the first
    stage's output is 16 MB for 64 images, 67 MB for 256; ``python -m benchmarks.run``
    measures it)."""
    return 256 if device.type == "cuda" else 64


def compute_embeddings_split(model: torch.nn.Module, images: torch.Tensor, batch_size: int,
                             device: torch.device, dist, desc: str = "embed",
                             amp: bool = False) -> torch.Tensor:
    """``compute_embeddings`` with each process embedding its own disjoint slice
    (``dist.shard``), gathered back in data-set order on every process: (N, 512)."""
    start, end = dist.shard(len(images))
    local = compute_embeddings(model, images[start:end], batch_size, device, desc, amp)
    return dist.gather_rows(local, len(images))
