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
from tests.eval_helpers import real_backbone, real_cluster_classifier, real_test_data
from utils.attacks.adaptive import adaptive_sweep, run_autoattack
from utils.eval.evaluation import predict_all, run_sweep
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
    differ = predict_all(gpu_model, images.images, 50, GPU) != predict_all(
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
    kwargs = dict(epsilons=(2.0, 8.0), iterations=5, restarts=1, seed=111, batch=50)
    cpu = run_sweep(cpu_model, images, device=CPU, **kwargs)
    gpu = run_sweep(gpu_model, images, device=GPU, **kwargs)
    assert abs(cpu.clean_acc - gpu.clean_acc) <= 1.0
    for c, g in zip(cpu.per_eps, gpu.per_eps):
        assert abs(c.accuracy(images.labels) - g.accuracy(images.labels)) <= 3.0, c.eps
    assert gpu.per_eps[1].accuracy(images.labels) < gpu.clean_acc  # the attack did something


def test_adaptive_pgd_on_the_gpu_is_no_weaker_than_the_papers(gpu_model, images):
    paper = run_sweep(gpu_model, images, (8.0,), iterations=5, restarts=1, seed=111,
                      batch=50, device=GPU)
    ce, = adaptive_sweep(gpu_model, images, "pgd-ce", (8.0,), 5, 1, 111, 50, GPU)
    assert ce.accuracy <= paper.per_eps[0].accuracy(images.labels)


def test_autoattack_runs_on_the_gpu(gpu_model, images):
    pytest.importorskip("pyautoattack", reason="pyautoattack not installed "
                        "(pip install pyautoattack==0.2.0)")
    few = images.take(slice(20))
    out = run_autoattack(gpu_model, few, 8.0, seed=0, batch=20, device=GPU,
                         version="custom", attacks=["apgd-ce"], iterations=10)
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
