"""Stopping cleanly on SIGTERM (how cluster schedulers end a job) and SIGINT (Ctrl-C).

``install()`` makes a signal only *ask* to stop: the long loops call ``should_stop(dist)`` at
their safe points, save their resume state and raise ``Preempted`` (docs/failures.md,
"Preemption"). Inside ``immediate()`` and on a second signal it is raised at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """A stop asked by a signal; the resume state of the last safe point is on disk."""

    def __init__(self, signum: int, where: str = ""):
        self.signum, self.where = signum, where
        super().__init__(f"stopped by {signal.Signals(signum).name}" +
                         (f" {where}" if where else ""))

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


_STATE = {"signum": None, "immediate": False, "installed": False}
_PREVIOUS: dict[int, object] = {}


def _handler(signum, _frame):
    pending = _STATE["signum"] is not None
    _STATE["signum"] = signum
    if _STATE["immediate"] or pending:
        raise Preempted(signum, "(nothing new to save)" if not pending else "(second signal)")


def install() -> None:
    """Route SIGTERM and SIGINT to a stop request (idempotent; only the main thread may set
    handlers, elsewhere the defaults stay)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if not _STATE["installed"]:
        _PREVIOUS.update({s: signal.getsignal(s) for s in SIGNALS})
    for s in SIGNALS:
        signal.signal(s, _handler)
    _STATE.update(signum=None, immediate=False, installed=True)
    _COUNTS.clear()


def uninstall() -> None:
    """Back to the handlers before ``install`` (in-process callers run main() repeatedly)."""
    if _STATE["installed"]:
        for s in SIGNALS:
            previous = _PREVIOUS.get(s)
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
    _STATE.update(signum=None, immediate=False, installed=False)


def should_stop(dist=None) -> bool:
    """True when this process, or under torchrun any process, was asked to stop. Every
    process must call it at the same points (it is a collective there)."""
    local = _STATE["signum"]
    if dist is None or not dist.enabled:
        return local is not None
    import torch.distributed as tdist

    flag = torch.tensor([local or 0], device=dist._device())
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    signum = int(flag.item())
    if signum and local is None:
        _STATE["signum"] = signum  # another process's signal: stop as it does
    return signum != 0


def stop(where: str) -> Preempted:
    """The exception to raise at a safe point once the state is saved."""
    return Preempted(_STATE["signum"] or signal.SIGTERM, where)


@contextlib.contextmanager
def immediate():
    """A region with nothing to save: a signal (or a pending request) raises at once."""
    if _STATE["signum"] is not None:
        raise stop("(before a step that cannot be saved part-way)")
    saved = _STATE["immediate"]
    _STATE["immediate"] = True
    try:
        yield
    finally:
        _STATE["immediate"] = saved


# -- test-only hooks: inert unless their environment variable is set ------------------------
KILL_AT_ENV = "CLUSTR_TEST_KILL_AT"      # NAME[:COUNT][@RANK]: SIGKILL itself there
SIGNAL_AT_ENV = "CLUSTR_TEST_SIGNAL_AT"  # NAME[:COUNT][@RANK]: send itself SIGTERM there
_COUNTS: dict[str, int] = {}


def point(name: str, rank: int = 0) -> None:
    """A named point of the run where the hooks above may kill or signal the process
    (docs/failures.md, "Hooks for tests")."""
    for env, sig in ((KILL_AT_ENV, signal.SIGKILL), (SIGNAL_AT_ENV, signal.SIGTERM)):
        target, _, on_rank = os.environ.get(env, "").partition("@")  # unset: matches no name
        want, _, count = target.partition(":")
        if want != name or (on_rank and int(on_rank) != rank):
            continue
        key = f"{env}/{name}"
        _COUNTS[key] = _COUNTS.get(key, 0) + 1
        if _COUNTS[key] == int(count or 1):
            os.kill(os.getpid(), sig)
