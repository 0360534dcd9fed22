"""docs/results/BENCHMARKS.md: the machine, the command, the ratios against targets, details."""
from __future__ import annotations

TARGETS = {"R1": 1.10, "R2": 1.40, "R3": 0.5, "R4": 0.05}


def _mark(value: float, target: float, applies: bool = True) -> str:
    if not applies:
        return "n/a"
    return "pass" if value <= target else "FAIL"


def _s(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


def render(res: dict) -> str:
    m, cfg = res["machine"], res["config"]
    out = ["# Benchmarks", "",
           "Written by `python -m benchmarks.run` (see docs/benchmarking.md). Every ratio is of",
           "medians over repeats with warm-up excluded (min and max beside them); ratios",
           "compare runs made in the same process, alternated, on the same data.", ""]
    warnings = list(res.get("warnings", []))
    if cfg["quick"]:
        warnings.append("quick (smoke) configuration: smaller batches and sizes than the "
                        "targets assume; do not quote these figures.")
    for w in warnings:
        out.append(f"> **Warning:** {w}")
    if warnings:
        out.append("")
    load = res["load"]
    out += ["## Machine and command", "", "| | |", "|---|---|",
            f"| CPU | {m['cpu']} ({m['cores']} cores, {m['usable_cores']} usable) |",
            f"| instruction sets | {m.get('isa', 'unknown')} |",
            f"| torch | {m['torch']} used, {m.get('torch_pinned') or 'none'} pinned in "
            f"requirements.txt ({m['torch_threads']} CPU threads), Python {m['python']} |",
            f"| device | {m['device']}{' + bf16 autocast' if cfg['amp'] else ''} |",
            f"| platform | {m['platform']} |",
            f"| load average (1 min) | {_fmt_load(load)} |",
            f"| date | {res['date']} |",
            f"| duration | {res['duration_s']:.0f} s |",
            f"| command | `{res['command']}` |", ""]
    out += _ratios(res)
    if "epochs" in res:
        out += _epochs(res)
    if "pgd" in res:
        out += _pgd(res["pgd"])
    if "scaling" in res:
        out += _scaling(res["scaling"])
    if "collect_env" in res:
        out += ["## torch.utils.collect_env", "", "```", res["collect_env"].rstrip(), "```", ""]
    return "\n".join(out) + "\n"


def _fmt_load(load: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in load.items() if v is not None) or "unknown"


def _ratios(res: dict) -> list[str]:
    rows = ["## Ratios", "", "| | what | value | target | |", "|---|---|---|---|---|"]
    if "epochs" in res:
        e, o = res["epochs"], res["overheads"]
        mean = ("" if "step_spread" not in e else
                f"; mean {_s(e['step_spread']['clustr']['mean'])} / "
                f"{_s(e['step_spread']['ce']['mean'])}")
        rows.append(f"| R1 | ClusTR training step / plain CE step, batch {e['batch']} "
                    f"(median {_s(e['step_s']['clustr'])} / {_s(e['step_s']['ce'])}{mean}) "
                    f"| {e['R1']:.3f} | <= {TARGETS['R1']:.2f} | {_mark(e['R1'], TARGETS['R1'])} |")
        rows.append(f"| R2 | ClusTR epoch (steps, embedding pass, k-means, metrics, test pass) "
                    f"/ CE epoch (steps, test pass), {e['train_images']} training and "
                    f"{e['test_images']} test images ({_s(e['epoch_s']['clustr'])} / "
                    f"{_s(e['epoch_s']['ce'])}) | {e['R2']:.3f} | <= {TARGETS['R2']:.2f} "
                    f"| {_mark(e['R2'], TARGETS['R2'])} |")
    if "pgd" in res:
        p = res["pgd"]
        real = p["data"] == "real"
        rows.append(f"| R3 | PGD sweep with shrinking / without ({_s(p['seconds']['shrink'])} "
                    f"/ {_s(p['seconds']['mask'])}), {p['data']} data; accuracies "
                    f"{'agree' if p['agree'] else 'DISAGREE'} ({p['differ']} predictions "
                    f"differ) | {p['R3']:.3f} | <= {TARGETS['R3']:.2f} (shared weights, real "
                    f"subset) | {_mark(p['R3'], TARGETS['R3'], real)} |")
    if "epochs" in res:
        o = res["overheads"]
        rows.append(f"| R4 | sampler + Magnet loss + loss bookkeeping per step / ClusTR step "
                    f"({_s(o['added_s'])} / {_s(res['epochs']['step_s']['clustr'])}) "
                    f"| {o['R4'] * 100:.2f}% | <= {TARGETS['R4'] * 100:.0f}% "
                    f"| {_mark(o['R4'], TARGETS['R4'])} |")
    if "residuals" in res:
        for name, label in (("clustr", "ClusTR"), ("ce", "CE")):
            r = res["residuals"][name]
            rows.append(f"| | {label} epoch − sum of its parts (median epoch {_s(r['epoch_s'])}; "
                        f"its steps and the other parts timed apart {_s(r['parts_s'])}) "
                        f"| {_s(r['residual_s'])} ({100 * r['residual_s'] / r['epoch_s']:.1f}%) "
                        f"| near 0 | |")
    if "seed_command" in res:
        c = res["seed_command"]
        what = ("measured whole" if c["kind"] == "measured" else
                "**estimate** from the per-image rates above")
        rows.append(f"| | the seed's command end to end: {c['seed']['epochs']} epochs on "
                    f"{c['seed']['train_images']:,} + {c['seed']['test_images']:,} images, "
                    f"then {c['seed']['iterations']} steps × {c['seed']['restarts']} restarts "
                    f"× 4 eps; {what} (training {_hms(c['training_s'])}, sweep "
                    f"{_hms(c['sweep_s'])}) | {_hms(c['total_s'])} | | |")
    return rows + [""]


def _hms(seconds: float) -> str:
    if seconds < 600:
        return _s(seconds)
    if seconds < 3 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _spread(sp: dict) -> str:
    return (f"{_s(sp['min'])} | {_s(sp['median'])} | {_s(sp['mean'])} | {_s(sp['max'])}")


def _epochs(res: dict) -> list[str]:
    e, ph, o = res["epochs"], res["phases"], res["overheads"]
    total = sum(ph["phases_s"].values())
    rows = [f"## ClusTR epoch, phase by phase ({e['train_images']} training images, "
            f"{e['steps_per_epoch']} steps of {e['batch']})", "",
            "| phase | time | share |", "|---|---|---|"]
    for name, s in ph["phases_s"].items():
        rows.append(f"| {name} | {_s(s)} | {100 * s / total:.1f}% |")
    rows.append(f"| (k-means alone, timed again) | {_s(ph['kmeans_s'])} | "
                f"{100 * ph['kmeans_s'] / total:.1f}% |")
    rows += ["", f"### Spread ({e.get('repeats', len(e['epoch_samples']['clustr']))} timed "
             f"epochs per method after a warm-up)", "",
             "| | samples | min | median | mean | max |", "|---|---|---|---|---|---|"]
    for name, label in (("clustr", "ClusTR"), ("ce", "CE")):
        if "step_spread" in e:
            rows.append(f"| {label} step | {e['step_samples'][name]} | "
                        f"{_spread(e['step_spread'][name])} |")
            rows.append(f"| {label} epoch | {len(e['epoch_samples'][name])} | "
                        f"{_spread(e['epoch_spread'][name])} |")
    if "seed_command" in res and res["seed_command"]["kind"] == "estimate":
        c = res["seed_command"]
        rows += ["", "### The seed's command, estimated (not measured)", "",
                 f"From the median ClusTR step at batch {c['batch_measured']} (scaled to 240 "
                 f"per step), the embedding pass, k-means and metrics per image, and PGD at "
                 f"{_s(c['pgd_pass_s'])} per image and pass without shrinking (every example "
                 f"attacked at every step: a fully robust model's cost; a model that breaks "
                 f"costs less).", "", "| part of one epoch | estimate |", "|---|---|"]
        rows += [f"| {n} | {_hms(v)} |" for n, v in c["epoch_parts_s"].items()]
        rows += [f"| epoch | {_hms(c['epoch_s'])} |",
                 f"| training (30 epochs + the first refresh) | {_hms(c['training_s'])} |",
                 f"| default sweep | {_hms(c['sweep_s'])} |",
                 f"| total | {_hms(c['total_s'])} |"]
    rows += ["", f"Step times: {e['step_samples']['clustr']} ClusTR and "
             f"{e['step_samples']['ce']} CE steps; epochs: "
             + ", ".join(f"{n} {', '.join(f'{t:.2f}' for t in ts)} s"
                         for n, ts in e["epoch_samples"].items()), "",
             "### What a ClusTR step adds (R4), and the data path both share", "",
             "| part | per step | share of the ClusTR step |", "|---|---|---|"]
    step = e["step_s"]["clustr"]
    for name, s in o["parts_s"].items():
        rows.append(f"| {name} | {_s(s)} | {100 * s / step:.2f}% |")
    for name, s in o["shared_s"].items():
        rows.append(f"| {name} (shared with CE) | {_s(s)} | {100 * s / step:.2f}% |")
    if "embed_batches" in res:
        b = res["embed_batches"]
        rows += ["", f"### Embedding pass by batch size ({b['images']} images; the epoch uses "
                 f"{b['embed_batch']} for the training set, {b['test_batch']} for the test set)",
                 "", "| batch | per image |", "|---|---|"]
        rows += [f"| {k} | {_s(v)} |" for k, v in b["per_image_s"].items()]
    return rows + [""]


def _pgd(p: dict) -> list[str]:
    rows = [f"## PGD sweep (R3): {p['images']} test images, {p['data']} data, "
            f"{p['iterations']} iterations, {p['restarts']} restart(s), clean accuracy "
            f"{p['clean_acc']:.2f}%", "",
            "| eps (/255) | robust acc., shrinking | robust acc., masking | predictions "
            "that differ |", "|---|---|---|---|"]
    for e in p["per_eps"]:
        rows.append(f"| {e['eps']:g} | {e['acc_shrink']:.2f}% | {e['acc_mask']:.2f}% "
                    f"| {e['differ']} |")
    rows += ["", "| sweep | min | median | mean | max |", "|---|---|---|---|---|"]
    if "spread" in p:
        rows += [f"| {name} | {_spread(sp)} |" for name, sp in p["spread"].items()]
    return rows + ["", f"Seconds per sweep: shrinking {p['samples']['shrink']}, masking "
                   f"{p['samples']['mask']}.", ""]


def _scaling(rows_in: list[dict]) -> list[str]:
    base = rows_in[0]
    rows = ["## Scaling (ClusTR epoch, one process per size)", "",
            "| training images | steps | epoch | vs 1x | per 1000 images | peak memory "
            "| after setup | data |", "|---|---|---|---|---|---|---|---|"]
    for r in rows_in:
        rows.append(f"| {r['size']} ({r['multiplier']}x) | {r['steps']} | {_s(r['epoch_s'])} "
                    f"| {r['epoch_s'] / base['epoch_s']:.2f}x | "
                    f"{_s(1000 * r['epoch_s'] / r['size'])} | {r['peak_mib']:.0f} MiB "
                    f"| {r['setup_peak_mib']:.0f} MiB | {r['data_mib']:.1f} MiB |")
    return rows + ["", "Peak memory: peak resident set size of the worker process on a CPU "
                   "(`VmHWM` on Linux, `ru_maxrss` elsewhere), torch's peak allocation on a "
                   "GPU; \"after setup\" is that peak before the first epoch. The test set is "
                   "the same at every size.", ""]
