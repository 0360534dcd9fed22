"""Resuming an interrupted evaluation: ``eval_resume.pth`` in the experiment directory.

The file holds the evaluation's *units* (one per attack and eps, run and saved by
``utils.attacks.sweep``) and a *fingerprint* of what is evaluated: the settings declared
with ``base.cli.resume_field``, the checkpoint's and the test images' SHA-256, the device
type and the number of processes. ``--resume`` with a different fingerprint is refused with
one line naming the first difference. docs/failures.md says what is saved when, and why a
resumed run writes the same files. Tensors and plain types only: it loads with
``weights_only=True``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from base.cli import resume_settings
from base.distributed import Dist
from base.errors import UsageError
from base.io import file_sha256, load_checkpoint, save_atomic
from base.tensors import tensor_sha256
from utils.outputs import files

log = logging.getLogger("clustr")

FORMAT = "clustr-eval-resume-2"
# fingerprint entries besides the settings, and how a change of each reads
CHANGES = (("checkpoint_sha256", "the evaluated checkpoint's content changed"),
           ("test_images", "{} test images (now {})"),
           ("test_sha256", "the test images changed (same number, other content)"),
           ("device", "--device {} (now {})"),
           ("world_size", "{} process(es) (now {})"))


def settings_difference(saved: dict, now: dict) -> str | None:
    """The first setting of ``saved`` that ``now`` gives another value, in words, or None."""
    return next((f"{k} {v!r} (now {now[k]!r})" for k, v in saved.items()
                 if k in now and now[k] != v), None)


def difference(saved: dict, now: dict) -> str | None:
    """The first difference between two fingerprints, in words, or None."""
    return settings_difference(saved["args"], now["args"]) or next(
        (words.format(saved[k], now[k]) for k, words in CHANGES if saved[k] != now[k]), None)


def refuse(diff: str) -> UsageError:
    return UsageError(f"--resume needs the interrupted evaluation's arguments: it had {diff}; "
                      f"repeat its command with --resume, or start afresh with --overwrite")


def check_arguments(path: str, settings: dict, ckpt_path: str) -> None:
    """Before a resumed training run whose epochs are all done continues: refuse evaluation
    ``settings`` that differ from those of the evaluation already started in ``path`` on
    ``ckpt_path``. (A run that trains further makes a new checkpoint, whose evaluation
    starts afresh anyway.)"""
    if not (os.path.isfile(path) and os.path.isfile(ckpt_path)):
        return
    fp = load_checkpoint(path).get("fingerprint", {})
    if fp.get("checkpoint_sha256") == file_sha256(ckpt_path):
        diff = settings_difference(fp.get("args", {}), settings)
        if diff:
            raise refuse(diff)


@dataclass
class EvalState:
    """The units of one evaluation and the file they are saved in (written by the main
    process only, and not at all without ``write``; every process reads it on resume)."""

    path: str = ""
    fingerprint: dict = field(default_factory=dict)
    units: dict[str, dict] = field(default_factory=dict)
    write: bool = False

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


def open_eval_state(cfg, attack, ckpt_path: str, test, out_dir: str, device,
                    dist: Dist | None = None, resume: str | None = None) -> EvalState:
    """The resume state of the evaluation that ``cfg`` and ``attack`` (``EvalConfig``,
    ``AttackConfig``) describe, with its fingerprint (nothing is written yet): new (``resume``
    None), the saved one checked against this run ("continue"), or the saved one unless it
    evaluated another checkpoint ("unless-retrained": the sweep after a resumed training
    run, which may have trained further)."""
    dist = dist or Dist.single()
    path = os.path.join(out_dir, files.EVAL_RESUME)
    fp = {"args": resume_settings(cfg, attack),  # keyed by their flags
          "checkpoint_sha256": file_sha256(ckpt_path),
          "test_images": int(len(test.labels)),
          "test_sha256": tensor_sha256(test.images, test.labels),
          "device": torch.device(device).type,
          "world_size": int(dist.world_size)}
    if resume is None or not os.path.isfile(path):
        return EvalState(path, fp, write=dist.is_main)
    saved = load_checkpoint(path)
    if saved.get("format") != FORMAT or "fingerprint" not in saved or "units" not in saved:
        raise UsageError(f"{path} is not an evaluation resume state of this project: "
                         f"start afresh with --overwrite")
    if (resume == "unless-retrained" and saved["fingerprint"].get("checkpoint_sha256")
            != fp["checkpoint_sha256"]):
        log.info("the checkpoint changed since %s was written: the evaluation starts afresh",
                 path)
        return EvalState(path, fp, write=dist.is_main)
    try:
        diff = difference(saved["fingerprint"], fp)
    except (KeyError, TypeError) as exc:
        raise UsageError(f"{path} is damaged or from other code ({exc!r}): start afresh "
                         f"with --overwrite") from exc
    if diff:
        raise refuse(diff)
    done = [k for k, u in saved["units"].items() if u.get("done")]
    log.info("resuming the evaluation from %s (%d unit(s) done%s)", path, len(done),
             ": " + ", ".join(done) if done else "")
    return EvalState(path, fp, saved["units"], write=dist.is_main)
