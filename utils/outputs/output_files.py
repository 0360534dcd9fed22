"""Files a command writes outside an experiment folder (a table, a plot, converted weights),
all checked before any is written: an existing file is replaced only when the user asked for
it, an experiment folder's result file never, and two outputs never share a path.
"""
from __future__ import annotations

import fnmatch
import os

from base.errors import UsageError
from utils.outputs.experiment_dir import ExperimentDir
from utils.outputs.files import EVAL_OUTPUTS, TRAIN_OUTPUTS

RESULTS = TRAIN_OUTPUTS + EVAL_OUTPUTS


def check_outputs(outputs: dict[str, str | None], replace: str, replacing: bool,
                  make_folder: bool = False) -> None:
    """``outputs``: flag -> path (None: not written); ``replace``: the flag that allows
    replacing an existing file and ``replacing`` whether it was given; ``make_folder``:
    the writer creates missing folders."""
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        if path is not None:
            _check_output(flag, str(path), make_folder)
            if os.path.exists(path) and not replacing:
                raise UsageError(f"{flag} {path} already exists: choose another name, or pass "
                                 f"{replace} to replace it")
            real = os.path.realpath(path)
            if real in seen:
                raise UsageError(f"{flag} and {seen[real]} name the same file {path}: give "
                                 f"each output its own")
            seen[real] = flag


def _check_output(flag: str, path: str, make_folder: bool) -> None:
    """One output path: a file name in a writable folder, not an experiment's result."""
    if not path.strip():
        raise UsageError(f"{flag} is empty: name the file to write")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory: name the file to write")
    folder = existing = os.path.dirname(os.path.abspath(path))
    while make_folder and not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.exists(existing):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder {existing} is not writable")
    name = os.path.basename(path)
    if any(fnmatch.fnmatchcase(name, p) for p in RESULTS) and \
            ExperimentDir(folder).existing(RESULTS):
        raise UsageError(f"{flag} {path} is a result file name of the experiment folder "
                         f"{folder}: write it elsewhere")
