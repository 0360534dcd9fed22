"""docs/results/BENCHMARKS.md: the machine, the command, the ratios against targets, details."""
from __future__ import annotations

import pandas as pd

TARGETS = {"R1": 1.10, "R2": 1.40, "R3": 0.5, "R4": 0.05}
METHODS = {"clustr": "ClusTR", "ce": "CE"}
SPREAD = ["min", "median", "mean", "max"]
INTRO = """Written by `python -m benchmarks.run` (see docs/benchmarking.md). Every ratio is of
medians over repeats with warm-up excluded (min and max beside them); ratios
compare runs made in the same process, alternated, on the same data."""


def _s(seconds: float) -> str:
    if seconds < 600:
        return f"{seconds * 1e3:.2f} ms" if seconds < 1.0 else f"{seconds:.2f} s"
    return f"{seconds / 60:.0f} min" if seconds < 3 * 3600 else f"{seconds / 3600:.1f} h"


def _table(rows: list, header: list[str]) -> str:
    """A Markdown table: pandas' writer, cells as written."""
    return pd.DataFrame(rows, columns=header).to_markdown(index=False, disable_numparse=True)


def _ratio(name: str, what: str, value: float, applies: bool = True) -> list:
    """A row of the ratios table; R4 is shown as a percentage."""
    mark = "n/a" if not applies else "pass" if value <= TARGETS[name] else "FAIL"
    if name == "R4":
        return [name, what, f"{value * 100:.2f}%", f"<= {TARGETS[name] * 100:.0f}%", mark]
    return [name, what, f"{value:.3f}", f"<= {TARGETS[name]:.2f}", mark]


def render(res: dict) -> str:
    """The report's blocks (headings, paragraphs, tables), a blank line between them."""
    m, cfg = res["machine"], res["config"]
    warnings = res["warnings"] + (["quick (smoke) configuration: smaller batches and sizes "
                                   "than the targets assume; do not quote these figures."]
                                  if cfg["quick"] else [])
    load = ", ".join(f"{k} {v:.2f}" for k, v in res["load"].items() if v is not None)
    machine = [
        ["CPU", f"{m['cpu']} ({m['cores']} cores, {m['usable_cores']} usable)"],
        ["instruction sets", m["isa"]],
        ["torch", f"{m['torch']} used, {m['torch_pinned'] or 'none'} pinned in "
                  f"requirements.txt ({m['torch_threads']} CPU threads), Python {m['python']}"],
        ["device", m["device"] + (" + bf16 autocast" if cfg["amp"] else "")],
        ["platform", m["platform"]], ["load average (1 min)", load or "unknown"],
        ["date", res["date"]], ["duration", f"{res['duration_s']:.0f} s"],
        ["command", f"`{res['command']}`"]]
    out = ["# Benchmarks", INTRO, "\n".join(f"> **Warning:** {w}" for w in warnings),
           "## Machine and command", _table(machine, ["", ""]),
           "## Ratios", _table(_ratios(res), ["", "what", "value", "target", ""])]
    for key, section in (("epochs", _epochs), ("pgd", _pgd)):
        if key in res:
            out += section(res)
    if "collect_env" in res:
        out += ["## torch.utils.collect_env", f"```\n{res['collect_env'].rstrip()}\n```"]
    return "\n\n".join(b for b in out if b) + "\n\n"


