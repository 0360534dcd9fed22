"""One run at a time per experiment folder: an exclusive ``flock`` on ``<folder>/.clustr.lock``
(docs/failures.md). The kernel drops a dead process's lock, so a file left by a killed run is
taken over; a folder created only to hold the lock is removed again if left empty.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time

from base.errors import UsageError
from utils.outputs.files import LOCK

log = logging.getLogger("clustr")


@contextlib.contextmanager
def holding_lock(folder: str):
    created = _make_folders(folder)
    path = os.path.join(folder, LOCK)
    try:
        fd = _acquire(path, folder)
    except BaseException:
        _remove_empty(folder, created)
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # before closing: no other run holds it in the meantime
        os.close(fd)
        _remove_empty(folder, created)


def _acquire(path: str, folder: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UsageError(f"{folder} is in use by another run ({holder or 'holder unknown'}"
                             f"): wait for it to end, or choose another --checkpoint "
                             f"directory") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the previous holder removed it as we opened it
            same = False
        if same:
            break
        os.close(fd)
    previous = _holder(fd)
    if previous:
        log.warning("%s: taking over the lock left by a run that ended without releasing it "
                    "(%s): it was killed, or its machine stopped", folder, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    return " ".join(os.pread(fd, 200, 0).decode(errors="replace").split())


def _make_folders(folder: str) -> str | None:
    """Create ``folder`` and missing parents; the topmost one created (None: it existed)."""
    top, parent = None, os.path.abspath(folder)
    while not os.path.exists(parent):
        top, parent = parent, os.path.dirname(parent)
    os.makedirs(folder, exist_ok=True)
    return top


def _remove_empty(folder: str, top: str | None) -> None:
    current = os.path.abspath(folder)
    while top is not None:
        try:
            os.rmdir(current)
        except OSError:  # not empty: the run wrote into it
            return
        if current == top:
            return
        current = os.path.dirname(current)
