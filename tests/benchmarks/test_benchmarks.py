"""The benchmark harness runs end to end on tiny synthetic sizes and reports every ratio.

Only that the harness works and reports consistent numbers: no timing is asserted.
"""
from __future__ import annotations

import json
import math

import torch

from benchmarks import run as bench
from benchmarks.scaling import run_worker, worker_args

TINY = ["--data", "synthetic", "--m", "2", "--d", "4", "--train-size", "40", "--test-size",
        "10", "--repeats", "1", "--pgd-images", "8", "--pgd-train", "40", "--iterations", "2",
        "--test-batch", "4", "--device", "cpu"]


def test_harness_writes_every_ratio(tmp_path):
    out, raw = tmp_path / "BENCH.md", tmp_path / "bench.json"
    assert bench.main(TINY + ["--only", "epochs", "pgd", "--out", str(out),
                              "--json", str(raw)]) == 0
    res = json.loads(raw.read_text())
    e = res["epochs"]
    assert e["batch"] == 8 and e["steps_per_epoch"] == 5
    assert e["step_samples"] == {"clustr": 5, "ce": 5}  # every step of the timed epoch
    for key in ("R1", "R2"):
        assert math.isfinite(e[key]) and e[key] > 0
    assert e["R1"] == e["step_s"]["clustr"] / e["step_s"]["ce"]
    assert 0 < res["overheads"]["R4"] < math.inf
    p = res["pgd"]
    assert p["data"] == "synthetic" and p["images"] == 8
    assert p["agree"] and p["differ"] == 0  # same attack, same images: same predictions
    assert [e["eps"] for e in p["per_eps"]] == [2.0, 8.0, 16.0, 25.5]
    assert all(e["acc_shrink"] == e["acc_mask"] for e in p["per_eps"])
    text = out.read_text()
    for row in ("| R1 |", "| R2 |", "| R3 |", "| R4 |", "## Machine and command",
                torch.__version__, "python -m benchmarks.run"):
        assert row in text
    assert "| R3 |" in text and "| n/a |" in text  # the R3 target is for the real subset


def test_scaling_worker_reports_time_and_its_own_peak_memory():
    res = run_worker(worker_args(["--size", "40", "--test-size", "10", "--m", "2", "--d", "4",
                                  "--repeats", "1"]))
    assert res["size"] == 40 and res["steps"] == 5 and len(res["samples"]) == 1
    assert res["epoch_s"] > 0
    assert res["peak_mib"] >= res["setup_peak_mib"] > 0


def test_bad_flags_exit_2_with_one_line(capsys):
    assert bench.main(["--repeats", "0"]) == 2
    assert bench.main(["--amp", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
