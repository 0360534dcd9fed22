"""The reproduction report: every row trained as the paper trains it, attacked honestly.

    python -m benchmarks.reproduce --budget quick     # one epoch, 100 test images
    python -m benchmarks.reproduce --measure          # one epoch per row: the costs
    python -m benchmarks.reproduce --budget cpu       # the largest budget the costs fit in 90 min
    python -m benchmarks.reproduce --budget paper --device cuda

Rows: the pretrained network's k-means clusters (ClusTR at epoch 0), ClusTR, ClusTR+QTRADES
(at ``paper`` both the seed's λ = 12.5 and the original README's λ = 8), ClusTR+QTRADES as
the original trains it (``--as-original``), ClusTR+Free, ClusTR+QTRADES with the logit
adversary (``--consistency-attack logit``), the cross-entropy FGSM baseline (fast adversarial
training from the same weights) and the plain cross-entropy network. Every row is one or more
calls of this project's commands (logs in WORK/logs/); each trained row is then evaluated on
the same test images (the paper's PGD; PGD-CE, PGD-DLR and AutoAttack on a fixed,
class-balanced subset) and, epoch by epoch from its ``--save-all`` checkpoints, on a fixed
subset for the curves. A killed report continues with the same command and ``--resume``:
finished calls are reused once their files are checked, a stopped one continues with its own
``--resume``. The report (``benchmarks.reproduce_report``) lists the budget, the commands and
the sittings.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace

from base.errors import UsageError, exit_status
from base.io import file_sha256, write_text_atomic
from benchmarks.reproduce_plan import (
    BUDGETS,
    CPU_BASE,
    REPO,
    TRAINING,
    Budget,
    Paths,
    Step,
    build_parser,
    plan,
    row_epochs,
    rows_of,
    training_count,
)
from benchmarks.reproduce_report import write_report

CPU_MINUTES = 90.0      # the cpu budget's limit, on 2 idle cores
CPU_MAX_EPOCHS = 30     # never more than the paper's

# -- running, resuming -------------------------------------------------------------------------
STATE = "report.json"
STOPPED = {130, 143, -2, -9, -15}  # a call ended by Ctrl-C, SIGTERM or SIGKILL: stop here too


class Run:
    """``WORK/report.json``: the budget, the sittings and every call with its status, so
    that the same command with ``--resume`` continues where the report stopped."""

    def __init__(self, paths: Paths, budget: Budget, argv: list[str], resume: bool,
                 sitting: bool = True):
        self.path = os.path.join(REPO, paths(STATE))
        exists = os.path.isfile(self.path)
        if exists and not resume:
            raise UsageError(f"{paths.work} already holds a report: continue it with the same "
                             "command and --resume, or pass a new --work")
        if resume and not exists:
            raise UsageError(f"--resume: {paths(STATE)} not found, so there is no report to "
                             "continue (run without --resume to start one)")
        self.state = {"budget": asdict(budget), "steps": {}, "sittings": []}
        if exists:
            with open(self.path) as f:
                self.state = json.load(f)
        old = self.state["budget"]
        differ = [k for k, v in asdict(budget).items() if old.get(k) != v]
        if differ:
            k = differ[0]
            raise UsageError(f"--resume: the report in {paths.work} has {k} {old.get(k)!r} "
                             f"(now {getattr(budget, k)!r}); keep its budget or pass a new "
                             "--work")
        if sitting:  # not for --render-only
            self.state["argv"] = argv
            self.state["sittings"].append({"start": time.time(), "load": os.getloadavg()[0]})

    @property
    def steps(self) -> dict:
        return self.state["steps"]

    def save(self, ended: bool = False) -> None:
        if self.state["sittings"]:  # the last record of a sitting killed later
            self.state["sittings"][-1]["saved"] = time.time()
        if ended:
            self.state["sittings"][-1].update(end=time.time(), load_end=os.getloadavg()[0])
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.state, indent=1) + "\n")


def launch(argv: list[str], log_path: str, threads: int | None) -> tuple[int, float]:
    """One call from the repository root, its output appended to ``log_path``."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.time()
    with open(log_path, "a") as log:
        rc = subprocess.run([sys.executable, *argv], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.time() - start


def run_step(step: Step, run: Run, paths: Paths, threads: int | None) -> str:
    """Run, continue or reuse one call; its status: done, reused, failed or skipped."""
    rec = run.steps.get(step.key)
    if rec and rec["argv"] != step.argv:
        raise UsageError(f"--resume: {step.key} ran as `python {' '.join(rec['argv'])}`, now "
                         f"`python {' '.join(step.argv)}`: a changed setting; pass a new --work")
    if rec and rec["status"] == "done":
        changed = [f for f, h in rec["files"].items()
                   if not os.path.isfile(os.path.join(REPO, f))
                   or file_sha256(os.path.join(REPO, f)) != h]
        if changed:
            raise UsageError(f"{changed[0]} is not the file {step.key} wrote (changed or "
                             "removed since): pass a new --work")
        return "reused"
    needs = _input_of(step)
    if needs and not os.path.isfile(os.path.join(REPO, needs)):
        run.steps[step.key] = {"argv": step.argv, "status": "skipped", "seconds": 0.0,
                               "why": f"{needs} was not written"}
        return "skipped"
    extra = continue_flags(step)
    rec = run.steps[step.key] = {"argv": step.argv, "status": "started", "runs": 1,
                                 "seconds": 0.0} | {k: v for k, v in (rec or {}).items()
                                                    if k in ("runs", "seconds")}
    rec["command"] = step.argv + extra
    run.save()
    print(f"[reproduce] {step.key}: python {' '.join(step.argv + extra)}", flush=True)
    rc, seconds = launch(step.argv + extra, os.path.join(REPO, paths("logs", step.key +
                                                                     ".log")), threads)
    rec.update(rc=rc, seconds=rec["seconds"] + seconds, runs=rec["runs"] + bool(extra))
    if rc == 0 and all(os.path.isfile(os.path.join(REPO, f)) for f in step.outputs):
        rec.update(status="done", files={f: file_sha256(os.path.join(REPO, f))
                                         for f in step.outputs})
    else:
        rec["status"] = "failed"
    run.save()
    if rc in STOPPED:
        raise SystemExit(rc)
    return rec["status"]


def _input_of(step: Step) -> str | None:
    for flag in ("--evaluate-ckpt",):
        if flag in step.argv:
            return step.argv[step.argv.index(flag) + 1]
    return None


def continue_flags(step: Step) -> list[str]:
    """How a call that started before continues: its own ``--resume`` where it saved a state,
    ``--overwrite`` (``--force``) where it left files without one, nothing otherwise."""
    if step.kind == "pretrain":
        return ["--force"] if os.path.exists(os.path.join(REPO, step.outputs[0])) else []
    if step.folder is None or not os.path.isdir(os.path.join(REPO, step.folder)):
        return []
    state = "eval_resume.pth" if "--evaluate-ckpt" in step.argv else "resume.pth"
    if os.path.isfile(os.path.join(REPO, step.folder, state)):
        return ["--resume"]
    return ["--overwrite"] if os.listdir(os.path.join(REPO, step.folder)) else []


# -- the cpu budget, from measured costs ---------------------------------------------------------
def measure_budget(images: int) -> Budget:
    return Budget("measure", 1, None, images, images, images, 20, 1,
                  chosen="one epoch per row, to measure the costs")


def predicted_minutes(costs: dict, b: Budget, train_count: int) -> float:
    """Minutes of the report at budget ``b`` from the costs ``--measure`` wrote: training
    seconds per epoch (ClusTR+Free: per epoch of the others' cost) and evaluation seconds per
    image, per row; every curve point costs what an evaluated image does."""
    total = 0.0
    for row, c in costs["rows"].items():
        if row not in rows_of(b):
            continue
        per_image = c["eval_s"] / costs["images"]
        total += per_image * max(b.test_images or 0, b.strong_images)
        if row in TRAINING or row == "fgsm":
            epochs = b.epochs if row == "free" else row_epochs(b, row, train_count)[0]
            points = 1 if row == "fgsm" else row_epochs(b, row, train_count)[0]
            total += c["train_s"] * epochs + per_image * b.curve_images * points
        elif row in ("pretrained", "ce"):
            total += c["train_s"] + per_image * b.curve_images  # the curves' epoch 0
    return total / 60


def cpu_budget(costs: dict, train_count: int) -> Budget:
    """The most epochs (at most the paper's 30) whose predicted report fits in 90 minutes,
    at the cpu budget's fixed evaluation (500 images, PGD 20 × 1)."""
    fits = [e for e in range(1, CPU_MAX_EPOCHS + 1)
            if predicted_minutes(costs, replace(CPU_BASE, epochs=e), train_count)
            <= CPU_MINUTES]
    epochs = max(fits or [1])
    b = replace(CPU_BASE, epochs=epochs)
    more = replace(CPU_BASE, epochs=epochs + 1)
    return replace(b, chosen=(
        f"the most epochs whose predicted time is at most {CPU_MINUTES:g} min: "
        f"{predicted_minutes(costs, b, train_count):.0f} min for {epochs} epoch(s), "
        f"{predicted_minutes(costs, more, train_count):.0f} min for {epochs + 1} (costs "
        f"measured by `{costs['command']}` on {costs['date']}, load average "
        f"{costs['load']:.1f})"))


def write_costs(run: Run, images: int, path: str) -> None:
    rows = {}
    for key, rec in run.steps.items():
        row, part = key.split("/")[:2]
        if rec["status"] in ("done", "reused"):
            rows.setdefault(row, {"train_s": 0.0, "eval_s": 0.0})
            rows[row][f"{part}_s"] += rec["seconds"]
    costs = {"command": "python -m benchmarks.reproduce " + " ".join(run.state["argv"]),
             "date": time.strftime("%Y-%m-%d %H:%M"), "load": run.state["sittings"][0]["load"],
             "images": images, "cores": os.cpu_count(), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, json.dumps(costs, indent=1) + "\n")
    print(f"[reproduce] wrote {path}")


def resolve_budget(args, train_count: int) -> Budget:
    if args.measure:
        return measure_budget(args.measure_images)
    if args.budget != "cpu":
        return BUDGETS[args.budget]
    if not os.path.isfile(args.costs):
        raise UsageError(f"--budget cpu: {args.costs} not found; measure the costs first with "
                         "python -m benchmarks.reproduce --measure")
    with open(args.costs) as f:
        return cpu_budget(json.load(f), train_count)


# -- the command -----------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return exit_status(lambda: report(args, argv))


def report(args, argv: list[str]) -> int:
    paths = Paths(args)
    if not os.path.isdir(os.path.join(REPO, paths.data_root)):
        raise UsageError(f"{paths.data_root}: no such folder (pass --data or --data-root)")
    train_count = training_count(args, paths)
    budget = resolve_budget(args, train_count)
    steps = plan(args, budget, paths, train_count)
    if args.measure:
        steps = [s for s in steps if "/curve/" not in s.key]
    run = Run(paths, budget, argv, args.resume or args.render_only, not args.render_only)
    if not args.render_only:
        for step in steps:
            run_step(step, run, paths, args.threads)
        run.save(ended=True)
    if args.measure:
        write_costs(run, args.measure_images, args.costs)
    write_report(run, budget, steps, paths, train_count)
    return 0 if all(run.steps.get(s.key, {}).get("status") == "done" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
