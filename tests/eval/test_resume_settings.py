"""What an evaluation continued with --resume must repeat: the config fields declared with
``base.cli.resume_field``, compared through the resume state's fingerprint."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from base.cli import resume_settings
from base.errors import UsageError
from utils.eval.eval_state import check_arguments, open_eval_state
from utils.eval.evaluation import AttackConfig, EvalConfig

CPU = torch.device("cpu")
TEST = SimpleNamespace(images=torch.zeros(4, 3, 32, 32, dtype=torch.uint8),
                       labels=torch.arange(4))


def started(tmp_path, cfg: EvalConfig, attack: AttackConfig):
    ckpt = tmp_path / "weights.pth"
    ckpt.write_bytes(b"a plain state_dict")
    open_eval_state(cfg, attack, str(ckpt), TEST, str(tmp_path), CPU).save()
    return str(ckpt)


def test_a_changed_baseline_input_is_refused_on_resume(tmp_path):
    """Raw and normalised inputs are two protocols: a resumed evaluation must not mix them."""
    ckpt = started(tmp_path, EvalConfig(baseline_input="raw"), AttackConfig())
    with pytest.raises(UsageError, match=r"it had --baseline-input 'raw' \(now 'normalized'\)"):
        open_eval_state(EvalConfig(baseline_input="normalized"), AttackConfig(), ckpt, TEST,
                        str(tmp_path), CPU, resume="continue")
    state = open_eval_state(EvalConfig(baseline_input="raw"), AttackConfig(), ckpt, TEST,
                            str(tmp_path), CPU, resume="continue")
    assert state.fingerprint["args"]["--baseline-input"] == "raw"


def test_settings_that_do_not_change_results_may_differ(tmp_path):
    ckpt = started(tmp_path, EvalConfig(), AttackConfig(attack_batch=8))
    open_eval_state(EvalConfig(workers=1, data_root="elsewhere"), AttackConfig(attack_batch=2),
                    ckpt, TEST, str(tmp_path), CPU, resume="continue")
    with pytest.raises(UsageError, match=r"it had --iterations 20 \(now 3\)"):
        open_eval_state(EvalConfig(), AttackConfig(iterations=3), ckpt, TEST, str(tmp_path),
                        CPU, resume="continue")


def test_training_resume_checks_the_same_settings(tmp_path):
    ckpt = started(tmp_path, EvalConfig(L=10, normalize=True), AttackConfig())
    path = str(tmp_path / "eval_resume.pth")
    check_arguments(path, resume_settings(EvalConfig(L=10, normalize=True), AttackConfig()),
                    ckpt)
    with pytest.raises(UsageError, match=r"it had normalize \(--not-normalize\) True"):
        check_arguments(path, resume_settings(EvalConfig(L=10, normalize=False),
                                              AttackConfig()), ckpt)
