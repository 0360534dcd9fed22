"""tqdm progress bars that stay quiet when stderr is not a terminal or when asked to."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

_QUIET = {"value": False}


def set_quiet(quiet: bool) -> None:
    _QUIET["value"] = quiet


def progress(iterable=None, **kwargs):
    disable = _QUIET["value"] or not sys.stderr.isatty() or bool(os.environ.get("CLUSTR_QUIET"))
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)
