"""The CUDA paths against the CPU ones: skipped, with the reason, where no GPU is present.

On a GPU, convolutions may use TF32 and other kernels than on the CPU, so results agree up
to floating point: embeddings closely, predictions and robust accuracies up to a few
examples per hundred near a decision boundary.
"""
from __future__ import annotations

import copy
import csv
import subprocess
import sys

import pytest
import torch

from base.tensors import to_device
from datasets.data import ImageData, to_float
from models.classifier import ClusterClassifier
from tests.conftest import ROOT
from tests.eval_helpers import (
    quick_autoattack,
    real_backbone,
    real_cluster_classifier,
    real_test_data,
)
from utils.attacks.adaptive import adaptive_attacks, run_autoattack
from utils.attacks.pgd import PGD
from utils.attacks.sweep import AttackContext, predictions, sweep
from utils.eval.evaluation import run_sweep
from utils.train.embeddings import compute_embeddings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this machine")

CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def cpu_model(real_subset, real_weights):
    return real_cluster_classifier(str(real_subset), str(real_weights))


@pytest.fixture(scope="module")
def gpu_model(cpu_model):
    return copy.deepcopy(cpu_model).to(GPU)  # the cached CPU model stays on the CPU


@pytest.fixture(scope="module")
def images(real_subset) -> ImageData:
    return real_test_data(str(real_subset), 100, 111)


def test_to_device_gives_the_cpu_floats_in_channels_last_on_the_gpu():
    batch = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    x = to_device(batch, GPU)
    torch.cuda.synchronize()
    assert x.device.type == "cuda" and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    # the GPU divides by 255 as a multiplication by 1/255: at most one float32 ulp apart
    assert (x.cpu() - to_device(batch, CPU)).abs().max() <= 2 ** -24


def test_embeddings_and_predictions_match_the_cpu(real_weights, cpu_model, gpu_model, images):
    backbone = real_backbone(str(real_weights))
    on_cpu = compute_embeddings(backbone, images.images, 50, CPU)
    on_gpu = compute_embeddings(copy.deepcopy(backbone).to(GPU), images.images, 50, GPU)
    assert on_gpu.device.type == "cpu" and on_gpu.dtype == torch.float32
    rel = (on_gpu - on_cpu).norm(dim=1) / on_cpu.norm(dim=1)
    assert rel.max() < 1e-2, rel.max()
    differ = predictions(gpu_model, images.images, 50, GPU) != predictions(
        cpu_model, images.images, 50, CPU)
    assert differ.sum() <= 1


def test_bfloat16_embeddings_stay_close_and_come_back_in_float32(real_weights, images):
    backbone = copy.deepcopy(real_backbone(str(real_weights))).to(GPU)
    full = compute_embeddings(backbone, images.images, 50, GPU)
    amp = compute_embeddings(backbone, images.images, 50, GPU, amp=True)
    assert amp.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(amp, full, dim=1)
    assert cosine.min() > 0.99, cosine.min()


def test_paper_sweep_on_the_gpu_agrees_with_the_cpu(cpu_model, gpu_model, images):
    """Same seed, so the same random starts: robust accuracies within 3 of 100 examples."""
    attack = PGD(iterations=5, restarts=1)
    cpu = run_sweep(AttackContext(cpu_model, images, CPU, 50), attack, 50, (2.0, 8.0))
    gpu = run_sweep(AttackContext(gpu_model, images, GPU, 50), attack, 50, (2.0, 8.0))
    assert abs(cpu.clean_acc - gpu.clean_acc) <= 1.0
    for c, g in zip(cpu.per_eps, gpu.per_eps):
        assert abs(c.accuracy - g.accuracy) <= 3.0, c.eps
    assert gpu.per_eps[1].accuracy < gpu.clean_acc  # the attack did something


def test_adaptive_pgd_on_the_gpu_is_no_weaker_than_the_papers(gpu_model, images):
    ctx = AttackContext(gpu_model, images, GPU, 50)
    paper = run_sweep(ctx, PGD(iterations=5, restarts=1), 50, (8.0,))
    clean = predictions(gpu_model, images.images, 50, GPU, logits=True)
    ce, = sweep(ctx, adaptive_attacks(5, 1)[0], (8.0,), clean)
    assert ce.accuracy <= paper.per_eps[0].accuracy


