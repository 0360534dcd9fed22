"""Failure behaviour of the CLI: every bad input gets one line and exit 2 with nothing on disk
changed; results are never clobbered; checkpoints load weights-only; an interrupted run,
resumed, writes what an uninterrupted one writes.

Runs ``main_clustr.main`` in-process on tiny image folders (a few 32x32 images per class) so
that the whole file costs seconds of ResNet18 steps. Training runs here skip the PGD sweep
(``evaluate_checkpoint`` is replaced by a no-op): it is not what these tests are about.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import main_clustr
from base.io import load_checkpoint, save_atomic
from models.resnet import ResNet18

ROOT = Path(__file__).resolve().parents[1]

# 3 classes x 3 noise images, one cluster per class, batches of 2 clusters x 2 images:
# 2 Magnet steps per epoch, each a ResNet18 step on 4 images.
# --device cpu: the byte-for-byte comparisons below hold on the CPU (on a GPU, auto would
# pick CUDA, whose kernels are not bit-for-bit reproducible)
SMALL = ["--m", "2", "--d", "2", "--k", "1", "--L", "3", "--iterations", "1", "--restarts",
         "1", "--quiet", "--workers", "0", "--test-batch", "8", "--embed-batch", "8",
         "--device", "cpu"]


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the program catches it."""


def cli(argv, capsys) -> tuple[int, str]:
    """Run the CLI in-process: (exit status, stderr)."""
    try:
        code = main_clustr.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict:
    """Every file (bytes) and directory (None) below ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def save_png(path: Path, tensor: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((tensor * 255).byte().permute(1, 2, 0).numpy()).save(path)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    """3 classes of uniform-noise images with a faint class tint: 3 training and 2 test images
    each. Hard enough that the losses move from epoch to epoch."""
    root = tmp_path_factory.mktemp("noisy")
    gen = torch.Generator().manual_seed(1)
    for split, n in (("train", 3), ("test", 2)):
        for c, name in enumerate(("ant", "bee", "cat")):
            for i in range(n):
                img = torch.rand(3, 32, 32, generator=gen) * 0.9
                img[c] += 0.1
                save_png(root / split / name / f"{i}.png", img)
    return root


@pytest.fixture(scope="module")
def no_sweep():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(main_clustr, "evaluate_checkpoint", lambda *a, **k: None)
        yield


def train_argv(data: Path, exp: Path, epochs: int = 2, every: int = 1) -> list:
    return ["--checkpoint", exp, "--dataset", "imagefolder", "--data-root", data,
            "--epochs", epochs, "--checkpoint-every", every, *SMALL]


@pytest.fixture(scope="module")
def reference(noisy, no_sweep, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run (its directory)."""
    exp = tmp_path_factory.mktemp("ref") / "exp"
    assert main_clustr.main([str(a) for a in train_argv(noisy, exp, every=0)]) == 0
    return exp