def _ratios(res: dict) -> list[list]:
    rows = []
    if "epochs" in res:
        e, step, mean = res["epochs"], res["epochs"]["step_s"], res["epochs"]["step_spread"]
        rows.append(_ratio("R1", f"ClusTR training step / plain CE step, batch {e['batch']} "
                           f"(median {_s(step['clustr'])} / {_s(step['ce'])}; mean "
                           f"{_s(mean['clustr']['mean'])} / {_s(mean['ce']['mean'])})", e["R1"]))
        rows.append(_ratio("R2", "ClusTR epoch (steps, embedding pass, k-means, metrics, test "
                           f"pass) / CE epoch (steps, test pass), {e['train_images']} training "
                           f"and {e['test_images']} test images ({_s(e['epoch_s']['clustr'])} "
                           f"/ {_s(e['epoch_s']['ce'])})", e["R2"]))
    if "pgd" in res:
        p = res["pgd"]
        rows.append(_ratio("R3", f"PGD sweep with shrinking / without ({_s(p['seconds']['shrink'])}"
                           f" / {_s(p['seconds']['mask'])}), {p['data']} data; accuracies "
                           f"{'agree' if p['agree'] else 'DISAGREE'} ({p['differ']} predictions "
                           "differ); the target is for the shared weights and real subset",
                           p["R3"], applies=p["data"] == "real"))
    if "epochs" in res:
        o = res["overheads"]
        rows.append(_ratio("R4", "sampler + Magnet loss + loss bookkeeping per step / ClusTR "
                           f"step ({_s(o['added_s'])} / {_s(res['epochs']['step_s']['clustr'])})",
                           o["R4"]))
        for name, label in METHODS.items():
            r = res["residuals"][name]
            rows.append(["", f"{label} epoch − sum of its parts (median epoch "
                         f"{_s(r['epoch_s'])}; its steps and the other parts timed apart "
                         f"{_s(r['parts_s'])})", f"{_s(r['residual_s'])} "
                         f"({100 * r['residual_s'] / r['epoch_s']:.1f}%)", "near 0", ""])
    if "seed_command" in res:
        c, s = res["seed_command"], res["seed_command"]["seed"]
        rows.append(["", f"the seed's command end to end: {s['epochs']} epochs on "
                     f"{s['train_images']:,} + {s['test_images']:,} images, then "
                     f"{s['iterations']} steps × {s['restarts']} restarts × 4 eps; measured "
                     f"whole (training {_s(c['training_s'])}, sweep {_s(c['sweep_s'])})",
                     _s(c["total_s"]), "", ""])
    return rows


def _epochs(res: dict) -> list[str]:
    e, ph, o = res["epochs"], res["phases"], res["overheads"]
    total, step = sum(ph["phases_s"].values()), e["step_s"]["clustr"]
    phases = {**ph["phases_s"], "(k-means alone, timed again)": ph["kmeans_s"]}
    parts = {**o["parts_s"], **{f"{n} (shared with CE)": s for n, s in o["shared_s"].items()}}
    return [f"## ClusTR epoch, phase by phase ({e['train_images']} training images, "
            f"{e['steps_per_epoch']} steps of {e['batch']})",
            _table([[n, _s(s), f"{100 * s / total:.1f}%"] for n, s in phases.items()],
                   ["phase", "time", "share"]),
            f"### Spread ({e['repeats']} timed epochs per method after a warm-up)",
            _table([row for n, label in METHODS.items() for row in (
                [f"{label} step", e["step_samples"][n], *map(_s, e["step_spread"][n].values())],
                [f"{label} epoch", len(e["epoch_samples"][n]),
                 *map(_s, e["epoch_spread"][n].values())])], ["", "samples", *SPREAD]),
            "Epochs: " + ", ".join(f"{n} {', '.join(f'{t:.2f}' for t in ts)} s"
                                   for n, ts in e["epoch_samples"].items()),
            "### What a ClusTR step adds (R4), and the data path both share",
            _table([[n, _s(s), f"{100 * s / step:.2f}%"] for n, s in parts.items()],
                   ["part", "per step", "share of the ClusTR step"])]


def _pgd(res: dict) -> list[str]:
    p = res["pgd"]
    return [f"## PGD sweep (R3): {p['images']} test images, {p['data']} data, "
            f"{p['iterations']} iterations, {p['restarts']} restart(s), clean accuracy "
            f"{p['clean_acc']:.2f}%",
            _table([[f"{e['eps']:g}", f"{e['acc_shrink']:.2f}%", f"{e['acc_mask']:.2f}%",
                     e["differ"]] for e in p["per_eps"]],
                   ["eps (/255)", "robust acc., shrinking", "robust acc., masking",
                    "predictions that differ"]),
            _table([[n, *map(_s, sp.values())] for n, sp in p["spread"].items()],
                   ["sweep", *SPREAD]),
            f"Seconds per sweep: shrinking {p['samples']['shrink']}, masking "
            f"{p['samples']['mask']}."]
