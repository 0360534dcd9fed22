"""The experiment directory (``--checkpoint``): a run never overwrites results it was not
asked to replace, decided before anything is written, under the lock that keeps a second run
out (``run_lock``). The rules: docs/failures.md, "No clobbering".
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
import os

from base.errors import UsageError
from base.io import temp_prefix
from utils.outputs.files import EVAL_OUTPUTS, EVAL_RESUME, RESUME, TRAIN_OUTPUTS
from utils.outputs.run_lock import holding_lock

log = logging.getLogger("clustr")


class ExperimentDir:
    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def outputs(self, evaluate_only: bool) -> tuple[str, ...]:
        """The patterns a run of this kind writes (and so would overwrite)."""
        return EVAL_OUTPUTS if evaluate_only else TRAIN_OUTPUTS + EVAL_OUTPUTS

    def existing(self, patterns) -> list[str]:
        """Names of the files in the directory that match any of ``patterns``, sorted."""
        if not os.path.isdir(self.path):
            return []
        return sorted(name for name in os.listdir(self.path)
                      if os.path.isfile(self.file(name))
                      and any(fnmatch.fnmatchcase(name, p) for p in patterns))

    def locked(self, enabled: bool = True):
        """Held from before ``check`` to the run's end: one run at a time in the directory
        (``run_lock``); ``enabled`` False (the other processes of a torchrun) holds none."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UsageError(f"--checkpoint {self.path} is a file, not a directory: choose "
                             f"another experiment directory")
        folder = os.path.abspath(self.path)
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise UsageError(f"--checkpoint {self.path}: {folder} is a file, not a directory")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"--checkpoint {self.path}: {folder} is not writable")
        return holding_lock(self.path) if enabled else contextlib.nullcontext()

    def check(self, evaluate_only: bool, resume: bool, overwrite: bool) -> None:
        """Refuse, before anything is written, a directory this run must not write into (its
        location was checked by ``locked``)."""
        if resume:
            name, kind = (EVAL_RESUME, "evaluation") if evaluate_only else (RESUME, "run")
            if not os.path.isfile(self.file(name)):
                raise UsageError(f"--resume: {self.file(name)} not found, so there is "
                                 f"no interrupted {kind} to continue in {self.path} (run "
                                 f"without --resume to start one)")
            return
        found = self.existing(self.outputs(evaluate_only))
        if found and not overwrite:
            kind = "evaluation results" if evaluate_only else "results"
            more = "" if evaluate_only else ", --resume to continue its run"
            shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            raise UsageError(f"{self.path} already holds {kind} ({shown}): choose a new "
                             f"--checkpoint directory, or pass --overwrite to replace them"
                             f"{more}")

    def prepare(self, evaluate_only: bool, overwrite: bool, inputs=()) -> None:
        """Create the directory, drop temporaries left by a killed run and, with
        ``overwrite``, delete the previous outputs (never a file this run reads)."""
        os.makedirs(self.path, exist_ok=True)
        keep = {os.path.realpath(p) for p in inputs if p}
        patterns = self.outputs(evaluate_only)
        stale = [n for n in os.listdir(self.path)
                 if any(fnmatch.fnmatchcase(n, temp_prefix(p) + "*") for p in patterns)]
        old = self.existing(patterns) if overwrite else []
        for name in stale + old:
            if os.path.realpath(self.file(name)) not in keep:
                os.unlink(self.file(name))
        if old:
            log.info("--overwrite: removed %d previous result file(s) from %s", len(old), self.path)
