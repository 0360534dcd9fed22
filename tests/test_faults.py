# ruff: noqa: F811 (the fixtures imported from test_reliability are parameters here)
"""Faults a hostile user can cause: two runs into one folder, inputs that do not match the
checkpoint or the interrupted run, damaged result files. Each is refused with one line and
nothing on disk changed (or, for a stale lock, recognised and explained).

Runs ``main_clustr.main`` in-process on the tiny image folders of ``test_reliability``.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_clustr
from base.errors import UsageError
from base.io import load_checkpoint
from tests.conftest import ROOT
from tests.test_reliability import (  # noqa: F401 (fixtures)
    cli,
    no_sweep,
    noisy,
    reference,
    snapshot,
    train_argv,
)
from utils import inspect_ckpt
from utils.outputs.experiment_dir import ExperimentDir
from utils.train_setting import parse_args


# -- one run at a time per folder --------------------------------------------------------------
def test_second_run_into_a_folder_in_use_is_refused(noisy, no_sweep, tmp_path, capsys):
    exp = tmp_path / "exp"
    with ExperimentDir(str(exp)).locked():
        before = snapshot(tmp_path)
        code, err = cli(train_argv(noisy, exp, epochs=1), capsys)
        assert snapshot(tmp_path) == before
    assert code == 2 and err.count("\n") == 1, err
    assert re.search(r"exp is in use by another run \(pid \d+ on .* since .*\): wait for it",
                     err), err
    assert not exp.exists()  # created for the lock only, and removed with it


def test_run_holding_the_folder_in_another_process_refuses_the_second(noisy, tmp_path,
                                                                     capsys):
    exp = tmp_path / "exp"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from utils.outputs.experiment_dir import "
         "ExperimentDir\nwith ExperimentDir(sys.argv[1]).locked():\n    print('held', "
         "flush=True)\n    sys.stdin.read()", str(exp)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        code, err = cli(train_argv(noisy, exp, epochs=1), capsys)
    finally:
        holder.communicate("")  # end of input: it releases the lock and exits
    assert code == 2 and f"(pid {holder.pid} on " in err, err
    assert holder.returncode == 0 and not exp.exists()


def test_stale_lock_of_a_killed_run_is_taken_over(noisy, no_sweep, tmp_path, capsys, caplog):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / ".clustr.lock").write_text("pid 4000000 on elsewhere since 2026-01-01 00:00:00\n")
    with caplog.at_level(logging.WARNING, logger="clustr"):
        code, err = cli(train_argv(noisy, exp, epochs=1), capsys)
    assert code == 0, err
    assert "taking over the lock left by a run that ended without releasing it (pid 4000000 " \
           "on elsewhere" in caplog.text
    assert (exp / "checkpoint.pth").is_file() and not (exp / ".clustr.lock").exists()


def test_refused_run_leaves_no_folder(noisy, tmp_path, capsys):
    exp = tmp_path / "new" / "exp"
    code, err = cli(train_argv(noisy, exp) + ["--test-subset", "100"], capsys)
    assert code == 2 and "--test-subset 100" in err, err
    assert os.listdir(tmp_path) == []


# -- data that does not match the checkpoint ---------------------------------------------------
def renamed_copy(src: Path, dst: Path, old: str, new: str) -> Path:
    shutil.copytree(src, dst)
    for split in ("train", "test"):
        (dst / split / old).rename(dst / split / new)
    return dst


def test_evaluation_refuses_test_classes_named_otherwise(reference, noisy, tmp_path, capsys):
    """Same number of classes, one renamed: the labels would shift silently."""
    data = renamed_copy(noisy, tmp_path / "data", "bee", "bumblebee")
    argv = ["--checkpoint", tmp_path / "eval", "--evaluate-ckpt", reference / "checkpoint.pth",
            "--dataset", "imagefolder", "--data-root", data, "--iterations", "1", "--restarts",
            "1", "--quiet", "--workers", "0", "--device", "cpu"]
    before = snapshot(tmp_path)
    code, err = cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "classes ['ant', 'bee', 'cat'] and the test set's ['ant', 'bumblebee', 'cat'] " \
           "differ (from position 1)" in err, err
    assert snapshot(tmp_path) == before


def test_classes_differing_late_are_shown_where_they_differ(tmp_path, capsys):
    from tests.test_reliability import save_png

    for split, names in (("train", "abcdefgh"), ("test", "abcdefgz")):
        for name in names:
            for i in range(2):
                save_png(tmp_path / "d" / split / name / f"{i}.png", torch.rand(3, 32, 32))
    code, err = cli(["--checkpoint", tmp_path / "exp", "--dataset", "imagefolder",
                     "--data-root", tmp_path / "d", "--quiet", "--workers", "0"], capsys)
    assert code == 2, err
    assert "[..., 'f', 'g', 'h'] and test classes [..., 'f', 'g', 'z'] differ (from " \
           "position 7)" in err, err


# -- values read from a checkpoint are checked like flags --------------------------------------
@pytest.mark.parametrize("value", [0, -3, "eight", 1000, True, 2.5])
def test_checkpoint_L_is_checked_like_the_flag(reference, noisy, tmp_path, capsys, value):
    ckpt = load_checkpoint(str(reference / "checkpoint.pth"))
    ckpt["L"] = value
    path = tmp_path / "odd_L.pth"
    torch.save(ckpt, path)
    before = snapshot(tmp_path)
    code, err = cli(["--checkpoint", tmp_path / "eval", "--evaluate-ckpt", path, "--dataset",
                     "imagefolder", "--data-root", noisy, "--iterations", "1", "--restarts",
                     "1", "--quiet", "--workers", "0", "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"the checkpoint's L {str(value)!r} is not a whole number from 1 to its 3 " \
           f"clusters" in err, err
    assert snapshot(tmp_path) == before
    assert inspect_ckpt.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a whole number from 1" in err, err


def test_continue_line_after_an_interrupted_overwrite_run_is_accepted(tmp_path):
    (tmp_path / "resume.pth").write_bytes(b"state")
    command = ["--checkpoint", str(tmp_path), "--epochs", "3", "--overwrite"]
    args = parse_args(command)
    line = main_clustr.how_to_continue(args, command, KeyboardInterrupt())
    again = shlex.split(line.split("python main_clustr.py ", 1)[1])
    assert again == ["--checkpoint", str(tmp_path), "--epochs", "3", "--resume"]
    parse_args(again)  # the parser takes it


# -- every entry point: one line -----------------------------------------------------------
def _status(main, argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("tool", ["from_autoattack", "pretrain"])
def test_out_under_a_file_is_one_line_before_any_work(tool, tmp_path, capsys):
    from pretrained_weights import from_autoattack
    from utils.train import pretrain

    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "w.pt"
    main, extra = ((from_autoattack.main, []) if tool == "from_autoattack" else
                   (pretrain.main, ["--dataset", "imagefolder", "--data-root",
                                    tmp_path / "no-data"]))
    assert _status(main, ["--out", out, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}: {tmp_path / 'afile'} is a file" in err, err


@pytest.mark.parametrize("tool", ["inspect_ckpt", "from_autoattack", "reproduce"])
def test_usage_errors_are_one_line(tool, capsys):
    from benchmarks import reproduce
    from pretrained_weights import from_autoattack

    main = {"inspect_ckpt": inspect_ckpt.main, "from_autoattack": from_autoattack.main,
            "reproduce": reproduce.main}[tool]
    assert _status(main, ["x.pth", "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments" in err, err


# -- a stop before the first step ---------------------------------------------------------
def test_ctrl_c_during_data_loading_stops_at_once(noisy, tmp_path, capsys, monkeypatch):
    real, calls = main_clustr.load_data, []

    def interrupted(args):
        data = real(args)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as loading ends, before k-means
        calls.append("after the signal")
        return data

    monkeypatch.setattr(main_clustr, "load_data", interrupted)
    code, err = cli(train_argv(noisy, tmp_path / "exp"), capsys)
    assert code == 130, err
    assert calls == [] and err.count("\n") == 1, err
    assert "nothing was saved yet; run the command again" in err
    assert not (tmp_path / "exp").exists()


# -- files that are not checkpoints --------------------------------------------------------
@pytest.mark.parametrize("data", [b"101\n", b"these are not weights\n", b"{\"epoch\": 3}"])
def test_text_file_as_checkpoint_says_what_it_is(tmp_path, data):
    (tmp_path / "c.pth").write_bytes(data)
    with pytest.raises(UsageError) as exc:
        load_checkpoint(str(tmp_path / "c.pth"))
    assert str(exc.value) == (f"{tmp_path / 'c.pth'} is not a readable PyTorch file "
                              f"(truncated or corrupt?): neither a zip archive nor a pickle "
                              f"(a text file, or another format)")


@pytest.mark.parametrize("protocol", [2, 4])
def test_plain_pickle_with_code_names_the_type(tmp_path, protocol):
    (tmp_path / "p.pth").write_bytes(pickle.dumps({"args": argparse.Namespace(lr=0.1)},
                                                  protocol=protocol))
    with pytest.raises(UsageError, match=r"p\.pth holds a pickled argparse\.Namespace object: "
                                         r"refused"):
        load_checkpoint(str(tmp_path / "p.pth"))


# -- what is logged is what runs -----------------------------------------------------------
def test_batch_line_says_what_a_batch_holds(noisy, no_sweep, tmp_path, capsys, caplog):
    """Clusters of 3 images: --d 1000 takes all 3 of each, not 1000."""
    argv = train_argv(noisy, tmp_path / "exp", epochs=1)
    argv[argv.index("--d") + 1] = "1000"
    with caplog.at_level(logging.INFO, logger="clustr"):
        code, err = cli(argv, capsys)
    assert code == 0, err
    assert "1 steps of 2 x 3 examples per epoch (--d 1000: no cluster holds more than 3 " \
           "now)" in caplog.text


def test_disk_full_is_one_line_naming_the_file(noisy, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code, err = cli(train_argv(noisy, tmp_path / "exp", epochs=1), capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert re.search(r"cannot write .*exp/resume\.pth: No space left on device", err), err


@pytest.mark.parametrize("value", ["false", 2, None])
def test_checkpoint_normalize_probs_is_checked(reference, tmp_path, capsys, value):
    ckpt = load_checkpoint(str(reference / "checkpoint.pth"))
    ckpt["normalize_probs"] = value
    torch.save(ckpt, tmp_path / "odd.pth")
    assert inspect_ckpt.main([str(tmp_path / "odd.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"normalize_probs {str(value)!r} is not True or False" \
        in err, err