# -- resume -----------------------------------------------------------------------------------
def kill_at_step(monkeypatch, n: int) -> None:
    """Kill the run when the n-th Magnet step since its start begins."""
    import utils.train.training

    real, calls = utils.train.training.magnet_loss, {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed(f"step {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(utils.train.training, "magnet_loss", counting)


def assert_same_run(a: Path, b: Path) -> None:
    assert (a / "log.txt").read_bytes() == (b / "log.txt").read_bytes()
    ca, cb = load_checkpoint(str(a / "checkpoint.pth")), load_checkpoint(str(b / "checkpoint.pth"))
    for key in ("cluster_centers", "cluster_classes", "variance"):
        assert torch.equal(ca[key], cb[key]), key
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), key
    ra, rb = load_checkpoint(str(a / "resume.pth")), load_checkpoint(str(b / "resume.pth"))
    la, lb = ra["trainer"]["sampler"]["losses"], rb["trainer"]["sampler"]["losses"]
    assert torch.equal(la.isnan(), lb.isnan()) and torch.equal(la.nan_to_num(), lb.nan_to_num())
    assert torch.equal(ra["trainer"]["generator"], rb["trainer"]["generator"])


def add_stale_rows(log: Path, done: int) -> None:
    """A row of the unfinished epoch and a half-written line, as an older writer could leave."""
    with open(log, "a") as f:
        f.write(f"{done + 1}\t0.1\t9\t9\t9\t9\n{done + 2}\t0.0")


def test_resume_within_epochs(noisy, reference, no_sweep, tmp_path, monkeypatch, capsys):
    """Killed three times and resumed each time: at the first step (only the state saved
    before training exists), at the last step of epoch 1 (no checkpoint.pth yet) and at the
    last of epoch 2. The same rows and final state as the uninterrupted run."""
    exp = tmp_path / "exp"
    argv = train_argv(noisy, exp, every=1)
    # steps are counted from each start (2 per epoch, saves after each but an epoch's last)
    for kill_step, resumed_at, resume in ((1, (0, 0), []), (2, (0, 1), ["--resume"]),
                                          (3, (1, 1), ["--resume"])):
        with monkeypatch.context() as mp:
            kill_at_step(mp, kill_step)
            with pytest.raises(Killed):
                cli(argv + resume, capsys)
        state = load_checkpoint(str(exp / "resume.pth"))
        assert (state["epoch"], state["step"]) == resumed_at
        add_stale_rows(exp / "log.txt", resumed_at[0])
    assert cli(argv + ["--resume"], capsys)[0] == 0
    assert_same_run(reference, exp)


def test_overwrite_then_resume_between_epochs(noisy, reference, no_sweep, tmp_path, capsys):
    """--overwrite replaces the previous results only (the user's files stay); a run stopped
    after epoch 1 and resumed with --epochs 2 equals the uninterrupted 2-epoch run."""
    exp = tmp_path / "exp"
    exp.mkdir()
    for name in ("log.txt", "params.txt", "checkpoint_7.pth", "attack_results_ext.csv",
                 ".resume.pth.abc123"):  # the last: a temporary left by a killed save
        (exp / name).write_bytes(b"earlier run")
    (exp / "notes.md").write_bytes(b"mine")
    assert cli(train_argv(noisy, exp, epochs=1, every=0) + ["--overwrite", "--save-all"],
               capsys)[0] == 0
    assert sorted(os.listdir(exp)) == ["args.json", "checkpoint.pth", "checkpoint_0.pth",
                                       "log.txt", "metrics.csv", "notes.md", "params.txt",
                                       "resume.pth", "run.log"]
    assert (exp / "notes.md").read_bytes() == b"mine"
    assert (exp / "log.txt").read_text().count("\n") == 2  # header and epoch 1
    add_stale_rows(exp / "log.txt", 1)
    assert cli(train_argv(noisy, exp, epochs=2, every=0) + ["--resume", "--save-all"],
               capsys)[0] == 0
    assert_same_run(reference, exp)
    # checkpoint epochs count from 0 (as the original's), across the resume too
    assert [load_checkpoint(str(exp / f"checkpoint_{e}.pth"))["epoch"] for e in (0, 1)] == [0, 1]
    assert load_checkpoint(str(exp / "checkpoint.pth"))["epoch"] == 1


def test_resume_state_loads_weights_only(reference):
    state = torch.load(reference / "resume.pth", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"]) == (2, 0)
    ckpt = torch.load(reference / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert "resume" not in ckpt and "optimizer" not in ckpt  # the original's keys stay clean
    assert {"state_dict", "epoch", "test_acc", "cluster_centers", "cluster_classes", "variance",
            "K", "L", "normalize_probs"} <= set(ckpt)


def test_non_finite_loss_stops_naming_epoch_and_step(noisy, reference, no_sweep, tmp_path,
                                                     monkeypatch, capsys):
    """The finished 2-epoch run, resumed for a third epoch whose step 2 gives a NaN loss: one
    line naming epoch and step, exit 2, and the last good checkpoint, log rows and resume
    state byte-identical."""
    import utils.train.training

    exp = tmp_path / "exp"
    shutil.copytree(reference, exp)
    kept = {n: (exp / n).read_bytes() for n in ("checkpoint.pth", "resume.pth", "log.txt")}
    real, calls = utils.train.training.magnet_loss, {"n": 0}

    def nan_at_step_2(*args, **kwargs):
        calls["n"] += 1
        per_example, other = real(*args, **kwargs)
        return (per_example * float("nan") if calls["n"] == 2 else per_example), other

    monkeypatch.setattr(utils.train.training, "magnet_loss", nan_at_step_2)
    code, err = cli(train_argv(noisy, exp, epochs=3, every=0) + ["--resume"], capsys)
    assert code == 2
    assert err.count("\n") == 1
    assert re.search(r"training stopped in epoch 3: non-finite loss at step 2; the last good "
                     r"checkpoint is kept \(.*checkpoint.pth, epoch 2\): lower --lr", err), err
    assert {n: (exp / n).read_bytes() for n in kept} == kept


# -- bad input --------------------------------------------------------------------------------
class Case:
    """Builds the files a case needs inside ``tmp``."""

    def __init__(self, tmp: Path, tiny: Path, noisy: Path, reference: Path):
        self.tmp, self.tiny, self.noisy, self.ref = tmp, tiny, noisy, reference

    def file(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def saved(self, name: str, obj) -> Path:
        path = self.tmp / name
        torch.save(obj, path)
        return path

    def ckpt(self) -> dict:
        return load_checkpoint(str(self.ref / "checkpoint.pth"))

    def truncated(self, name: str) -> Path:
        data = (self.ref / "checkpoint.pth").read_bytes()
        return self.file(name, data[: len(data) // 2])

    def folder(self, name: str, sizes: dict, odd: dict | None = None) -> Path:
        """train/test image folders with ``sizes[split][class]`` noise images; ``odd`` maps a
        relative path to raw bytes written instead of an image."""
        gen = torch.Generator().manual_seed(2)
        root = self.tmp / name
        for split, classes in sizes.items():
            for cls, n in classes.items():
                for i in range(n):
                    save_png(root / split / cls / f"{i}.png", torch.rand(3, 32, 32,
                                                                          generator=gen))
        for rel, data in (odd or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return root

    def duplicates(self) -> Path:
        """Each class: 3 copies of one image and 1 other, so k-means with k=2 leaves the odd
        image alone in its cluster."""
        root = self.folder("dups", {"test": {"a": 1, "b": 1, "c": 1}})
        gen = torch.Generator().manual_seed(3)
        for cls in ("a", "b", "c"):
            same, other = torch.rand(3, 32, 32, generator=gen), torch.rand(3, 32, 32,
                                                                            generator=gen)
            for i in range(3):
                save_png(root / "train" / cls / f"{i}.png", same)
            save_png(root / "train" / cls / "3.png", other)
        return root


def tiny_args(c: Case) -> list:
    return ["--dataset", "imagefolder", "--data-root", c.tiny, "--train-subset", "36",
            "--m", "3", "--d", "4", "--k", "2", "--L", "6", "--epochs", "1", "--iterations",
            "1", "--restarts", "1", "--quiet", "--workers", "0"]


def evaluate(c: Case, ckpt) -> list:
    return ["--evaluate-ckpt", ckpt, "--dataset", "imagefolder", "--data-root", c.tiny,
            "--iterations", "1", "--restarts", "1", "--quiet", "--workers", "0"]


def resnet_sd() -> dict:
    return ResNet18(3).state_dict()


def nan_weights(c: Case) -> Path:
    sd = resnet_sd()
    sd["conv1.weight"][0, 0, 0, 0] = float("nan")
    return c.saved("nan.pt", sd)


def partial_clusters(c: Case) -> Path:
    ckpt = c.ckpt()
    del ckpt["variance"]
    return c.saved("partial.pth", ckpt)


def results_in_exp(c: Case, *names: str) -> None:
    for name in names:
        c.file(f"exp/{name}", b"earlier results\n")


def copy_run(c: Case, names=None) -> None:
    for name in names or os.listdir(c.ref):
        shutil.copy(c.ref / name, c.tmp / "exp" / name)


def resume_argv(c: Case, epochs: int = 2, extra=(), resume_bytes: bytes | None = None,
                log_bytes: bytes | None = None) -> list:
    """The reference run copied into exp (``resume.pth``, ``log.txt`` replaced by the bytes
    given), resumed."""
    copy_run(c)
    for name, data in (("resume.pth", resume_bytes), ("log.txt", log_bytes)):
        if data is not None:
            (c.tmp / "exp" / name).write_bytes(data)
    return train_argv(c.noisy, c.tmp / "exp", epochs=epochs) + ["--resume", *extra]


def altered_copy(c: Case, image: str) -> Path:
    """The noisy data copied, one image replaced by another (same count, same classes)."""
    shutil.copytree(c.noisy, c.tmp / "other")
    save_png(c.tmp / "other" / image, torch.zeros(3, 32, 32))
    return c.tmp / "other"


def png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


# (id, builder(case) -> argv after --checkpoint, pattern the one-line message must match)
BAD_INPUTS = [
    ("unknown-dataset", lambda c: tiny_args(c) + ["--dataset", "mnist"],
     r"argument --dataset: invalid choice: 'mnist'"),
    ("unknown-arch", lambda c: tiny_args(c) + ["--arch", "vgg16"],
     r"argument --arch: invalid choice: 'vgg16'"),
    ("image-folder-missing", lambda c: tiny_args(c) + ["--data-root", c.tmp / "nowhere"],
     r"image folder .*nowhere/train not found: --dataset imagefolder needs --data-root DIR"),
    ("pretrained-missing", lambda c: tiny_args(c) + ["--pretrained-path", c.tmp / "no.pt"],
     r"no\.pt: no such file"),
    ("pretrained-text-file", lambda c: tiny_args(c) + [
        "--pretrained-path", c.file("notes.pt", b"these are not weights\n")],
     r"notes\.pt is not a readable PyTorch file \(truncated or corrupt\?\)"),
    ("pretrained-no-tensors", lambda c: tiny_args(c) + [
        "--pretrained-path", c.saved("meta.pt", {"epoch": 3, "acc": 0.5})],
     r"meta\.pt holds no tensors: not a weight file"),
    ("pretrained-other-arch", lambda c: tiny_args(c) + [
        "--pretrained-path", c.saved("mlp.pt", torch.nn.Linear(4, 2).state_dict())],
     r"mlp\.pt does not match the ResNet18 of this project \(missing: conv1\.weight"),
    ("pretrained-other-classes", lambda c: tiny_args(c) + [
        "--pretrained-path", c.saved("c10.pt", ResNet18(10).state_dict())],
     r"c10\.pt does not match .*mis-shaped \(file vs model\): linear\.weight \(10, 512\)"),
    ("pretrained-truncated", lambda c: tiny_args(c) + [
        "--pretrained-path", c.truncated("half.pt")],
     r"half\.pt is not a readable PyTorch file \(truncated or corrupt\?\)"),
    ("pretrained-pickled-object", lambda c: tiny_args(c) + [
        "--pretrained-path", c.saved("obj.pt", {"state_dict": resnet_sd(),
                                               "args": argparse.Namespace(lr=0.1)})],
     r"obj\.pt holds a pickled argparse\.Namespace object: refused, because unpickling "
     r"arbitrary objects can run code"),
    ("pretrained-non-finite", lambda c: tiny_args(c) + ["--pretrained-path", nan_weights(c)],
     r"nan\.pt holds non-finite values \(NaN or inf\) in conv1\.weight"),
    ("L-above-clusters", lambda c: tiny_args(c) + ["--L", "7"],
     r"--L 7 is larger than the 6 clusters \(3 classes x --k 2\)"),
    ("m-above-clusters", lambda c: tiny_args(c) + ["--m", "7"],
     r"--m 7 is larger than the 6 clusters"),
    ("too-few-impostors", lambda c: tiny_args(c) + ["--m", "6"],
     r"--m 6 needs 5 impostor clusters of other classes but there are only 4"),
    ("d-below-2", lambda c: tiny_args(c) + ["--d", "1"],
     r"--d 1: the Magnet loss needs at least 2 examples per cluster"),
    ("k-above-smallest-class", lambda c: tiny_args(c) + ["--k", "13"],
     r"--k 13 is larger than the 12 training examples of class 'alpha'"),
    ("k-clusters-below-2", lambda c: tiny_args(c) + ["--k", "7"],
     r"class 'alpha' has 12 training examples, too few for --k 7 clusters of at least 2"),
    ("lr-zero", lambda c: tiny_args(c) + ["--lr", "0"],
     r"argument --lr: must be a finite number above 0, got 0"),
    ("lr-negative", lambda c: tiny_args(c) + ["--lr=-1e-4"], r"argument --lr: must be a finite"),
    ("lr-nan", lambda c: tiny_args(c) + ["--lr", "nan"], r"argument --lr: must be a finite"),
    ("lr-inf", lambda c: tiny_args(c) + ["--lr", "inf"], r"argument --lr: must be a finite"),
    ("epochs-zero", lambda c: tiny_args(c) + ["--epochs", "0"], r"argument --epochs: must be"),
    ("batch-size-zero", lambda c: tiny_args(c) + ["--batch-size", "0"],
     r"argument --batch-size: must be"),
    ("test-batch-negative", lambda c: tiny_args(c) + ["--test-batch=-8"],
     r"argument --test-batch: must be"),
    ("embed-batch-zero", lambda c: tiny_args(c) + ["--embed-batch", "0"],
     r"argument --embed-batch: must be"),
    ("iterations-zero", lambda c: tiny_args(c) + ["--iterations", "0"],
     r"argument --iterations: must be"),
    ("restarts-zero", lambda c: tiny_args(c) + ["--restarts", "0"],
     r"argument --restarts: must be"),
    ("epochs-not-a-number", lambda c: tiny_args(c) + ["--epochs", "ten"],
     r"argument --epochs: 'ten' is not an integer"),
    ("evaluate-missing", lambda c: evaluate(c, c.tmp / "nothing.pth"),
     r"nothing\.pth: no such file"),
    ("evaluate-directory", lambda c: evaluate(c, c.tmp), r"is a directory, not a checkpoint"),
    ("evaluate-partial-cluster-keys", lambda c: evaluate(c, partial_clusters(c)),
     r"checkpoint has cluster_centers, cluster_classes, K but lacks variance"),
    ("evaluate-other-arch", lambda c: evaluate(c, c.saved("other.pth", {
        **c.ckpt(), "state_dict": {"linear.weight": torch.zeros(3, 512),
                                   "fc.bias": torch.zeros(3)}})),
     r"checkpoint does not match the ResNet18 of this project \(missing: conv1\.weight.*"
     r"unexpected: fc\.bias"),
    ("evaluate-bad-cluster-shape", lambda c: evaluate(c, c.saved("shape.pth", {
        **c.ckpt(), "cluster_centers": torch.zeros(3, 64)})),
     r"inconsistent cluster state: centers \(3, 64\) \(need \(C\*K, 512\)\)"),
    ("evaluate-nan-variance", lambda c: evaluate(c, c.saved("var.pth", {
        **c.ckpt(), "variance": torch.full((3,), float("nan"))})),
     r"cluster state holds NaN/inf, a non-positive variance"),
    ("evaluate-no-weights", lambda c: evaluate(c, c.saved("empty.pth", {"epoch": 1})),
     r"checkpoint has no ResNet18 weights"),
    ("evaluate-truncated", lambda c: evaluate(c, c.truncated("half.pth")),
     r"half\.pth is not a readable PyTorch file \(truncated or corrupt\?\)"),
    ("evaluate-empty-file", lambda c: evaluate(c, c.file("zero.pth", b"")),
     r"zero\.pth is not a readable PyTorch file"),
    ("evaluate-pickled-object", lambda c: evaluate(c, c.saved(
        "obj.pth", {**c.ckpt(), "args": argparse.Namespace(lr=0.1)})),
     r"obj\.pth holds a pickled argparse\.Namespace object: refused"),
    ("evaluate-raw-pickle", lambda c: evaluate(c, c.file(
        "raw.pth", pickle.dumps(argparse.Namespace(a=1), protocol=4))),
     r"raw\.pth holds a pickled argparse\.Namespace object: refused"),
    # beyond the list
    ("seed-negative", lambda c: tiny_args(c) + ["--seed=-1"],
     r"argument --seed: must be between 0 and 2\*\*32 - 1, got -1"),
    ("seed-too-large", lambda c: tiny_args(c) + ["--seed", str(2 ** 32)],
     r"argument --seed: must be between 0"),
    ("device-nonsense", lambda c: tiny_args(c) + ["--device", "tpu"],
     r"--device 'tpu': not a device \(use auto, cpu, cuda or cuda:N\)"),
    ("device-meta", lambda c: tiny_args(c) + ["--device", "meta"],
     r"--device meta: only auto, cpu, cuda and cuda:N are supported"),
    ("device-cuda-index", lambda c: tiny_args(c) + ["--device", "cuda:99"],
     r"--device cuda:99: (CUDA is not available|this machine has \d+ CUDA)"),
    ("milestones-repeated", lambda c: tiny_args(c) + ["--milestones", "3", "3"],
     r"--milestones 3 3: an epoch is listed twice"),
    ("alpha-nan", lambda c: tiny_args(c) + ["--alpha", "nan"], r"argument --alpha: must be"),
    ("lambda-inf", lambda c: tiny_args(c) + ["--consistency-lambda", "inf"],
     r"argument --consistency-lambda: must be"),
    ("autoattack-eps-beyond-pixels", lambda c: tiny_args(c) + [
        "--strong", "--autoattack-eps", "8", "300"],
     r"--autoattack-eps 300: eps is in units of 1/255, so at most 255"),
    ("strong-subset-above-test-subset", lambda c: tiny_args(c) + [
        "--test-subset", "6", "--strong", "--strong-subset", "9"],
     r"--strong-subset 9 is larger than the 6 examples available"),
    ("strong-subset-below-classes", lambda c: evaluate(c, c.ref / "checkpoint.pth") + [
        "--strong", "--strong-subset", "2", "--data-root", c.noisy],
     r"--strong-subset 2: a subset of 2 cannot hold all 3 classes"),
    ("checkpoint-every-negative", lambda c: tiny_args(c) + ["--checkpoint-every=-1"],
     r"argument --checkpoint-every: must be"),
    ("test-subset-above-set", lambda c: tiny_args(c) + ["--test-subset", "100"],
     r"--test-subset 100 is larger than the 18 examples available"),
    ("train-subset-above-set", lambda c: tiny_args(c) + ["--train-subset", "100"],
     r"--train-subset 100 is larger than the 72 examples available"),
    ("train-subset-below-classes", lambda c: tiny_args(c) + ["--train-subset", "2"],
     r"a subset of 2 cannot hold all 3 classes"),
    ("unreadable-image", lambda c: tiny_args(c) + ["--train-subset", "6", "--data-root", c.folder(
        "broken", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}},
        {"train/a/bad.png": b"\x89PNG\r\n\x1a\n not really"})],
     r"bad\.png: unreadable image \(UnidentifiedImageError"),
    ("image-wrong-size", lambda c: tiny_args(c) + ["--data-root", c.folder(
        "big", {"train": {"a": 2}, "test": {"a": 1}}, {"train/a/wide.png": png_bytes(64, 32)})],
     r"wide\.png is 64x32: --dataset imagefolder needs 32x32 RGB images"),
    ("classes-differ", lambda c: tiny_args(c) + ["--train-subset", "4", "--data-root", c.folder(
        "mixed", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "c": 1}})],
     r"the training classes \['a', 'b'\] and test classes \['a', 'c'\] differ"),
    ("checkpoint-is-a-file", lambda c: ["--checkpoint", c.file("exp.txt", b"x")] + tiny_args(c),
     r"--checkpoint .*exp\.txt is a file, not a directory"),
    ("checkpoint-empty", lambda c: ["--checkpoint", ""] + tiny_args(c),
     r"--checkpoint is empty"),
    ("resume-nothing", lambda c: tiny_args(c) + ["--resume"],
     r"--resume: .*resume\.pth not found, so there is no interrupted run to continue"),
    ("resume-and-overwrite", lambda c: tiny_args(c) + ["--resume", "--overwrite"],
     r"give one of the two"),
    ("resume-evaluation-nothing", lambda c: evaluate(c, c.ref / "checkpoint.pth") + ["--resume"],
     r"--resume: .*eval_resume\.pth not found, so there is no interrupted evaluation to "
     r"continue"),
    ("resume-evaluation-not-ours", lambda c: results_in_exp(c, "eval_resume.pth")
     or evaluate(c, c.ref / "checkpoint.pth") + ["--resume", "--data-root", c.noisy],
     r"eval_resume\.pth is not a readable PyTorch file"),
    # no clobbering
    ("results-log", lambda c: results_in_exp(c, "log.txt") or tiny_args(c),
     r"already holds results \(log\.txt\): choose a new --checkpoint directory, or pass "
     r"--overwrite to replace them, --resume to continue its run"),
    ("results-checkpoint", lambda c: results_in_exp(c, "checkpoint.pth") or tiny_args(c),
     r"already holds results \(checkpoint\.pth\)"),
    ("results-attack-csv", lambda c: results_in_exp(c, "attack_results_ext.csv") or tiny_args(c),
     r"already holds results \(attack_results_ext\.csv\)"),
    ("evaluation-results", lambda c: results_in_exp(c, "attack_results_ext.csv", "robustness.png")
     or evaluate(c, c.ref / "checkpoint.pth"),
     r"already holds evaluation results \(attack_results_ext\.csv, robustness\.png\): choose a "
     r"new --checkpoint directory, or pass --overwrite"),
    ("evaluate-into-training-run", lambda c: copy_run(c, ["params.txt", "log.txt"])
     or evaluate(c, c.ref / "checkpoint.pth"),
     r"already holds evaluation results \(params\.txt\)"),
    # resume state that does not fit
    ("resume-other-arguments", lambda c: resume_argv(c, extra=["--m", "3"]),
     r"--resume needs the interrupted run's arguments: it had --m 2 \(now 3\)"),
    ("resume-fewer-epochs", lambda c: resume_argv(c, epochs=1),
     r"--resume: the run already completed 2 epochs, more than --epochs 1"),
    ("resume-other-training-images", lambda c: resume_argv(
        c, extra=["--data-root", altered_copy(c, "train/bee/1.png")]),
     r"--resume: the training images changed since the run started \(--data-root .*other"),
    ("resume-other-test-images", lambda c: resume_argv(
        c, extra=["--data-root", altered_copy(c, "test/cat/0.png")]),
     r"--resume: the test images changed since the run started"),
    ("resume-truncated", lambda c: resume_argv(
        c, resume_bytes=(c.ref / "resume.pth").read_bytes()[:4096]),
     r"resume\.pth is not a readable PyTorch file \(truncated or corrupt\?\)"),
    ("resume-log-rows-missing", lambda c: resume_argv(c, log_bytes=(
        c.ref / "log.txt").read_bytes().split(b"\n", 1)[0] + b"\n"),
     r"log\.txt does not hold one row for each of the 2 completed epochs"),
    ("resume-not-ours", lambda c: resume_argv(
        c, resume_bytes=(c.ref / "checkpoint.pth").read_bytes()),
     r"resume\.pth is not a resume state of this project"),
]


@pytest.mark.parametrize("make_argv, pattern", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_one_line_exit_2_nothing_changed(make_argv, pattern, tiny_folder, noisy,
                                                  reference, tmp_path, capsys):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "notes.md").write_bytes(b"the user's own notes\n")
    case = Case(tmp_path, tiny_folder, noisy, reference)
    argv = make_argv(case)
    if "--checkpoint" not in argv:
        argv = ["--checkpoint", tmp_path / "exp"] + argv
    before = snapshot(tmp_path)
    code, err = cli(argv, capsys)
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert snapshot(tmp_path) == before


def test_offline_dataset_real_process(tmp_path):
    """A real process, offline (a proxy that refuses): exit 2, one line naming the expected
    files, and the data folder it would have created is not left behind."""
    exp = tmp_path / "exp"
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               no_proxy="", NO_PROXY="")
    proc = subprocess.run([sys.executable, str(ROOT / "main_clustr.py"), "--checkpoint",
                           str(exp), "--dataset", "cifar10", "--data-root",
                           str(tmp_path / "data"), "--quiet"], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert re.search(r"cifar10 train set not found in .*data and could not be downloaded "
                     r"\(\w+\); place cifar-10-batches-py/", proc.stderr), proc.stderr
    assert os.listdir(tmp_path) == []


# -- atomic files, safe loading ------------------------------------------------------
def test_killed_save_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"epoch": 1, "w": torch.ones(3)}, str(path))
    before = path.read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)
        raise Killed("while saving")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(Killed):
        save_atomic({"epoch": 2, "w": torch.zeros(3)}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert load_checkpoint(str(path))["epoch"] == 1


def test_every_torch_load_is_weights_only():
    """Policy over the project's code (tests excluded): no torch.load without
    weights_only=True."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "data") or any(p.startswith(".") for p in rel.parts):
            continue
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 1, match.end()
            while depth and end < len(text):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            if "weights_only=True" not in text[match.end():end]:
                offenders.append(f"{rel}:{text.count(chr(10), 0, match.start()) + 1}")
    assert offenders == []
