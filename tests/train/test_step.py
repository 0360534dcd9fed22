"""The training step: one wait for the device per step, after the backward and before the
update; loss terms summed on the device; batches built from the training set on the device.

Each test compares with the straightforward version on the same draws (CPU).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import utils.train.training as training
from base.tensors import to_device
from datasets.data import augment
from tests.train.test_variants import make_trainer


def test_a_non_finite_loss_never_reaches_the_weights(monkeypatch):
    """A NaN loss at step 2: the backward has run (the gradients hold the NaN), but the
    weights and the optimiser's state are those after step 1 (BatchNorm's running
    statistics move with the forward pass, as they always did, and the run stops)."""
    trainer = make_trainer()
    assert trainer.steps_per_epoch() == 2
    real, calls, after_one = training.magnet_loss, {"n": 0}, {}

    def nan_at_call_2(*args, **kwargs):
        calls["n"] += 1
        per_example, other = real(*args, **kwargs)
        return (per_example * float("nan") if calls["n"] == 2 else per_example), other

    def snapshot(done, totals):
        after_one["model"] = copy.deepcopy(dict(trainer.model.named_parameters()))
        after_one["optim"] = copy.deepcopy(trainer.optimizer.state_dict())

    monkeypatch.setattr(training, "magnet_loss", nan_at_call_2)
    trainer.after_step = snapshot
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2"):
        trainer.train_epoch()
    assert calls["n"] == 2
    for name, value in trainer.model.named_parameters():
        assert torch.equal(value, after_one["model"][name]), name
    state = trainer.optimizer.state_dict()["state"]
    for i, saved in after_one["optim"]["state"].items():
        for key, value in saved.items():
            assert torch.equal(state[i][key], value), (i, key)
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and not all(torch.isfinite(g).all() for g in grads)  # backward ran


def test_loss_terms_summed_on_the_device_match_the_per_step_values(monkeypatch):
    """The epoch's mean Magnet loss equals the float sum of each step's value read at
    once, as the loop did with .item() per step: the same float64 sum, in the same order."""
    trainer = make_trainer(xent_lambda=0.5)
    real, seen = training.magnet_loss, []

    def record(*args, **kwargs):
        per_example, other = real(*args, **kwargs)
        seen.append(per_example.mean().item())
        return per_example, other

    monkeypatch.setattr(training, "magnet_loss", record)
    running = []
    trainer.after_step = lambda done, totals: running.append(totals())
    components = trainer.train_epoch()
    steps = trainer.steps_per_epoch()
    assert len(seen) == steps and set(components) == {"magnet", "xent"}
    assert components["magnet"] == sum(seen) / steps
    assert running[0]["magnet"] == seen[0] and running[-1]["magnet"] == sum(seen)
    assert all(math.isfinite(v) for v in components.values())


def test_batches_from_the_stored_training_set_are_the_old_ones():
    """``batch_images`` (the uint8 set kept on the device, augmented there) against the old
    path (index and augment on the CPU, then copy), from generators in the same state:
    the same floats bit for bit, and the generator advanced alike."""
    trainer = make_trainer()
    stored = trainer.device_images()
    assert stored.dtype == torch.uint8 and stored.device == trainer.device
    assert stored.data_ptr() == trainer.train.images.data_ptr()  # no copy on a CPU
    old_gen = torch.Generator()
    for _ in range(3):
        indices, _ = trainer.sampler.sample(trainer.generator)
        old_gen.set_state(trainer.generator.get_state())
        new = trainer.batch_images(indices)
        old = to_device(augment(trainer.train.images[indices], trainer.cfg.dataset, old_gen),
                        trainer.device)
        assert torch.equal(new, old)
        assert new.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(old_gen.get_state(), trainer.generator.get_state())


def test_with_amp_the_embedding_passes_stay_float32(monkeypatch):
    """--amp speeds up the training steps only: the passes behind k-means, sigma^2 and the
    logged accuracies run without autocast, as the evaluation's re-embedding does."""
    seen = []
    real = training.compute_embeddings_split

    def record(*args, amp=False, **kwargs):
        seen.append(amp)
        return real(*args, amp=amp, **kwargs)

    monkeypatch.setattr(training, "compute_embeddings_split", record)
    trainer = make_trainer(amp=True)
    trainer.run_epoch()
    assert seen and not any(seen)  # the initial refresh, the epoch's refresh, the test pass
    assert len(seen) == 3
