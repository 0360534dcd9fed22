"""--batch-size and --arch are accepted so that the original's commands run, and ignored."""
from __future__ import annotations

from utils.train_setting import build_parser, ignored_arguments, parse_args


def test_help_says_they_are_ignored():
    text = " ".join(build_parser().format_help().split())
    for flag in ("--batch-size", "--arch"):
        assert f"{flag} " in text
    assert text.count("ignored, accepted so that the original's commands run") == 2


def test_a_batch_size_that_would_change_the_run_warns():
    assert ignored_arguments(parse_args(["--checkpoint", "x"])) == []
    warnings = ignored_arguments(parse_args(["--checkpoint", "x", "--batch-size", "128"]))
    assert len(warnings) == 1
    assert "--batch-size 128 is ignored" in warnings[0] and "240 examples" in warnings[0]
