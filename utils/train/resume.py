"""Resuming an interrupted training run exactly where it stopped (docs/failures.md, "Resume").

``resume.pth`` sits beside ``checkpoint.pth`` (which keeps the original's layout) and is
rewritten atomically after every epoch and, with ``--checkpoint-every N``, every N steps. It
holds tensors and plain types only, so it loads with ``weights_only=True``; continuing from
it replays the same batches, augmentations and updates.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from base.cli import resume_arguments
from base.errors import UsageError, first_line
from base.io import load_checkpoint, save_atomic
from base.tensors import tensor_sha256
from utils.eval.evaluation import AttackConfig, EvalConfig
from utils.train.training import TrainConfig

log = logging.getLogger("clustr")

FORMAT = "clustr-resume-1"
REQUIRED = ("format", "epoch", "step", "totals", "args", "model", "optimizer", "scheduler",
            "trainer", "rng")
# Arguments added after resume files were first written, with the value an older file means.
ADDED_LATER = {"as_original": False}


def must_repeat() -> frozenset[str]:
    """The arguments a resumed training run must repeat, as its configs declare them
    (``base.cli.resume_field``); the others (where things are, how they are shown, how long
    to go on) may change."""
    return resume_arguments(TrainConfig, EvalConfig, AttackConfig)


@dataclass
class Position:
    """Where a run stands: ``epoch`` epochs done, ``step`` steps of the next one done, and the
    running sums of its loss terms over those steps."""

    epoch: int = 0
    step: int = 0
    totals: dict = field(default_factory=dict)


# -- random states --------------------------------------------------------------------------
def rng_state() -> dict:
    """Every global random state, as tensors and plain types."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning("resume: the run had %d CUDA devices and this machine has %d; the "
                        "CUDA random states are not restored", len(state["cuda"]),
                        torch.cuda.device_count())


# -- the data -------------------------------------------------------------------------------
def data_fingerprint(train, test) -> dict:
    """What a resumed run must train and evaluate on again: the images' and labels' hashes
    and the class names (``data_root`` itself may move)."""
    return {"train_sha256": tensor_sha256(train.images, train.labels),
            "test_sha256": tensor_sha256(test.images, test.labels),
            "classes": [str(c) for c in train.classes]}


def data_change(saved: dict | None, now: dict) -> str | None:
    """The first difference between two data fingerprints, in words (None: the same, or
    not recorded by an older version)."""
    if not isinstance(saved, dict):
        return None
    if saved.get("classes") != now["classes"]:
        return f"the classes changed (were {saved.get('classes')!r}, now {now['classes']!r})"
    for key, what in (("train_sha256", "training"), ("test_sha256", "test")):
        if saved.get(key) != now[key]:
            return f"the {what} images changed"
    return None


# -- the file -------------------------------------------------------------------------------
def read_resume(path: str, run_args: dict, epochs: int) -> dict:
    """Load and check ``resume.pth``: this project's format, and the same run's arguments
    (those ``must_repeat`` names) as ``run_args`` (flag name without dashes -> value), for a
    run of ``epochs`` epochs."""
    state = load_checkpoint(path)
    missing = [k for k in REQUIRED if k not in state]
    if missing or state.get("format") != FORMAT:
        raise UsageError(f"{path} is not a resume state of this project (missing "
                         f"{', '.join(missing) or 'format ' + FORMAT}): start afresh with "
                         f"--overwrite")
    saved, now, repeat = {**ADDED_LATER, **state["args"]}, run_args, must_repeat()
    differ = [k for k in saved if k in now and k in repeat and saved[k] != now[k]]
    if differ:
        shown = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} (now {now[k]!r})"
                          for k in differ[:3])
        raise UsageError(f"--resume needs the interrupted run's arguments: it had {shown}; "
                         f"repeat its command with --resume, or start afresh with --overwrite")
    if state["epoch"] > epochs:
        raise UsageError(f"--resume: the run already completed {state['epoch']} epochs, more "
                         f"than --epochs {epochs}")
    return state


class RunState:
    """The objects of one training run whose state a resume must restore, and its file."""

    def __init__(self, path: str, run_args: dict, model: torch.nn.Module, optimizer, scheduler,
                 trainer):
        self.path, self.run_args = path, run_args
        self.model, self.optimizer, self.scheduler, self.trainer = (model, optimizer,
                                                                    scheduler, trainer)
        self.data = data_fingerprint(trainer.train, trainer.test)

    def save(self, position: Position) -> None:
        """Every process calls this (the trainer's state gathers from all of them); only
        the main process writes."""
        state = {"format": FORMAT, "epoch": int(position.epoch), "step": int(position.step),
                 "totals": {k: float(v) for k, v in position.totals.items()},
                 "args": self.run_args, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "trainer": self.trainer.state_dict(),
                 "rng": rng_state(), "data": self.data}
        if self.trainer.dist.is_main:
            save_atomic(state, self.path)

    def restore(self, state: dict) -> Position:
        """Put the saved state into the run's objects; returns where to continue."""
        changed = data_change(state.get("data"), self.data)
        if changed:
            raise UsageError(f"--resume: {changed} since the run started (--data-root "
                             f"{self.run_args.get('data_root')!r} now): point --data-root at "
                             f"the run's data, or start afresh with --overwrite")
        try:
            n = len(state["trainer"]["clusters"]["assignments"])
            if n != len(self.trainer.train):
                raise UsageError(f"{self.path} was written for {n} training examples, but "
                                 f"there are {len(self.trainer.train)} now: the data changed "
                                 f"since the run started")
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.trainer.load_state_dict(state["trainer"])
            set_rng_state(state["rng"])
            position = Position(int(state["epoch"]), int(state["step"]),
                                {k: float(v) for k, v in state["totals"].items()})
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError
                ) as exc:
            raise UsageError(f"{self.path} does not fit this run (damaged, or written by "
                             f"other code): {first_line(exc)}; start afresh with --overwrite"
                             ) from exc
        log.info("resuming after epoch %d, step %d, from %s", position.epoch, position.step,
                 self.path)
        return position
