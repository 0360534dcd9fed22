"""CIFAR-10, CIFAR-100, SVHN and image folders, loaded once into uint8 tensors.

A whole CIFAR training set is 150 MB as uint8, so it lives in memory and batches are plain
indexing; the original's transforms (random crop 32 with padding 4 and horizontal flip for
CIFAR, none for SVHN; ToTensor always) are applied to the batch as tensor operations.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from base.errors import UsageError

DATASETS = ("cifar10", "cifar100", "svhn", "imagefolder")

# What torchvision expects under --data-root, for the offline message.
_EXPECTED_FILES = {
    "cifar10": "cifar-10-batches-py/ (data_batch_1..5, test_batch) or cifar-10-python.tar.gz",
    "cifar100": "cifar-100-python/ (train, test) or cifar-100-python.tar.gz",
    "svhn": "train_32x32.mat and test_32x32.mat",
}

PROBE_SECONDS = 5.0  # how long the offline check waits for the download server


def _on_disk(name: str, root: str, split: str) -> bool:
    """Whether torchvision finds ``split`` under ``root``: its archive or its extracted files."""
    import torchvision.datasets as tvd

    if name == "svhn":
        return os.path.isfile(os.path.join(root, tvd.SVHN.split_list[split][1]))
    cifar = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    extracted = cifar.train_list if split == "train" else cifar.test_list
    return os.path.isfile(os.path.join(root, cifar.filename)) or all(
        os.path.isfile(os.path.join(root, cifar.base_folder, f)) for f, _ in extracted)


def _download_server(name: str, split: str) -> tuple[str, int]:
    """Host and port a download would connect to first: the HTTPS proxy where one is set."""
    import urllib.parse
    import urllib.request

    import torchvision.datasets as tvd

    url = {"cifar10": tvd.CIFAR10.url, "cifar100": tvd.CIFAR100.url}.get(name) or \
        tvd.SVHN.split_list[split][0]
    host = urllib.parse.urlsplit(url).hostname
    proxy = urllib.request.getproxies().get(urllib.parse.urlsplit(url).scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        return parts.hostname, parts.port or 80
    return host, 443 if url.startswith("https") else 80


def reachable(host: str, port: int, seconds: float = PROBE_SECONDS) -> bool:
    """True when a TCP connection to ``host`` opens within ``seconds`` (name lookup
    included: it runs in a thread, so a resolver that hangs cannot hold the run up)."""
    answer = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            answer.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(answer)


def check_available(name: str, root: str, splits=("train", "test")) -> None:
    """Refuse, before anything is read, data that is neither on disk nor downloadable:
    an image folder's split folders must exist; a torchvision data set's files must be
    under ``root``, or its download server must answer within ``PROBE_SECONDS``."""
    if name == "imagefolder":
        for split in splits:
            _split_folder(root, split)
        return
    if name not in _EXPECTED_FILES:
        return  # load_dataset names the valid choices
    missing = [s for s in splits if not _on_disk(name, root, s)]
    server = _download_server(name, missing[0]) if missing else None
    if server and not reachable(*server):
        raise UsageError(f"{name} {missing[0]} set not found in "
                         f"{os.path.abspath(root)} and could not be downloaded (offline); "
                         f"place {_EXPECTED_FILES[name]} there, or pass --data-root DIR "
                         f"({server[0]}:{server[1]} did not answer within {PROBE_SECONDS:g} s)")


@dataclass
class ImageData:
    """Images (N, 3, H, W) uint8, labels (N,) int64, class names, original indices, and
    each example's rank in the order the files were stored in (``stored_rank``: for an
    image folder the file names' order across classes; else the loaded order)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    indices: torch.Tensor = field(default=None)
    stored_rank: torch.Tensor = field(default=None)

    def __post_init__(self):
        if self.indices is None:
            self.indices = torch.arange(len(self.labels))
        if self.stored_rank is None:
            self.stored_rank = self.indices.clone()

    def take(self, rows) -> ImageData:
        """The examples at ``rows`` (a slice or an index tensor), keeping their indices."""
        return ImageData(self.images[rows], self.labels[rows], self.classes, self.indices[rows],
                         self.stored_rank[rows])

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_dataset(name: str, root: str, split: str, download: bool = True,
                 workers: int = 4) -> ImageData:
    """Load ``split`` ('train' or 'test') of data set ``name`` from ``root``."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if name == "imagefolder":
        return _load_image_folder(root, split, workers)
    import torchvision.datasets as tvd

    created = not os.path.exists(root)
    try:
        if name == "svhn":
            ds = tvd.SVHN(root, split=split, download=download)
        else:
            cifar = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cifar(root, train=split == "train", download=download)
    except Exception as exc:  # offline download, corrupt archive, ...
        if created and os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)  # leave the disk as it was: only the empty folder we made goes
        raise UsageError(
            f"{name} {split} set not found in {os.path.abspath(root)} and could not be "
            f"downloaded ({type(exc).__name__}); place {_EXPECTED_FILES[name]} there, or pass "
            f"--data-root DIR") from exc
    if name == "svhn":
        images = torch.from_numpy(np.ascontiguousarray(ds.data))  # already (N, 3, 32, 32)
        labels = torch.as_tensor(ds.labels, dtype=torch.long)
        classes = [str(i) for i in range(10)]
    else:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
        classes = list(ds.classes)
    return ImageData(images, labels, classes)


def _split_folder(root: str, split: str) -> str:
    """``root/split``, refused in one line when it is not a folder."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UsageError(f"image folder {os.path.abspath(folder)} not found: --dataset "
                         f"imagefolder needs --data-root DIR with DIR/train/<class>/ and "
                         f"DIR/test/<class>/")
    return folder


