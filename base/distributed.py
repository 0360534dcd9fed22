"""torchrun / DistributedDataParallel support: one process per GPU (NCCL) or CPU (gloo).

Plain ``python main_clustr.py`` never touches ``torch.distributed``: ``Dist.single()`` is a
world of one whose collectives are no-ops. Under ``torchrun`` the environment variables
RANK, WORLD_SIZE and LOCAL_RANK are set and ``init_distributed`` joins the group.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from base.errors import UsageError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # a process group was joined (even a world of one)

    @classmethod
    def single(cls) -> Dist:
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous, disjoint slice [start, end) of n items (no padding)."""
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    def shard_sizes(self, n: int) -> list[int]:
        """The length of every rank's ``shard(n)``, in rank order."""
        w = self.world_size
        return [(r + 1) * n // w - r * n // w for r in range(w)]

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Concatenate every rank's shard (from ``shard(n)``) back in data-set order."""
        if not self.enabled:
            return local
        return torch.cat(self._all_gather_padded(local, self.shard_sizes(n)))

    def gather_cat(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate tensors of any first dimension from every rank, in rank order."""
        if not self.enabled:
            return local
        size = torch.tensor([len(local)], device=self._device())
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        return torch.cat(self._all_gather_padded(local, [int(s) for s in sizes]))

    def _all_gather_padded(self, local: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        device = self._device()
        longest = max(sizes)
        padded = local.new_zeros((longest,) + tuple(local.shape[1:])).to(device)
        padded[: len(local)] = local.to(device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return [p[:s].to(local.device) for p, s in zip(parts, sizes)]

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s tensor on every rank (same shape and dtype needed everywhere)."""
        if not self.enabled:
            return tensor
        t = tensor.to(self._device()).contiguous()
        dist.broadcast(t, src)
        return t.to(tensor.device)

    def all_agree(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is true on every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s batch and augmentation stream: ``seed`` itself on rank 0
    (so a world of one replays the single-process run), far-apart streams elsewhere."""
    return seed if rank == 0 else seed + 1_000_003 * rank


def per_rank(d: Dist, local: torch.Tensor):
    """A per-process tensor for a resume state: the tensor itself in a world of one, else
    ``{"rows": every rank's rows concatenated, "sizes": (world,)}`` (a collective)."""
    if not d.enabled:
        return local
    sizes = d.gather_cat(torch.tensor([len(local)]))
    return {"rows": d.gather_cat(local), "sizes": sizes}


def own_rank(d: Dist, saved):
    """This process's part of what ``per_rank`` saved."""
    if not isinstance(saved, dict):
        return saved
    sizes = [int(s) for s in saved["sizes"]]
    if len(sizes) != d.world_size:
        raise UsageError(f"the run was interrupted with {len(sizes)} process(es) and continues "
                         f"with {d.world_size}: resume with the same number")
    start = sum(sizes[:d.rank])
    return saved["rows"][start:start + sizes[d.rank]]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def process_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA, this process's own GPU (cuda:LOCAL_RANK); else ``device``."""
    if launched_by_torchrun() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> Dist:
    """Join the process group torchrun prepared; NCCL on CUDA (one GPU per process), gloo
    on CPU. Collectives time out after ``timeout_s`` so a failed rank never hangs the job."""
    if not launched_by_torchrun():
        return Dist.single()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":  # collectives fail (instead of hanging) after the timeout
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, local_rank, enabled=True)


def close_distributed(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