def test_autoattack_runs_on_the_gpu(gpu_model, images, monkeypatch):
    pytest.importorskip("pyautoattack", reason="pyautoattack not installed "
                        "(pip install pyautoattack==0.2.0)")
    quick_autoattack(monkeypatch, ["apgd-ce"], 10)
    few = images.take(slice(20))
    out = run_autoattack(AttackContext(gpu_model, few, GPU, 20, seed=0), 8.0)
    with torch.no_grad():
        clean = gpu_model.predict(to_float(few.images).to(GPU)).cpu() == few.labels
    assert out.robust.device.type == "cpu" and out.robust.shape == (20,)
    assert not (out.robust & ~clean).any()
    assert out.accuracy < 100.0 * clean.float().mean().item()


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bfloat16"])
def test_cli_trains_and_evaluates_on_the_gpu(tiny_folder, tmp_path, amp):
    """The command on --device cuda: a finite loss, the seed's outputs, and a checkpoint that
    loads on the CPU and predicts there what it predicts on the GPU."""
    out = tmp_path / "expA"
    cmd = [sys.executable, str(ROOT / "main_clustr.py"), "--checkpoint", str(out),
           "--dataset", "imagefolder", "--data-root", str(tiny_folder), "--device", "cuda",
           "--epochs", "2", "--k", "2", "--m", "3", "--d", "4", "--L", "4",
           "--iterations", "2", "--restarts", "1", "--test-batch", "8", "--strong",
           "--quiet"] + (["--amp"] if amp else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = (out / "log.txt").read_text().splitlines()[1:]
    assert len(rows) == 2
    assert all(torch.isfinite(torch.tensor(float(r.split("\t")[2]))) for r in rows)
    with open(out / "attack_results_ext.csv") as f:
        assert len(list(csv.reader(f))) > 1
    assert (out / "attack_results_strong.csv").is_file()

    # no map_location: tensors come back on the device they were saved from, so this shows
    # that the run saved CPU tensors (a file that loads on a machine without a GPU)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["cluster_centers"].device.type == "cpu"
    assert all(v.device.type == "cpu" for v in ckpt["state_dict"].values())
    assert ckpt["cluster_centers"].dtype == torch.float32
    on_cpu = ClusterClassifier.from_checkpoint(str(out / "checkpoint.pth"))
    on_gpu = ClusterClassifier.from_checkpoint(str(out / "checkpoint.pth"), map_location=GPU)
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        assert (on_cpu.predict(x) != on_gpu.predict(x.to(GPU)).cpu()).sum() <= 1


def test_attack_batch_on_the_gpu_fits_and_the_sweep_does_not_depend_on_it(cpu_model, images):
    """The default CUDA attack batch: a power of two that a forward and backward fit, and
    the same sweep results as a batch of 16 (per-example starts), up to the few examples
    per hundred TF32 may flip."""
    from utils.attacks.batch_size import MAX_BATCH, attack_batch, probe

    model = copy.deepcopy(cpu_model)  # on the CPU: attack_batch moves it
    size = attack_batch(None, model, GPU, 10_000)
    assert 1 <= size <= MAX_BATCH and size & (size - 1) == 0
    assert next(model.parameters()).device.type == "cuda"
    assert probe(model, GPU, size, (3, 32, 32))
    attack = PGD(iterations=3, restarts=1)
    a = run_sweep(AttackContext(model, images, GPU, size), attack, 64, (8.0,))
    b = run_sweep(AttackContext(model, images, GPU, 16), attack, 64, (8.0,))
    assert int((a.per_eps[0].pred != b.per_eps[0].pred).sum()) <= 3


def test_training_batches_built_on_the_gpu_are_the_cpu_ones():
    """The uint8 training set kept on the GPU and augmented there, from the same CPU draws:
    bit-identical batches (integer crops and flips, then the same division)."""
    from tests.train.test_variants import make_trainer

    trainer = make_trainer()
    gpu = make_trainer()
    gpu.device = GPU
    assert gpu.device_images().device.type == "cuda"
    for _ in range(3):
        indices, _ = trainer.sampler.sample(trainer.generator)
        gpu.generator.set_state(trainer.generator.get_state())
        new = gpu.batch_images(indices)
        old = trainer.batch_images(indices)
        assert torch.equal(new.cpu(), old)
        assert torch.equal(gpu.generator.get_state(), trainer.generator.get_state())


def test_a_batch_and_its_magnet_loss_never_wait_for_the_gpu():
    """The step's one wait for the device is the copy of its losses back
    (``ClusTRTrainer.train_epoch``): building the batch on the device and the Magnet loss
    forward and backward only queue kernels (torch's sync debug mode raises on a
    synchronising call)."""
    from tests.train.test_variants import make_trainer
    from utils.train.magnet_loss import magnet_loss

    trainer = make_trainer()
    trainer.device = GPU
    trainer.device_images()
    classes = trainer.head().classes.to(GPU)
    indices, ids = trainer.sampler.sample(trainer.generator)
    emb = torch.randn(len(indices), 16, device=GPU, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = trainer.batch_images(indices)
        per_example, variance = magnet_loss(emb + x.mean(), ids.to(GPU, non_blocking=True),
                                            classes, 12.5)
        (per_example.mean() + variance).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(emb.grad).all()


def test_magnet_loss_on_the_gpu_equals_the_cpu():
    from utils.train.magnet_loss import magnet_loss

    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(20, generator=gen)[:12].repeat_interleave(20)
    classes = torch.arange(10).repeat_interleave(2)
    emb = torch.randn(240, 512, generator=gen)
    grads, losses = [], []
    for device in (CPU, GPU):
        e = emb.to(device).requires_grad_(True)
        per_example, variance = magnet_loss(e, ids.to(device), classes.to(device), 12.5)
        (per_example.mean() + variance).backward()
        losses.append(per_example.detach().cpu())
        grads.append(e.grad.cpu())
    # TF32 matrix products on the GPU: a few parts in ten thousand
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=1e-5)


def test_kmeans_on_the_gpu_matches_scikit_learns_inertia(real_subset, real_weights):
    """``--kmeans-device`` on the GPU: per-class fits whose total inertia is within 1% of
    scikit-learn's on the embeddings of 300 shared test images, with ten starts (with one,
    either algorithm varies by a few percent from seed to seed: tests/train/
    test_kmeans_device.py)."""
    from tests.train.test_kmeans_device import inertia
    from utils.train.clustering import KMeansSettings, fit_clusters

    data = real_test_data(str(real_subset), 300, 0)
    emb = compute_embeddings(real_backbone(str(real_weights)), data.images, 100, CPU)
    ours = fit_clusters(emb, data.labels, 10, KMeansSettings(2, 10, 40, 1, GPU))
    theirs = fit_clusters(emb, data.labels, 10, KMeansSettings(2, 10, 40, 1))
    totals = [sum(inertia(emb[data.labels == c], fit.centers[2 * c:2 * c + 2])
                  for c in range(10)) for fit in (ours, theirs)]
    assert ours.centers.device.type == "cpu"
    assert abs(totals[0] - totals[1]) <= 0.01 * totals[1], totals