def _load_image_folder(root: str, split: str, workers: int) -> ImageData:
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.datasets import ImageFolder

    folder = _split_folder(root, split)
    try:
        ds = ImageFolder(folder)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UsageError(f"no images in {os.path.abspath(folder)}: {exc}") from exc

    def read(path: str) -> np.ndarray:
        try:
            img = ds.loader(path).convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:  # not an image, truncated, ...
            raise UsageError(f"{path}: unreadable image ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                             f"remove or replace it") from exc
        if img.size != (32, 32):
            raise UsageError(f"{path} is {img.size[0]}x{img.size[1]}: --dataset imagefolder "
                             f"needs 32x32 RGB images")
        return np.asarray(img)

    paths = [path for path, _ in ds.samples]
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        images = np.stack(list(pool.map(read, paths)))
    labels = torch.as_tensor(ds.targets, dtype=torch.long)
    by_name = sorted(range(len(paths)), key=lambda i: os.path.basename(paths[i]))
    rank = torch.as_tensor(by_name, dtype=torch.long).argsort()  # the inverse permutation
    return ImageData(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels,
                     list(ds.classes), stored_rank=rank)


def check_same_classes(expected, found, what: str, how: str) -> None:
    """Refuse two class lists that differ, in one line naming both from where they first
    differ: ``what`` (with two ``{}``) says whose they are, ``how`` how to fix it."""
    expected, found = [str(c) for c in expected], [str(c) for c in found]
    if expected == found:
        return
    first = next((i for i, (a, b) in enumerate(zip(expected, found)) if a != b),
                 min(len(expected), len(found)))
    start = max(0, first - 2)

    def shown(names: list[str]) -> str:
        return ("[..., " if start else "[") + repr(names[start:start + 5])[1:]

    raise UsageError(what.format(shown(expected), shown(found)) + f" differ (from position "
                     f"{first}): {how}")


def balanced_subset(data: ImageData, n: int | None, seed: int,
                    flag: str = "the subset") -> ImageData:
    """A seeded subset of ``n`` examples with the classes as balanced as the data allow; an
    ``n`` larger than the data set is refused (``flag`` names the option), not ignored."""
    if n and n > len(data):
        raise UsageError(f"{flag} {n} is larger than the {len(data)} examples available: "
                         f"lower it or leave it out to use them all")
    if not n or n >= len(data):
        return data
    if n < data.num_classes:
        raise UsageError(f"{flag} {n}: a subset of {n} cannot hold all {data.num_classes} "
                         f"classes: ask for at least {data.num_classes}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    labels = data.labels[order]
    # rank of each example within its class, in the shuffled order
    ranks = torch.empty_like(labels)
    for c in range(data.num_classes):
        members = (labels == c).nonzero().flatten()
        ranks[members] = torch.arange(len(members))
    # take by rank first, so every class gets its share before any gets more
    keys = ranks * data.num_classes + labels
    chosen = order[keys.argsort()[:n]].sort().values
    return data.take(chosen)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [0, 1]."""
    return images.float().div_(255.0)


def augment(images: torch.Tensor, dataset: str, generator: torch.Generator) -> torch.Tensor:
    """The original's training augmentation on a uint8 batch: crop 32 (pad 4) and flip, none
    for SVHN; drawn from the CPU ``generator``, so a run is reproducible on any device."""
    if dataset == "svhn":
        return images
    dy, dx, flip = crop_flip_draws(len(images), generator)
    return crop_flip(images, dy, dx, flip)


def crop_flip_draws(n: int, generator: torch.Generator, pad: int = 4
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image crop offsets dy, dx in [0, 2*pad] and flip flags (N,), drawn in that order."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return dy, dx, flip


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              pad: int = 4) -> torch.Tensor:
    """Zero-pad by ``pad``, crop H x W at row dy / column dx, then mirror where ``flip``.
    This is torchvision's RandomCrop(H, padding=pad) followed by RandomHorizontalFlip, with
    the offsets given. The crop is ONE gather over the flattened padded planes, one kernel
    whatever the batch, rather than indexing with three broadcast index tensors."""
    n, c, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))  # (N, C, H+2p, W+2p)
    width = w + 2 * pad
    grid = torch.arange(h, device=dev)[:, None] * width + torch.arange(w, device=dev)  # (H, W)
    # the CPU draws go to the device without waiting for it (a blocking copy would wait for
    # every kernel queued before, e.g. the previous training step's update)
    dy, dx, flip = (t.to(dev, non_blocking=True) for t in (dy, dx, flip))
    grid = torch.where(flip[:, None, None], grid.flip(1), grid)  # (N, H, W)
    flat = grid + (dy * width + dx)[:, None, None]  # (N, H, W) into a plane
    index = flat.flatten(1)[:, None, :].expand(n, c, h * w)  # (N, C, H*W)
    return padded.flatten(2).gather(2, index).view(n, c, h, w)
