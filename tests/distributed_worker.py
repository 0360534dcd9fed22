"""``main_clustr.py`` instrumented for the distributed tests; torchrun runs this file instead.

The instrumentation wraps ``main_clustr.run_epoch`` here, in the tests, so the project's
epoch loop carries no test hooks. Set by the environment:

* ``STATE_DIR``: after every epoch each process writes one SHA-256 per tensor of its
  clusters, sampler losses and network to ``STATE_DIR/rank<R>_epoch<E>.txt``;
* ``FAIL_RANK``: that process raises at the start of its first epoch;
* ``NAN_RANK``: that process's second training loss is NaN.
"""
import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main_clustr  # noqa: E402


def digest(t) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def instrumented(run_epoch):
    def run(trainer, epoch, start, ckpt_path):
        rank = trainer.dist.rank
        if os.environ.get("FAIL_RANK") == str(rank):
            raise RuntimeError(f"rank {rank} fails on purpose (epoch {epoch})")
        metrics = run_epoch(trainer, epoch, start, ckpt_path)
        folder = os.environ.get("STATE_DIR")
        if folder:
            c = trainer.clusters
            tensors = {"centers": c.centers, "assignments": c.assignments,
                       "variance": c.variance, "losses": trainer.sampler.losses,
                       **trainer.model.state_dict()}
            with open(os.path.join(folder, f"rank{rank}_epoch{epoch}.txt"), "w") as f:
                f.write("".join(f"{name} {digest(t)}\n" for name, t in tensors.items()))
        return metrics
    return run


def nan_on_second_call(batch_terms):
    calls = {"n": 0}

    def terms(trainer, *args, **kwargs):
        terms, per_example = batch_terms(trainer, *args, **kwargs)
        if os.environ.get("NAN_RANK") == str(trainer.dist.rank):
            calls["n"] += 1
            if calls["n"] == 2:
                terms = {name: t * float("nan") for name, t in terms.items()}
        return terms, per_example
    return terms


if __name__ == "__main__":
    main_clustr.run_epoch = instrumented(main_clustr.run_epoch)
    trainer_class = main_clustr.ClusTRTrainer
    trainer_class.batch_terms = nan_on_second_call(trainer_class.batch_terms)
    sys.exit(main_clustr.main())
