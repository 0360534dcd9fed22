"""Resuming an interrupted evaluation: ``eval_resume.pth`` in the experiment directory.

The evaluation is a list of *units*, one per attack and eps (``pgd/0`` .. ``pgd/3`` for the
paper's sweep, ``pgd-ce/1``, ``pgd-dlr/2``, ``autoattack/0``, ...). Each unit's progress is
saved atomically: after every restart (and, on a stop request, after every batch) of the
PGD attacks, and when the unit is done. A finished unit keeps only its per-example results
(and, with ``--save-adv``, the adversarial images that fooled the model).

The random starts depend only on (seed, eps index, restart, example index), so a restart
run after a resume computes exactly what it would have computed without the interruption,
and the result files come out the same (see docs/long_evaluations.md).

The units are run and saved by ``utils.attacks.sweep``. The file also holds a
*fingerprint* of what is evaluated: the settings that change the results (the fields of
``EvalConfig`` and ``AttackConfig`` declared with ``base.cli.resume_field``), the
checkpoint's and the test images' SHA-256, the device type and the number of processes.
``--resume`` with a different fingerprint is refused with one line naming the
first difference. Tensors and plain types only: it loads with ``weights_only=True``.
"""
from __future__ import annotations

import logging
import os

import torch

from base.errors import UsageError
from base.io import file_sha256, load_checkpoint, save_atomic
from base.tensors import tensor_sha256

log = logging.getLogger("clustr")

FORMAT = "clustr-eval-resume-2"


def fingerprint(settings: dict, ckpt_path: str, images: torch.Tensor, labels: torch.Tensor,
                device: torch.device, world_size: int) -> dict:
    """What the results depend on, as plain types: the ``settings`` (keyed by their flags,
    ``base.cli.resume_settings``), the checkpoint's and the test images' hashes, the device
    type and the number of processes."""
    return {
        "args": dict(settings),
        "checkpoint_sha256": file_sha256(ckpt_path),
        "test_images": int(len(labels)),
        "test_sha256": tensor_sha256(images, labels),
        "device": torch.device(device).type,
        "world_size": int(world_size),
    }


def difference(saved: dict, now: dict) -> str | None:
    """The first difference between two fingerprints, in words, or None."""
    for k, v in saved["args"].items():
        if k in now["args"] and now["args"][k] != v:
            return f"{k} {v!r} (now {now['args'][k]!r})"
    if saved["checkpoint_sha256"] != now["checkpoint_sha256"]:
        return "the evaluated checkpoint's content changed"
    if saved["test_images"] != now["test_images"]:
        return f"{saved['test_images']} test images (now {now['test_images']})"
    if saved["test_sha256"] != now["test_sha256"]:
        return "the test images changed (same number, other content)"
    if saved["device"] != now["device"]:
        return f"--device {saved['device']} (now {now['device']})"
    if saved["world_size"] != now["world_size"]:
        return f"{saved['world_size']} process(es) (now {now['world_size']})"
    return None


def check_arguments(path: str, settings: dict, ckpt_path: str) -> None:
    """Before a resumed training run whose epochs are all done continues: refuse evaluation
    ``settings`` (``base.cli.resume_settings``) that differ from those of the evaluation
    already started in ``path``, when that evaluation is the one to continue (its checkpoint
    is ``ckpt_path``). A run that trains further makes a new checkpoint, whose evaluation
    starts afresh anyway."""
    if not (os.path.isfile(path) and os.path.isfile(ckpt_path)):
        return
    fp = load_checkpoint(path).get("fingerprint", {})
    if fp.get("checkpoint_sha256") != file_sha256(ckpt_path):
        return
    for k, v in fp.get("args", {}).items():
        if k in settings and settings[k] != v:
            raise UsageError(f"--resume needs the interrupted evaluation's arguments: it had "
                             f"{k} {v!r} (now {settings[k]!r}); repeat its command with "
                             f"--resume, or start afresh with --overwrite")


class EvalState:
    """The units of one evaluation and the file they are saved in (written by the main
    process only; every process reads it on resume)."""

    def __init__(self, path: str, fp: dict, units: dict | None = None, write: bool = True):
        self.path, self.fingerprint, self.write = path, fp, write
        self.units: dict[str, dict] = dict(units or {})

    @classmethod
    def open(cls, path: str, fp: dict, resume: bool, write: bool = True,
             fresh_if_checkpoint_changed: bool = False) -> EvalState:
        """A new state, or with ``resume`` the one in ``path`` (when there is one) after
        checking that it evaluates the same thing. ``fresh_if_checkpoint_changed``: the sweep
        after training, where a resumed training run that trained further makes a new
        checkpoint, whose evaluation starts afresh."""
        if not (resume and os.path.isfile(path)):
            return cls(path, fp, write=write)
        saved = load_checkpoint(path)
        if saved.get("format") != FORMAT or "fingerprint" not in saved or "units" not in saved:
            raise UsageError(f"{path} is not an evaluation resume state of this project: "
                             f"start afresh with --overwrite")
        if (fresh_if_checkpoint_changed and saved["fingerprint"].get("checkpoint_sha256")
                != fp["checkpoint_sha256"]):
            log.info("the checkpoint changed since %s was written: the evaluation starts "
                     "afresh", path)
            return cls(path, fp, write=write)
        try:
            diff = difference(saved["fingerprint"], fp)
        except (KeyError, TypeError) as exc:
            raise UsageError(f"{path} is damaged or from other code ({exc!r}): start afresh "
                             f"with --overwrite") from exc
        if diff:
            raise UsageError(f"--resume needs the interrupted evaluation's arguments: it had "
                             f"{diff}; repeat its command with --resume, or start afresh with "
                             f"--overwrite")
        done = [k for k, u in saved["units"].items() if u.get("done")]
        log.info("resuming the evaluation from %s (%d unit(s) done%s)", path, len(done),
                 ": " + ", ".join(done) if done else "")
        return cls(path, fp, saved["units"], write=write)

    def get(self, key: str) -> dict | None:
        return self.units.get(key)

    def put(self, key: str, unit: dict) -> None:
        """Record ``unit`` and rewrite the file atomically."""
        self.units[key] = unit
        self.save()

    def save(self) -> None:
        if self.write:
            save_atomic({"format": FORMAT, "fingerprint": self.fingerprint,
                         "units": self.units}, self.path)
