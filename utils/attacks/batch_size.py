"""How many images an attack works on at once (``--attack-batch``).

Attacks hold one batch's autograd graph of the network at a time. On a CPU a batch of 64
keeps that graph in cache (larger ones are no faster); a GPU stays busy only with far larger
batches, so on CUDA the default is the largest power of two that fits the free memory:
**estimated** from the bytes one image adds to the saved graph (the attacked forward run at
batch 1 and 2 under ``saved_tensors_hooks``, so the weights cancel out) times
``GRAPH_FACTOR`` for what the graph does not save, against ``MEMORY_SHARE`` of the free
memory; then **probed** with one forward and backward, halving on out-of-memory, so a wrong
estimate costs a few probes, never a failed evaluation.

The batch changes no result of the paper's sweep or of the adaptive PGD: an example's random
starts depend on its own index only (``utils.attacks.pgd.start_keys``). AutoAttack draws its
random starts per batch (pyautoattack seeds its generator at the start of each batch), so
its figures can move slightly with the batch.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from base.tensors import eval_mode

log = logging.getLogger("clustr")

CPU_BATCH = 64
MAX_BATCH = 8192
GRAPH_FACTOR = 3.0   # peak memory of a forward + backward / bytes saved by the forward
MEMORY_SHARE = 0.5   # of the free memory: room for cuDNN workspaces and fragmentation


def attack_batch(requested: int | None, model: torch.nn.Module, device: torch.device,
                 n_images: int, image_shape: tuple[int, ...] = (3, 32, 32)) -> int:
    """``requested`` when given; else 64 on a CPU, and on CUDA the largest batch that fits
    (estimated, then probed; see the module's docstring). Logged with its origin."""
    device = torch.device(device)
    if requested is not None:
        return requested
    if device.type != "cuda":
        return CPU_BATCH
    model.to(device)  # where the attacks will run it (a module moves in place)
    per_image = GRAPH_FACTOR * graph_bytes_per_image(model, device, image_shape)
    free = free_memory(device)
    first = first_candidate(free, per_image, n_images)
    size = largest_fitting(first, lambda b: probe(model, device, b, image_shape))
    log.info("attack batch %d (%.1f GiB free, about %.1f MiB per image in the attack's "
             "graph; pass --attack-batch to choose)", size, free / 2**30, per_image / 2**20)
    return size


def first_candidate(free_bytes: float, per_image_bytes: float, n_images: int) -> int:
    """The largest power of two with ``MEMORY_SHARE * free_bytes`` for its graphs, at most
    ``MAX_BATCH`` and at most the power of two that covers ``n_images``; at least 1."""
    fits = int(MEMORY_SHARE * free_bytes / max(per_image_bytes, 1.0))
    cap = min(MAX_BATCH, 1 << max(n_images - 1, 0).bit_length())
    size = 1 << max(min(fits, cap).bit_length() - 1, 0)
    return max(1, min(size, cap))


def largest_fitting(size: int, fits: Callable[[int], bool]) -> int:
    """``size`` halved until ``fits(size)``; 1 is the last resort (and is not probed)."""
    while size > 1 and not fits(size):
        size //= 2
    return size


def free_memory(device: torch.device) -> int:
    """Free bytes on a CUDA device, counting what torch's cache holds as free."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def graph_bytes_per_image(model: torch.nn.Module, device: torch.device,
                          image_shape: tuple[int, ...]) -> float:
    """Bytes one more image adds to the tensors the attacked forward (the model's logits of
    x + delta) saves for backward."""
    sizes = []
    with eval_mode(model):
        for n in (1, 2):
            total = [0]

            def pack(t, total=total):
                total[0] += t.numel() * t.element_size()
                return t

            x = torch.rand(n, *image_shape, device=device).requires_grad_(True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(x)
            del out
            sizes.append(total[0])
    return float(max(sizes[1] - sizes[0], 1))


def probe(model: torch.nn.Module, device: torch.device, size: int,
          image_shape: tuple[int, ...]) -> bool:
    """Whether one forward and backward (input gradient only) at ``size`` fits."""
    try:
        with eval_mode(model):
            x = torch.rand(size, *image_shape, device=device).requires_grad_(True)
            grad, = torch.autograd.grad(model(x).sum(), x)
            del grad, x
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()  # a no-op where CUDA was never used
