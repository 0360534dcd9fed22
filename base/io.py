"""File I/O every part of the project shares: weights-only loading, atomic writes, figures.

``atomic_write`` (and ``save_atomic``, ``write_text_atomic``) leave the old file or the new
one, never half of one: a killed process leaves at worst a hidden ``.<name>.*`` temporary,
removed by the next run in that directory (docs/failures.md).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile

import torch

from base.errors import UsageError, first_line


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)``, with a one-line ``UsageError`` for every
    failure: only tensors and plain Python types are rebuilt, so a file that holds a pickled
    object (a class instance, a numpy scalar, ...) is refused rather than executed."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # torch's own warnings would break the one-line answer
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # truncated zip, text file, empty file, bad map_location, ...
        with open(path, "rb") as f:
            head = f.read(2)
        if head and head != b"PK" and head[:1] != b"\x80":
            why = "neither a zip archive nor a pickle (a text file, or another format)"
        elif isinstance(exc, pickle.UnpicklingError):
            raise UsageError(_refusal(path, str(exc))) from exc
        else:
            why = first_line(exc)
        raise UsageError(f"{path} is not a readable PyTorch file (truncated or corrupt?): "
                         f"{why}") from exc
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def _refusal(path: str, message: str) -> str:
    """The one-line reason a file was refused by the weights-only unpickler."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    name = found.group(1) if found else _first_global(path)
    if name:
        what = f"a pickled {name} object"
    else:
        found = re.search(r"WeightsUnpickler error: \s*(.+)", message)
        what = "pickled data" + (f" ({found.group(1).strip()[:80]})" if found else "")
    return (f"{path} holds {what}: refused, because unpickling arbitrary objects can run code "
            f"(weights_only=True); if you trust the file, re-save it with tensors and plain "
            f"types only")


def _first_global(path: str) -> str | None:
    """The first class or function a pickle names, read from its opcodes without running
    them (a plain pickle, or the data.pkl of torch's zip format); None if it names none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                return str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                return f"{strings[-2]}.{strings[-1]}"
            if isinstance(arg, str):
                strings.append(arg)
    except (OSError, ValueError, StopIteration, zipfile.BadZipFile):
        return None
    return None


def save_atomic(obj, path: str) -> None:
    """Write ``obj`` with ``torch.save`` to a temporary file, then move it into place."""
    atomic_write(path, lambda f: torch.save(obj, f))


def write_text_atomic(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only), imported when first drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | None) -> None:
    """``fig`` as a PNG written atomically to ``path`` (None: not written), then closed."""
    try:
        if path is not None:
            atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        pyplot().close(fig)


def atomic_write(path: str, write) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``;
    the data and the rename are both flushed to disk before returning."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _named(lambda: tempfile.mkstemp(prefix=temp_prefix(path), dir=folder), path)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; keep the usual permissions
        with os.fdopen(fd, "wb") as f:
            _named(lambda: write(f), path)
            _named(f.flush, path)
            _named(lambda: os.fsync(f.fileno()), path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _named(call, path: str):
    """``call()``; an ``OSError`` (a full disk names no file, a temporary's name means
    nothing to the user) is raised again naming ``path``."""
    try:
        return call()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc


def _file_mode(path: str) -> int:
    """The replaced file's permissions, or those a plain ``open(path, "w")`` would give."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def temp_prefix(path: str) -> str:
    """Temporary files of ``atomic_write(path)`` are named ``<prefix>XXXXXXXX``."""
    return "." + os.path.basename(path) + "."


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # not possible everywhere; the rename is still atomic
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
