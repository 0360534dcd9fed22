"""What a training run continued with --resume must repeat: the arguments behind the config
fields declared with ``base.cli.resume_field`` (the training's and the evaluation's), read by
``utils.train.resume.read_resume`` from the same declarations as the evaluation's resume."""
from __future__ import annotations

import pytest
import torch

from base.cli import resume_arguments, resume_settings
from base.errors import UsageError
from utils.eval.evaluation import AttackConfig, EvalConfig
from utils.train.resume import FORMAT, REQUIRED, must_repeat, read_resume
from utils.train_setting import parse_args, run_arguments

# Written out here, not read from the code: where things are, how they are shown, how long
# to go on, and the evaluation settings its own resume checks. Every other argument must be
# repeated, so a new argument has to be declared one way or the other.
MAY_CHANGE = {
    "checkpoint", "data_root", "pretrained_path", "device", "workers", "quiet", "resume",
    "overwrite", "checkpoint_every", "save_all", "epochs", "iterations", "restarts",
    "test_batch", "attack_batch", "embed_batch", "evaluate_ckpt", "dist_timeout",
}


def saved_run(tmp_path, argv: list[str]) -> tuple[str, dict]:
    args = run_arguments(parse_args(["--checkpoint", "x", *argv]))
    path = tmp_path / "resume.pth"
    torch.save({**{k: {} for k in REQUIRED}, "format": FORMAT, "epoch": 1, "args": args},
               path)
    return str(path), args


def test_every_argument_is_declared_repeated_or_free():
    args = set(run_arguments(parse_args(["--checkpoint", "x"])))
    assert must_repeat() == args - MAY_CHANGE
    assert must_repeat() <= args  # each declaration names a real argument


def test_the_declarations_are_the_evaluations_too():
    """The evaluation's resume reads the same fields; a training resume leaves out those
    declared training=False (the evaluation checks them itself)."""
    flags = set(resume_settings(EvalConfig(), AttackConfig()))
    assert {"--iterations", "--restarts", "--test-batch", "--strong"} <= flags
    assert not {"iterations", "restarts", "test_batch"} & resume_arguments(EvalConfig,
                                                                             AttackConfig)
    assert {"strong", "seed", "not_normalize", "dataset"} <= must_repeat()


@pytest.mark.parametrize("change", [["--epochs", "5"], ["--iterations", "3"],
                                    ["--restarts", "2"], ["--test-batch", "8"],
                                    ["--embed-batch", "16"], ["--attack-batch", "4"],
                                    ["--workers", "0"], ["--quiet"], ["--checkpoint-every", "3"],
                                    ["--save-all"], ["--device", "cpu"]])
def test_a_resume_may_change(tmp_path, change):
    path, _ = saved_run(tmp_path, [])
    now = run_arguments(parse_args(["--checkpoint", "y", *change]))
    assert read_resume(path, now, 5)["epoch"] == 1


@pytest.mark.parametrize("change, shown", [
    (["--k", "3"], "--k 2 (now 3)"),
    (["--lr", "0.001"], "--lr 0.0001 (now 0.001)"),
    (["--milestones", "10"], "--milestones [30, 60] (now [10])"),
    (["--train-subset", "30"], "--train-subset None (now 30)"),
    (["--not-normalize"], "--not-normalize False (now True)"),
    (["--batch-size", "128"], "--batch-size 256 (now 128)"),
    (["--strong"], "--strong False (now True)"),
])
def test_a_resume_must_repeat(tmp_path, change, shown):
    path, _ = saved_run(tmp_path, [])
    now = run_arguments(parse_args(["--checkpoint", "x", *change]))
    with pytest.raises(UsageError) as exc:
        read_resume(path, now, 5)
    assert str(exc.value) == (f"--resume needs the interrupted run's arguments: it had {shown}; "
                              f"repeat its command with --resume, or start afresh with "
                              f"--overwrite")


def test_an_older_file_means_no_as_original(tmp_path):
    path, args = saved_run(tmp_path, [])
    state = torch.load(path, weights_only=True)
    del state["args"]["as_original"]
    torch.save(state, path)
    assert read_resume(path, args, 5)["epoch"] == 1
    with pytest.raises(UsageError, match=r"--as-original False \(now True\)"):
        read_resume(path, {**args, "as_original": True}, 5)
