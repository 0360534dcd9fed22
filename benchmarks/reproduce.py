"""The reproduction report (docs/reproducing.md: its budgets, the cpu budget's costs, resume).
It runs the calls of ``benchmarks.reproduce_plan``, logged in WORK/logs/ and recorded in
WORK/report.json, which ``--resume`` continues."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pandas as pd

from base.errors import UsageError, exit_status
from base.io import file_sha256, write_text_atomic
from benchmarks import reproduce_plan
from benchmarks.reproduce_plan import BUDGETS, CPU_BASE, TRAINING, Budget, Paths, Step, at
from benchmarks.reproduce_report import write_report

CPU_MINUTES, CPU_MAX_EPOCHS = 90.0, 30  # the cpu budget: on 2 idle cores, at most the paper's
STATE = "report.json"
STOPPED = {130, 143, -2, -9, -15}  # a call ended by Ctrl-C, SIGTERM or SIGKILL: stop here too


class Run:
    """``WORK/report.json``: the budget, the command, the sittings and every call."""

    def __init__(self, paths: Paths, budget: Budget, argv: list[str], args):
        self.path, resume = at(paths(STATE)), args.resume or args.render_only
        if os.path.isfile(self.path) and not resume:
            raise UsageError(f"{paths.work} already holds a report: continue it with the same "
                             "command and --resume, or pass a new --work")
        if resume and not os.path.isfile(self.path):
            raise UsageError(f"--resume: {paths(STATE)} not found, so there is no report to "
                             "continue (run without --resume to start one)")
        self.state = {"budget": asdict(budget), "steps": {}, "sittings": []}
        if resume:
            with open(self.path) as f:
                self.state = json.load(f)
        for k, v in asdict(budget).items():
            if self.state["budget"].get(k) != v:
                raise UsageError(f"--resume: the report in {paths.work} has {k} "
                                 f"{self.state['budget'].get(k)!r} (now {v!r}); keep its "
                                 "budget or pass a new --work")
        if not args.render_only:  # --render-only adds no sitting
            self.state["argv"] = argv
            self.state["sittings"].append({"start": time.time(), "load": os.getloadavg()[0]})
        self.steps = self.state["steps"]

    def save(self, ended: bool = False) -> None:
        self.state["sittings"][-1]["saved"] = time.time()  # a sitting killed later ends here
        if ended:
            self.state["sittings"][-1].update(end=time.time(), load_end=os.getloadavg()[0])
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.state, indent=1) + "\n")


def launch(argv: list[str], log_path: str, threads: int | None) -> tuple[int, float]:
    """One call from the repository root, its output appended to ``log_path``."""
    env = dict(os.environ) | ({} if threads is None else {"OMP_NUM_THREADS": str(threads),
                                                          "MKL_NUM_THREADS": str(threads)})
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.time()
    with open(log_path, "a") as log:
        rc = subprocess.run([sys.executable, *argv], cwd=reproduce_plan.REPO, stdout=log,
                            stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.time() - start


def run_step(step: Step, run: Run, paths: Paths, threads: int | None) -> None:
    """Run, continue or reuse one call; its record's status: done, failed or skipped."""
    old = run.steps.get(step.key, {})
    if old and old["argv"] != step.argv:
        raise UsageError(f"--resume: {step.key} ran as `python {' '.join(old['argv'])}`, now "
                         f"`python {' '.join(step.argv)}`: a changed setting; pass a new --work")
    if old.get("status") == "done":  # reused, once its files are the ones it wrote
        for f, sha in old["files"].items():
            if not os.path.isfile(at(f)) or file_sha256(at(f)) != sha:
                raise UsageError(f"{f} is not the file {step.key} wrote (changed or removed "
                                 "since): pass a new --work")
        return
    weights = dict(zip(step.argv, step.argv[1:])).get("--evaluate-ckpt")  # the flag's value
    if weights and not os.path.isfile(at(weights)):
        run.steps[step.key] = {"argv": step.argv, "status": "skipped", "seconds": 0.0,
                               "why": f"{weights} was not written"}
        return
    extra = continue_flags(step)
    rec = run.steps[step.key] = {"argv": step.argv, "status": "started",
                                 "runs": old.get("runs", 1), "seconds": old.get("seconds", 0.0),
                                 "command": step.argv + extra}
    run.save()
    print(f"[reproduce] {step.key}: python {' '.join(rec['command'])}", flush=True)
    rc, seconds = launch(rec["command"], at(paths("logs", step.key + ".log")), threads)
    rec.update(rc=rc, seconds=rec["seconds"] + seconds, runs=rec["runs"] + bool(extra),
               status="failed")
    if rc == 0 and all(os.path.isfile(at(f)) for f in step.outputs):
        rec.update(status="done", files={f: file_sha256(at(f)) for f in step.outputs})
    run.save()
    if rc in STOPPED:
        raise SystemExit(rc)


def continue_flags(step: Step) -> list[str]:
    """How a call that started before continues: its own ``--resume`` where it saved a state,
    ``--overwrite`` (``--force``) where it left files without one, nothing otherwise."""
    if step.kind == "pretrain":
        return ["--force"] if os.path.exists(at(step.outputs[0])) else []
    if step.folder is None or not os.path.isdir(at(step.folder)):
        return []
    state = "eval_resume.pth" if "--evaluate-ckpt" in step.argv else "resume.pth"
    if os.path.isfile(at(os.path.join(step.folder, state))):
        return ["--resume"]
    return ["--overwrite"] if os.listdir(at(step.folder)) else []


