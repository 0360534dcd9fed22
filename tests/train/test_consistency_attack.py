"""--consistency-attack and --consistency-steps: the QTRADES adversary and term on the logit.

The same tiny trainer as test_variants.py (3 classes, K = 2, L = 6: every cluster counts);
the logit is restated here as a plain per-class log-sum-exp over its clusters.
"""
from __future__ import annotations

import pytest
import torch

from base.errors import UsageError
from tests.train.test_variants import a_batch, make_trainer
from utils.train.consistency import (
    PGD_STEP,
    QTRADES_STEP,
    class_probabilities,
)
from utils.train.consistency import RADIUS as EPS


def plain_logits(head, emb: torch.Tensor) -> torch.Tensor:
    """Per class c: log sum over c's clusters of exp(-||e - mu||^2 / 2 sigma^2), (N, C)."""
    out = torch.empty(len(emb), head.num_classes)
    for c in range(head.num_classes):
        mine = head.classes == c
        d2 = ((emb[:, None, :] - head.centers[mine][None]) ** 2).sum(2)
        out[:, c] = torch.logsumexp(-d2 / (2 * head.variance[mine]), 1)
    return out


def plain_kl(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum_c p_c (log p_c - log softmax(logits)_c), per example, with 0 log 0 = 0."""
    return (torch.special.xlogy(p, p) - p * torch.log_softmax(logits, 1)).sum(1)


def same_start(trainer) -> torch.Generator:
    return torch.Generator().set_state(trainer.generator.get_state())


def uniform_start(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    u = torch.empty(x.shape).uniform_(-EPS, EPS, generator=gen)
    return (x + u).clamp(0, 1)


@pytest.mark.parametrize("steps", [1, 5])
def test_logit_adversary_raises_the_kl_in_ball_and_range_without_parameter_gradients(steps):
    trainer = make_trainer(consistency_lambda=1.0, consistency_attack="logit",
                           consistency_steps=steps)
    model = trainer.model.train()
    x, _, head = a_batch(trainer)
    head.variance.mul_(1000)  # out of float32 saturation, where the KL and its gradient are 0
    emb = model(x)
    gen = same_start(trainer)
    x_adv = trainer.extras.adversary(model, head, x, emb, trainer.generator)
    assert model.training  # the caller's mode is restored
    assert all(p.grad is None for p in model.parameters())
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    p = plain_logits(head, emb.detach()).softmax(1)
    with torch.no_grad():
        model.eval()  # the adversary's mode
        kl_start = plain_kl(p, plain_logits(head, model(uniform_start(x, gen))))
        kl_adv = plain_kl(p, plain_logits(head, model(x_adv)))
    assert kl_adv.sum() > kl_start.sum()
    assert (kl_adv > kl_start).float().mean() >= 0.9


def test_logit_term_is_lambda_times_the_mean_kl_on_the_logit():
    lam = 3.0
    trainer = make_trainer(consistency_lambda=lam, consistency_attack="logit")
    model = trainer.model.eval()  # deterministic forwards for the comparison
    x, ids, head = a_batch(trainer)
    head.variance.mul_(1000)
    emb = model(x)
    x_adv = trainer.extras.adversary(model, head, x, emb, same_start(trainer))
    terms = trainer.extras.terms(model, head, x, emb, head.classes[ids], trainer.generator)
    p = plain_logits(head, emb.detach()).softmax(1)
    expected = lam * plain_kl(p, plain_logits(head, model(x_adv))).mean()
    assert torch.allclose(terms["consistency"], expected, rtol=1e-4, atol=1e-6)
    terms["consistency"].backward()  # the term has a gradient for the weights
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def original_qtrades_adversary(model, head, x, p, gen, step, steps):
    """The paper attack restated: a uniform start in the ball, then ``steps`` signed steps on
    CE(p, softmax(paper scores)), each projected to the ball and [0, 1]."""
    x_adv = uniform_start(x, gen)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        ce = -(p * torch.log_softmax(head.paper_scores(model(x_adv)), 1)).sum()
        grad, = torch.autograd.grad(ce, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - EPS), x + EPS)
        x_adv = x_adv.clamp(0, 1)
    return x_adv


@pytest.mark.parametrize("steps, step", [(1, QTRADES_STEP), (3, PGD_STEP)])
def test_paper_attack_is_the_original_adversary_one_step_or_pgd(steps, step):
    trainer = make_trainer(consistency_lambda=1.0, consistency_attack="paper",
                           consistency_steps=steps)
    model = trainer.model.eval()
    x, _, head = a_batch(trainer)
    emb = model(x).detach() * 0.01  # near the clusters: the paper scores have a gradient
    head.centers.mul_(0.01)
    head.variance.mul_(0.01 ** 2)
    gen = same_start(trainer)
    ours = trainer.extras.adversary(model, head, x, emb, trainer.generator)
    theirs = original_qtrades_adversary(model, head, x, class_probabilities(head, emb), gen,
                                        step, steps)
    assert (ours - uniform_start(x, same_start(trainer))).abs().max() > 0  # it stepped
    assert (ours - theirs).abs().max() < 1e-6


def test_paper_with_one_step_trains_exactly_as_the_default():
    """--consistency-attack paper --consistency-steps 1 is the run without the flags."""
    default = make_trainer(consistency_lambda=8.0)
    explicit = make_trainer(consistency_lambda=8.0, consistency_attack="paper",
                            consistency_steps=1)
    assert default.train_epoch() == explicit.train_epoch()
    for a, b in zip(default.model.parameters(), explicit.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", [dict(consistency_attack="logit"),
                                     dict(consistency_attack="logit", consistency_steps=3),
                                     dict(consistency_attack="logit", actual_trades=True)])
def test_logit_variants_run_a_real_epoch(variant):
    trainer = make_trainer(consistency_lambda=4.0, **variant)
    components = trainer.train_epoch()
    assert set(components) == {"magnet", "consistency"}
    assert components["consistency"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in components.values())


def test_bad_adversary_values_are_refused():
    from utils.train_setting import parse_args

    with pytest.raises(UsageError, match="--consistency-attack"):
        make_trainer(consistency_attack="cross-entropy")
    with pytest.raises(UsageError, match="--consistency-steps 0"):
        make_trainer(consistency_steps=0)
    with pytest.raises(UsageError, match="--mse-consistency"):
        make_trainer(consistency_lambda=1.0, consistency_attack="logit", mse_consistency=True)
    base = ["--checkpoint", "x"]
    for bad in (["--consistency-steps", "0"], ["--consistency-attack", "cross-entropy"],
                ["--consistency-attack", "logit", "--mse-consistency"],
                ["--consistency-steps", "3", "--actual-trades"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(base + bad)
        assert exc.value.code == 2
    args = parse_args(base)
    assert (args.consistency_attack, args.consistency_steps) == ("paper", 1)


def test_resume_refuses_another_consistency_attack(tmp_path):
    from utils.train.resume import FORMAT, REQUIRED, read_resume
    from utils.train_setting import parse_args, run_arguments

    saved = run_arguments(parse_args(["--checkpoint", "x", "--consistency-attack", "logit"]))
    path = tmp_path / "resume.pth"
    torch.save({**{k: {} for k in REQUIRED}, "format": FORMAT, "epoch": 1, "args": saved},
               path)
    assert read_resume(str(path), saved, 2)["epoch"] == 1
    now = run_arguments(parse_args(["--checkpoint", "x"]))
    with pytest.raises(UsageError, match="--consistency-attack 'logit'"):
        read_resume(str(path), now, 2)
    now = run_arguments(parse_args(["--checkpoint", "x", "--consistency-attack", "logit",
                                    "--consistency-steps", "2"]))
    with pytest.raises(UsageError, match="--consistency-steps 1"):
        read_resume(str(path), now, 2)


def test_the_flags_are_recorded_with_the_run(tmp_path):
    """params.txt and args.json write every parsed argument, these two included."""
    import json

    from utils.outputs.run_log import write_args_json
    from utils.train_setting import params_line, parse_args, run_arguments

    args = parse_args(["--checkpoint", "x", "--consistency-lambda", "2",
                       "--consistency-attack", "logit", "--consistency-steps", "2"])
    assert "consistency_attack: logit | consistency_steps: 2" in params_line(args)
    write_args_json(str(tmp_path), run_arguments(args))
    saved = json.loads((tmp_path / "args.json").read_text())
    assert saved["consistency_attack"] == "logit" and saved["consistency_steps"] == 2
