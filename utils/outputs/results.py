"""The experiment directory's text outputs: ``log.txt``, ``params.txt``, CSV files."""
from __future__ import annotations

import csv
import io
import os

from base.errors import UsageError
from base.io import write_text_atomic

LOG_HEADER = ("Epoch", "LR", "Train loss", "Train acc.", "Test loss", "Test acc.")
_HEADER_LINE = "\t".join(LOG_HEADER) + "\n"


class EpochLog:
    """``log.txt``: a tab-separated header and one row per epoch, as the original's. Every
    append rewrites the whole (small) file atomically, so a killed process leaves the rows of
    completed epochs and never a half-written line."""

    def __init__(self, path: str, keep_epochs: int | None = None):
        """A fresh log (header only); or, with ``keep_epochs=E`` when resuming, the existing
        log cut back to its rows for epochs 1..E (the resumed run writes the others again).
        Nothing is written before ``flush()``, so a refusal leaves the file as it was."""
        self.path = path
        self.text = self._kept_rows(keep_epochs) if keep_epochs else _HEADER_LINE

    def flush(self) -> None:
        write_text_atomic(self.path, self.text)

    def _kept_rows(self, epochs: int) -> str:
        try:
            with open(self.path) as f:
                lines = f.read().split("\n")[:-1]  # complete lines only
        except FileNotFoundError:
            lines = []
        if not lines or lines[0] + "\n" != _HEADER_LINE:
            raise UsageError(f"{self.path} is missing or has no log header: cannot resume "
                             f"into it (start afresh with --overwrite)")
        rows = [line for line in lines[1:] if line.split("\t", 1)[0].isdigit()
                and int(line.split("\t", 1)[0]) <= epochs]
        if [int(r.split("\t", 1)[0]) for r in rows] != list(range(1, epochs + 1)):
            raise UsageError(f"{self.path} does not hold one row for each of the {epochs} "
                             f"completed epochs: cannot resume into it (start afresh with "
                             f"--overwrite)")
        return _HEADER_LINE + "".join(r + "\n" for r in rows)

    def append(self, epoch: int, lr: float, train_loss: float, train_acc: float,
               test_loss: float, test_acc: float) -> None:
        values = [f"{v:.6f}" for v in (lr, train_loss, train_acc, test_loss, test_acc)]
        self.text += "\t".join([str(epoch)] + values) + "\n"
        self.flush()


def write_csv(path: str, header: list[str], rows: list[list]) -> None:
    """A CSV file written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


METRICS_HEADER = ("epoch", "lr", "magnet", "consistency", "xent", "train_loss", "train_acc",
                  "test_loss", "test_acc", "seconds")
LOSS_TERMS = ("magnet", "consistency", "xent")


class MetricsCSV:
    """``metrics.csv``: one row of named metrics per epoch, the whole file rewritten
    atomically. ``magnet``, ``consistency`` and ``xent`` are the mean per-step contributions
    to the training loss (weights applied, 0 for a disabled term); the other columns repeat
    ``log.txt``'s full-set losses and accuracies, plus the epoch's wall time."""

    def __init__(self, path: str, keep_epochs: int | None = None):
        """A fresh file; or, resuming after ``keep_epochs`` completed epochs, the existing
        rows of those epochs (a row of an unfinished epoch is dropped and written again)."""
        self.path = path
        self.rows: list[list] = []
        if keep_epochs and os.path.exists(path):
            self.rows = [[row.get(k, "") for k in METRICS_HEADER] for row in read_csv(path)
                         if row.get("epoch", "").isdigit() and int(row["epoch"]) <= keep_epochs]

    def append(self, epoch: int, lr: float, metrics, seconds: float) -> None:
        """``metrics``: an EpochMetrics (losses, accuracies and the ``components`` dict)."""
        terms = [metrics.components.get(name, 0.0) for name in LOSS_TERMS]
        self.rows.append([epoch, lr, *terms, metrics.train_loss, metrics.train_acc,
                          metrics.test_loss, metrics.test_acc, round(seconds, 3)])
        write_csv(self.path, list(METRICS_HEADER), self.rows)
