"""The one list of the files a run writes into its experiment directory (``--checkpoint``).

Every writer takes its file name from here, and the experiment directory's rules (refuse to
overwrite, ``--overwrite``, temporaries of a killed run) match these names, so a new output
is added in one place. Names with a ``{field}`` are numbered; ``pattern`` gives their glob.
"""
from __future__ import annotations

import re

# training
LOG = "log.txt"                              # the original's per-epoch table
PARAMS = "params.txt"                        # every argument on one line
CHECKPOINT = "checkpoint.pth"                # the last epoch, the original's keys
EPOCH_CHECKPOINT = "checkpoint_{epoch}.pth"  # --save-all
RESUME = "resume.pth"                        # what --resume continues from
METRICS = "metrics.csv"                      # one row of named metrics per epoch
# evaluation
PAPER_RESULTS = "attack_results_ext.csv"     # the original's schema: epsilons,test_set_accs
PREDICTIONS = "predictions_eps{eps:g}.csv"   # per test example, one file per eps
PLOT = "robustness.png"
SUMMARY = "eval_summary.json"
STRONG_RESULTS = "attack_results_strong.csv"  # --strong / --autoattack
DIAGNOSTICS = "diagnostics.json"              # --strong / --autoattack
EVAL_RESUME = "eval_resume.pth"               # what --resume continues an evaluation from
ADVERSARIAL = "adversarial.pt"                # --save-adv
AUTOATTACK_LOG = "autoattack_log.txt"         # the GitHub autoattack package's own log
MODEL_INFO = "model_info.json"                # --autoattack: RobustBench-style model card
# both
RUN_LOG = "run.log"                           # every log line, appended across resumes
ARGS_JSON = "args.json"                       # the arguments, machine-readable
LOCK = ".clustr.lock"                         # held by the run writing here (run_lock.py)


def pattern(name: str) -> str:
    """The glob matching every file of a numbered name: ``checkpoint_*.pth``."""
    return re.sub(r"\{[^}]*\}", "*", name)


TRAIN_OUTPUTS = (LOG, PARAMS, CHECKPOINT, pattern(EPOCH_CHECKPOINT), RESUME, METRICS)
EVAL_OUTPUTS = (PARAMS, PAPER_RESULTS, pattern(PREDICTIONS), PLOT, SUMMARY, STRONG_RESULTS,
                DIAGNOSTICS, EVAL_RESUME, ADVERSARIAL, AUTOATTACK_LOG, MODEL_INFO, RUN_LOG,
                ARGS_JSON)