# -- the cpu budget, from measured costs ---------------------------------------------------------
def predicted_minutes(costs: dict, b: Budget, train_count: int) -> float:
    """Minutes of the report at budget ``b`` from the costs ``--measure`` wrote, per row:
    training seconds per epoch (ClusTR+Free: per epoch of the others' cost); per evaluation
    call a fixed cost (start-up, data) plus seconds per attacked image, AutoAttack's apart,
    since the curves run every attack but AutoAttack."""
    total = 0.0
    for row, c in ((r, c) for r, c in costs["rows"].items() if r in reproduce_plan.rows_of(b)):
        autoattack = c.get("autoattack_s", 0.0) / costs["images"]
        attacks = c.get("attacks_s", c["eval_s"]) / costs["images"]
        fixed = c["eval_s"] - (autoattack + attacks) * costs["images"]
        total += fixed + attacks * max(b.test_images or 0, b.strong_images) \
            + autoattack * b.strong_images
        curve_point = fixed + attacks * b.curve_images
        if row in TRAINING or row == "fgsm":
            trained = reproduce_plan.row_epochs(b, row, train_count)[0]
            epochs = b.epochs if row == "free" else trained
            points = 1 if row == "fgsm" else trained
            total += c["train_s"] * epochs + curve_point * points
        else:  # the pretrained clusters, the plain network: the curves' epoch 0
            total += c["train_s"] + curve_point
    return total / 60


def cpu_budget(costs: dict, train_count: int) -> Budget:
    """The most epochs (at most the paper's 30) whose predicted report fits in 90 minutes,
    at the cpu budget's fixed evaluation (500 images, PGD 20 × 1)."""
    def minutes(epochs):
        return predicted_minutes(costs, replace(CPU_BASE, epochs=epochs), train_count)

    fits = [e for e in range(1, CPU_MAX_EPOCHS + 1) if minutes(e) <= CPU_MINUTES]
    epochs = max(fits or [1])
    if fits:
        why = (f"the most epochs whose predicted time is at most {CPU_MINUTES:g} min: "
               f"{minutes(epochs):.0f} min for {epochs} epoch(s), {minutes(epochs + 1):.0f} "
               f"min for {epochs + 1}")
    else:
        why = (f"no budget with this evaluation fits in {CPU_MINUTES:g} min on this machine: "
               f"one epoch is predicted at {minutes(1):.0f} min, so the report trains one epoch")
    return replace(CPU_BASE, epochs=epochs, chosen=f"{why} (costs measured by "
                   f"`{costs['command']}` on {costs['date']}, load average {costs['load']:.1f})")


def write_costs(run: Run, paths: Paths, images: int, path: str) -> None:
    """Seconds of training and of evaluation per row, for ``--budget cpu``."""
    rows = {}
    for key, rec in run.steps.items():
        if rec["status"] == "done":
            row, part = key.split("/")[:2]
            rows.setdefault(row, {"train_s": 0.0, "eval_s": 0.0})[f"{part}_s"] += rec["seconds"]
            if part == "eval":
                rows[row].update(attack_seconds(paths(key)))
    costs = {"command": "python -m benchmarks.reproduce " + " ".join(run.state["argv"]),
             "date": time.strftime("%Y-%m-%d %H:%M"), "load": run.state["sittings"][0]["load"],
             "images": images, "cores": os.cpu_count(), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, json.dumps(costs, indent=1) + "\n")
    print(f"[reproduce] wrote {path}")


def attack_seconds(folder: str) -> dict:
    """Seconds an evaluation spent in AutoAttack and in the other attacks (its
    ``attack_results_strong.csv``)."""
    frame = pd.read_csv(at(os.path.join(folder, "attack_results_strong.csv")))
    seconds = frame["seconds"].fillna(0.0)
    autoattack = float(seconds[frame["attack"] == "autoattack"].sum())
    return {"autoattack_s": round(autoattack, 1),
            "attacks_s": round(float(seconds.sum()) - autoattack, 1)}


def resolve_budget(args, train_count: int) -> Budget:
    n = args.measure_images
    if args.measure:
        return Budget("measure", 1, None, n, n, n, 20, 1,
                      chosen="one epoch per row, to measure the costs")
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
    args = reproduce_plan.build_parser().parse_args(argv)
    return exit_status(lambda: report(args, argv))


def report(args, argv: list[str]) -> int:
    paths = Paths(args)
    if not os.path.isdir(at(paths.data_root)):
        raise UsageError(f"{paths.data_root}: no such folder (pass --data or --data-root)")
    train_count = reproduce_plan.training_count(args, paths)
    budget = resolve_budget(args, train_count)
    steps = [s for s in reproduce_plan.plan(args, budget, paths, train_count)
             if not args.measure or "/curve/" not in s.key]  # --measure: no curves
    run = Run(paths, budget, argv, args)
    if not args.render_only:
        for step in steps:
            run_step(step, run, paths, args.threads)
        run.save(ended=True)
    if args.measure:
        write_costs(run, paths, args.measure_images, args.costs)
    write_report(run, budget, steps, paths, train_count)
    return 0 if all(run.steps.get(s.key, {}).get("status") == "done" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
