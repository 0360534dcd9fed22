# ruff: noqa: F811 (the fixtures imported from test_reliability are parameters here)
"""Faults a hostile user can cause: two runs into one folder, inputs that do not match the
checkpoint or the interrupted run, damaged result files. Each is refused with one line and
nothing on disk changed (or, for a stale lock, recognised and explained).

Runs ``main_clustr.main`` in-process on the tiny image folders of ``test_reliability``.
"""
from __future__ import annotations

import logging
import os
import re

from tests.test_reliability import (  # noqa: F401 (fixtures)
    cli,
    no_sweep,
    noisy,
    reference,
    snapshot,
    train_argv,
)
from utils.outputs.experiment_dir import ExperimentDir


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
