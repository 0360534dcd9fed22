"""The experiment directory's text outputs: ``log.txt``, ``params.txt``, CSV files."""
from __future__ import annotations

import csv
import io
import os

from utils.checkpoint import write_text_atomic

LOG_HEADER = ("Epoch", "LR", "Train loss", "Train acc.", "Test loss", "Test acc.")


class EpochLog:
    """``log.txt``: a tab-separated header and one row per epoch, as the original's."""

    def __init__(self, path: str, resume: bool = False):
        self.path = path
        if not (resume and os.path.exists(path)):
            write_text_atomic(path, "\t".join(LOG_HEADER) + "\n")

    def append(self, epoch: int, lr: float, train_loss: float, train_acc: float,
               test_loss: float, test_acc: float) -> None:
        values = [f"{v:.6f}" for v in (lr, train_loss, train_acc, test_loss, test_acc)]
        with open(self.path, "a") as f:
            f.write("\t".join([str(epoch)] + values) + "\n")
            f.flush()
            os.fsync(f.fileno())


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
    """``metrics.csv``: one row of named metrics per epoch, the whole file rewritten atomically.

    ``magnet``, ``consistency`` and ``xent`` are the mean per-step contributions to the
    training loss (weights applied, 0 for a disabled term); the other columns repeat
    ``log.txt``'s full-set losses and accuracies, plus the epoch's wall time.
    """

    def __init__(self, path: str, resume: bool = False):
        self.path = path
        self.rows: list[list] = []
        if resume and os.path.exists(path):
            self.rows = [[row.get(k, "") for k in METRICS_HEADER] for row in read_csv(path)]

    def append(self, epoch: int, lr: float, metrics, seconds: float) -> None:
        """``metrics``: an EpochMetrics (losses, accuracies and the ``components`` dict)."""
        terms = [metrics.components.get(name, 0.0) for name in LOSS_TERMS]
        self.rows.append([epoch, lr, *terms, metrics.train_loss, metrics.train_acc,
                          metrics.test_loss, metrics.test_acc, round(seconds, 3)])
        write_csv(self.path, list(METRICS_HEADER), self.rows)
