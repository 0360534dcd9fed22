"""The attack batch: 64 on a CPU, the largest that fits on CUDA (estimate, then probe)."""
from __future__ import annotations

import torch

from tests.eval_helpers import TinyNet
from utils.attacks import batch_size as bs


def test_requested_wins_and_the_cpu_default_is_64():
    model = TinyNet()
    assert bs.attack_batch(7, model, torch.device("cpu"), 1000) == 7
    assert bs.attack_batch(None, model, torch.device("cpu"), 1000) == bs.CPU_BATCH == 64


def test_first_candidate_is_a_power_of_two_within_memory_and_the_image_count():
    mib = 2 ** 20
    # half of 1000 MiB at 3 MiB per image: 166 images fit, so 128
    assert bs.first_candidate(1000 * mib, 3 * mib, 10_000) == 128
    assert bs.first_candidate(1000 * mib, 3 * mib, 100) == 128    # 100 images: one batch
    assert bs.first_candidate(1000 * mib, 3 * mib, 60) == 64
    assert bs.first_candidate(10 ** 15, 1.0, 10 ** 9) == bs.MAX_BATCH
    assert bs.first_candidate(1 * mib, 3 * mib, 100) == 1          # nothing fits: 1


def test_largest_fitting_halves_until_the_probe_passes():
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 100

    assert bs.largest_fitting(1024, fits) == 64
    assert tried == [1024, 512, 256, 128, 64]
    assert bs.largest_fitting(8, lambda b: False) == 1


def test_graph_bytes_per_image_counts_activations_not_weights():
    model = TinyNet().train()
    per_image = bs.graph_bytes_per_image(model, torch.device("cpu"), (3, 32, 32))
    weights = sum(p.numel() * 4 for p in model.parameters())
    # TinyNet saves at least its input and first activations (3 + 8 planes of 32x32/16x16)
    assert 3 * 32 * 32 * 4 <= per_image < weights + 3 * 32 * 32 * 4 * 20
    assert model.training  # the caller's mode is restored


def test_cuda_path_estimates_then_halves_on_out_of_memory(monkeypatch):
    """The CUDA branch with the device calls replaced: 4 GiB free, 1 MiB per image in the
    saved graph (3 MiB with GRAPH_FACTOR) gives 512 as the first candidate, and a probe
    that runs out of memory above 200 images settles on 128."""
    monkeypatch.setattr(bs, "graph_bytes_per_image", lambda *a: float(2 ** 20))
    monkeypatch.setattr(bs, "free_memory", lambda device: 4 * 2 ** 30)
    probed = []

    def probe(model, device, size, shape):
        probed.append(size)
        return size <= 200

    monkeypatch.setattr(bs, "probe", probe)
    model, moved = TinyNet(), []
    model.to = lambda device: moved.append(device)  # no GPU here: record the move only
    assert bs.attack_batch(None, model, torch.device("cuda"), 10_000) == 128
    assert moved == [torch.device("cuda")]
    assert probed == [512, 256, 128]


def test_probe_runs_forward_and_backward_and_restores_the_mode():
    model = TinyNet().train()
    assert bs.probe(model, torch.device("cpu"), 4, (3, 32, 32))
    assert model.training and all(p.grad is None for p in model.parameters())
