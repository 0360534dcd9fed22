"""``run.log`` and ``args.json`` in the experiment directory (see docs/failures.md).

Every log line of the run goes to stdout and is appended to ``run.log``, across resumes.
Lines logged before the directory may be written (while the inputs are checked) are held
back and written once it is prepared, so a refused run leaves no ``run.log`` behind.
"""
from __future__ import annotations

import json
import logging
import os

from base.io import write_text_atomic
from utils.outputs import files

FORMAT = "%(asctime)s %(levelname)s %(message)s"


class RunLogHandler(logging.StreamHandler):
    """Holds records until ``attach(path)``, then appends every record to ``path``; a failed
    write (a full disk) goes to ``handleError`` and does not end the run: stdout has the line."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        self.held: list[logging.LogRecord] = []
        self.stream = None

    def attach(self, path: str) -> None:
        if self.stream is None:
            self.stream = open(path, "a", encoding="utf-8")
            for record in self.held:
                super().emit(record)
            self.held = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            self.held.append(record)
        else:
            super().emit(record)

    def write_line(self, text: str) -> None:
        """One line (the run's final error or stop line) to the file only, if open."""
        if self.stream is not None:
            self.emit(logging.LogRecord("clustr", logging.ERROR, __file__, 0, text, None, None))

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.held = []
        super().close()


def start() -> RunLogHandler:
    """Install the handler on the root logger (and route ``warnings`` to logging)."""
    handler = RunLogHandler()
    logging.getLogger().addHandler(handler)
    logging.captureWarnings(True)
    return handler


def stop(handler: RunLogHandler | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        logging.captureWarnings(False)
        handler.close()


def attach(folder: str) -> None:
    """Start writing ``folder/run.log`` (the directory exists and may be written)."""
    for h in logging.getLogger().handlers:
        if isinstance(h, RunLogHandler):
            h.attach(os.path.join(folder, files.RUN_LOG))


def write_args_json(folder: str, values: dict) -> None:
    """``args.json``: the run's arguments as plain JSON types (flag name without dashes)."""
    write_text_atomic(os.path.join(folder, files.ARGS_JSON),
                      json.dumps(values, indent=2, sort_keys=False) + "\n")
