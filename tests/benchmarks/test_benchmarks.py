"""The benchmark harness runs end to end on tiny synthetic sizes and reports every ratio.

Only that the harness works and reports consistent numbers: no timing is asserted.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import machine, report
from benchmarks import run as bench

TINY = ["--data", "synthetic", "--m", "2", "--d", "4", "--train-size", "40", "--test-size",
        "10", "--repeats", "1", "--pgd-images", "8", "--pgd-train", "40", "--iterations", "2",
        "--test-batch", "4", "--pgd-repeats", "1", "--device", "cpu", "--quick"]


def test_harness_writes_every_ratio(tmp_path):
    out, raw = tmp_path / "BENCH.md", tmp_path / "bench.json"
    # no --only: every section a CPU runs, the seed's command left out in one line
    assert bench.main(TINY + ["--out", str(out), "--json", str(raw)]) == 0
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
    for name in ("clustr", "ce"):
        sp, r = e["step_spread"][name], res["residuals"][name]
        assert sp["min"] <= sp["median"] <= sp["max"] and sp["min"] <= sp["mean"] <= sp["max"]
        # the epoch is its steps plus the rest, and the residual is that rest less the
        # parts timed apart
        assert math.isclose(e["rest_s"][name] + e["step_sum_s"][name], e["epoch_s"][name])
        assert math.isclose(r["epoch_s"] - r["parts_s"], r["residual_s"], abs_tol=1e-9)
    assert "seed_command" not in res and res["config"]["only"] == ["epochs", "pgd"]
    assert res["machine"]["torch_pinned"] and "torch kernels" in res["machine"]["isa"]
    text = out.read_text()
    for row in ("| R1 |", "| R2 |", "| R3 |", "| R4 |", "## Machine and command",
                torch.__version__, "python -m benchmarks.run", "CE epoch − sum of its parts",
                "ClusTR epoch − sum of its parts", "| instruction sets ",
                "pinned in requirements.txt", "mean"):
        assert row in text, row
    r3 = next(line for line in text.splitlines() if line.startswith("| R3 |"))
    assert r3.rstrip(" |").endswith("n/a")  # the R3 target is for the real subset
    assert "> **Warning:** the seed's command is measured whole only on CUDA" in text


def test_load_warning_counts_other_work_relative_to_the_cores(monkeypatch):
    warnings = machine.contention_warnings
    monkeypatch.setattr(machine, "usable_cores", lambda: 16)
    # the harness's 16 threads plus 5 cores of other work: flagged; plus 1: not
    assert warnings({"start": 0.5, "after epochs": 21.0}, 16)
    assert not warnings({"start": 0.5, "after epochs": 17.0}, 16)
    assert warnings({"start": 5.0}, 16)  # busy before the harness began
    monkeypatch.setattr(machine, "usable_cores", lambda: 2)
    assert warnings({"start": 8.0, "after pgd": 9.0}, 2)
    assert not warnings({"start": 0.2, "after pgd": 2.5}, 2)


def test_seed_command_measured_whole_on_tiny_sizes():
    """The path a GPU runs, at toy sizes on the CPU: every epoch and the sweep timed."""
    from benchmarks.seed_command import SeedCommand, measure
    from benchmarks.workloads import Setup

    tiny = SeedCommand(train_images=40, test_images=10, epochs=2, iterations=1, restarts=1,
                       m=2, d=4, K=2)
    res = measure(Setup(12, 20, 2, 1, torch.device("cpu")), tiny)  # the batch is the seed's
    assert res["kind"] == "measured" and len(res["epoch_samples"]) == 2
    assert res["attack_batch"] == 64 and 0 <= res["clean_acc"] <= 100
    assert res["total_s"] == res["training_s"] + res["sweep_s"] > sum(res["epoch_samples"])
    row = report._ratios({"seed_command": res})[0]  # the report's row
    assert row[1].startswith("the seed's command end to end: 2 epochs on 40 + 10 images")
    assert "measured whole" in row[1] and row[2]


def test_bad_flags_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--repeats", "0"])
    assert exit_.value.code == 2
    assert bench.main(["--amp", "--device", "cpu"]) == 2
    assert bench.main(["--only", "epochs", "seed", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "--repeats" in err[0] and err[1].startswith("error: ")
    assert err[2].startswith("error: --only seed: the seed's command is measured whole only on")
