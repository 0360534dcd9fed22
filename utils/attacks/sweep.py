"""The resumable attack engine: every attack of the evaluation runs through ``attack_unit``.

A *unit* is one attack at one eps (``pgd/1``: the paper's PGD at the second eps of its grid;
``pgd-ce/0``, ``autoattack/0``): its restarts run one after the other over the attacked
examples in batches, each merged into the kept perturbations by the attack's rule. Progress
goes to ``ctx.state`` after every restart and, on a stop request, after the running batch;
``--resume`` continues from there and computes what the uninterrupted run would have, since
every random start depends only on (seed, eps index, restart, example index).

Only the examples classified correctly without attack are attacked (delta = 0 fools the
others, which keep their clean prediction). Under torchrun each process attacks its shard;
the rows are gathered at each save.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from base import preemption
from base.distributed import Dist
from base.progress import progress
from base.tensors import eval_mode, to_device
from datasets.data import ImageData, to_float
from utils.attacks.pgd import PGD, kept, pgd_restart, start_keys
from utils.eval.eval_state import EvalState

log = logging.getLogger("clustr")


def percent(correct: torch.Tensor) -> float:
    """Share of True in percent, in double precision (as the original's 100. * n / N)."""
    return 100.0 * int(correct.sum()) / len(correct) if len(correct) else 0.0


@dataclass
class Outcome:
    """One attack at one eps on a fixed set of examples, per example."""

    attack: str
    eps: float                  # in units of 1/255; 0 for clean accuracy
    robust: torch.Tensor        # (N,) bool: correctly classified under the attack
    seconds: float = 0.0
    # with --save-adv: (rows (k,) into the data set, images (k, 3, H, W)) that fooled it
    adv: tuple[torch.Tensor, torch.Tensor] | None = None
    package: str = ""           # AutoAttack: the package and version that ran
    pred: torch.Tensor | None = None   # (N,) prediction under the kept perturbation
    linf: torch.Tensor | None = None   # (N,) its l-inf norm (0: not attacked)
    steps: torch.Tensor | None = None  # (N,) its gradient steps

    @property
    def accuracy(self) -> float:
        return percent(self.robust)


@dataclass
class AttackContext:
    """What the units attack and where their progress goes."""

    model: torch.nn.Module
    data: ImageData
    device: torch.device
    batch: int                  # examples per attack batch
    seed: int = 111             # of the per-example random starts
    dist: Dist = field(default_factory=Dist.single)
    state: EvalState = field(default_factory=EvalState)  # default: kept in memory only
    keep_adv: bool = False      # keep the adversarial images that fooled the model

    def __post_init__(self):
        self.device = torch.device(self.device)


@torch.no_grad()
def predictions(model, images: torch.Tensor, batch: int, device, dist: Dist | None = None,
                logits: bool = False) -> torch.Tensor:
    """(N,) predictions in data-set order, on the CPU; each process predicts its shard.
    ``model.predict`` (the paper's scores), or with ``logits`` the arg-max of ``model(x)``.
    ``images``: uint8, or float in [0, 1] (adversarial images, taken as they are)."""
    dist = dist or Dist.single()
    lo, hi = dist.shard(len(images))
    out = [torch.empty(0, dtype=torch.long)]
    with eval_mode(model):
        for s in range(lo, hi, batch):
            x = images[s:min(s + batch, hi)]
            x = to_device(x, device) if x.dtype == torch.uint8 else x.to(device)
            out.append((model(x).argmax(1) if logits else model.predict(x)).cpu())
    return dist.gather_rows(torch.cat(out), len(images))


def sweep(ctx: AttackContext, attack: PGD, epsilons, clean_pred: torch.Tensor) -> list[Outcome]:
    """``attack`` at every eps; the eps's position ``e`` names its unit and seeds its random
    starts (with the same seed, every attack starts each restart of an example from the same
    point)."""
    outcomes = []
    for e, eps in enumerate(epsilons):
        outcomes.append(attack_unit(ctx, attack, e, eps, clean_pred))
        log.info("%s eps %g/255: %.2f%% robust on %d images (%.0fs)", attack.title, eps,
                 outcomes[-1].accuracy, len(clean_pred), outcomes[-1].seconds)
        preemption.point(f"{attack.name}-eps-{e}", ctx.dist.rank)
        if e + 1 < len(epsilons) and preemption.should_stop(ctx.dist):
            raise preemption.stop(f"after {attack.title} eps {eps:g}/255")
    return outcomes


def attack_unit(ctx: AttackContext, attack: PGD, e: int, eps: float,
                clean_pred: torch.Tensor) -> Outcome:
    """``attack`` at ``eps`` (units of 1/255, index ``e`` of the paper's grid), resumed from
    ``ctx.state`` when it holds the unit."""
    key = f"{attack.name}/{e}"
    unit = ctx.state.get(key)
    if unit is None or not unit["done"]:
        unit = _Run(ctx, attack, e, eps, clean_pred).run(unit)
    return unpack(attack.name, eps, unit, ctx.data.labels)


def unpack(name: str, eps: float, unit: dict, labels: torch.Tensor) -> Outcome:
    adv = (unit["adv_rows"], unit["adv_images"]) if "adv_rows" in unit else None
    return Outcome(name, eps, unit["pred"] == labels, unit["seconds"], adv,
                   unit.get("package", ""), unit["pred"], unit.get("linf"), unit.get("steps"))


class _Run:
    """One PGD unit: restarts x batches over the attacked examples, saved as it goes."""

    def __init__(self, ctx: AttackContext, attack: PGD, e: int, eps: float,
                 clean_pred: torch.Tensor):
        self.ctx, self.attack, self.e, self.eps = ctx, attack, e, eps
        self.key, self.clean_pred = f"{attack.name}/{e}", clean_pred
        self.rows = (clean_pred == ctx.data.labels).nonzero().flatten()  # attacked
        self.lo, self.hi = ctx.dist.shard(len(self.rows))
        # every process runs as many batches as the largest shard, so all reach each safe
        # point (a collective under torchrun) together
        self.n_batches = -(-max(ctx.dist.shard_sizes(len(self.rows))) // ctx.batch)

    def _fresh(self) -> dict:
        n, data = len(self.rows), self.ctx.data
        unit = {"done": False, "restart": 0, "batch": 0, "batch_size": self.ctx.batch,
                "seconds": 0.0, "loss": torch.full((n,), -float("inf")),
                "pred": data.labels[self.rows].clone(),
                "steps": torch.zeros(n, dtype=torch.long), "linf": torch.zeros(n)}
        if self.ctx.keep_adv:
            unit["delta"] = torch.zeros((n,) + tuple(data.images.shape[1:]))
        return unit

    def _save(self, unit: dict, restart: int, batch: int) -> dict:
        """Gather every process's rows (each updated only its own) and save."""
        n, dist = len(self.rows), self.ctx.dist
        gathered = {k: dist.gather_rows(unit[k][self.lo:self.hi], n)
                    for k in ("loss", "pred", "steps", "linf", "delta") if k in unit}
        unit = dict(unit, **gathered, restart=restart, batch=batch,
                    batch_size=self.ctx.batch, seconds=self.before + time.perf_counter()
                    - self.begin)
        self.ctx.state.put(self.key, unit)
        return unit

    def run(self, unit: dict | None) -> dict:
        unit = unit or self._fresh()
        a, name, title, dist = self.attack, self.attack.name, self.attack.title, self.ctx.dist
        self.begin, self.before = time.perf_counter(), unit["seconds"]
        first_restart = unit["restart"]
        # a resume may attack in batches of another size: start again at the batch holding
        # the first example not yet done (re-attacking a done one gives it the same values)
        first_batch = unit["batch"] * unit["batch_size"] // self.ctx.batch
        for r in range(first_restart, a.restarts):
            bar = progress(range(first_batch if r == first_restart else 0, self.n_batches),
                           desc=f"{title} eps {self.eps:g}/255 restart {r + 1}/{a.restarts}",
                           leave=False)
            for b in bar:
                self._batch(unit, r, b)
                preemption.point(f"{name}-batch-{self.e}-{r}-{b}", dist.rank)
                if b + 1 < self.n_batches and preemption.should_stop(dist):
                    self._save(unit, r, b + 1)
                    raise preemption.stop(f"in {title} eps {self.eps:g}/255, restart {r + 1}")
            unit = self._save(unit, r + 1, 0)
            preemption.point(f"{name}-restart-{self.e}-{r}", dist.rank)
            if r + 1 < a.restarts and preemption.should_stop(dist):
                raise preemption.stop(f"after {title} eps {self.eps:g}/255, restart {r + 1}")
        return self._finish(unit)

    def _finish(self, unit: dict) -> dict:
        n, rows, data = len(self.clean_pred), self.rows, self.ctx.data
        pred, linf = self.clean_pred.clone(), torch.zeros(n)
        steps = torch.zeros(n, dtype=torch.long)
        pred[rows], linf[rows], steps[rows] = unit["pred"], unit["linf"], unit["steps"]
        done = {"done": True, "pred": pred, "linf": linf, "steps": steps,
                "seconds": self.before + time.perf_counter() - self.begin}
        if self.ctx.keep_adv:
            fooled = (unit["pred"] != data.labels[rows]).nonzero().flatten()
            done["adv_rows"] = rows[fooled]
            done["adv_images"] = (to_float(data.images[rows[fooled]]) + unit["delta"][fooled]
                                  ).clamp(0.0, 1.0)
        self.ctx.state.put(self.key, done)
        return done

    def _batch(self, unit: dict, r: int, b: int) -> None:
        """Restart ``r`` on this process's ``b``-th batch, merged by the attack's rule."""
        ctx, a = self.ctx, self.attack
        pos = torch.arange(self.lo + b * ctx.batch, min(self.lo + (b + 1) * ctx.batch, self.hi))
        if a.fooled_wins:  # an example fooled by an earlier restart stays so
            pos = pos[unit["pred"][pos] == ctx.data.labels[self.rows[pos]]]
        if len(pos) == 0:
            return
        rows, dev = self.rows[pos], ctx.device
        x, y = to_device(ctx.data.images[rows], dev), ctx.data.labels[rows].to(dev)
        res = pgd_restart(ctx.model, x, y, self.eps / 255, a,
                          start_keys(ctx.seed, self.e, r, ctx.data.indices[rows]))
        take = kept(unit["loss"][pos].to(dev), res, a.fooled_wins)
        t = take.cpu()
        for name, new in (("loss", res.loss), ("pred", res.pred), ("steps", res.steps),
                          ("linf", res.delta.flatten(1).abs().amax(1))):
            unit[name][pos] = torch.where(t, new.cpu().to(unit[name].dtype), unit[name][pos])
        if "delta" in unit:
            unit["delta"][pos[t]] = res.delta[take].float().cpu()
