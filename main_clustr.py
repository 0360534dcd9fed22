"""ClusTR: train a ResNet18 with the Magnet loss over per-class clusters, then attack it.

    python main_clustr.py --checkpoint expA --dataset cifar10 --L 20 \
        --pretrained-path pretrained_weights/resnet18.pt --lr 0.0001 --epochs 30
    python main_clustr.py --checkpoint expA_pgd --evaluate-ckpt expA/checkpoint.pth

This file only wires the pieces together: it parses the arguments, builds one
configuration per stage from them (``TrainConfig``, ``EvalConfig``, ``AttackConfig``) and
hands those on; nothing below it sees the parsed arguments. See README.md for the outputs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import shlex
import sys
import time

import numpy as np
import torch

from base import preemption
from base.cli import config, resume_settings
from base.device import resolve_device
from base.distributed import Dist, close_distributed, init_distributed, process_device
from base.errors import UsageError, one_line
from base.io import save_atomic, write_text_atomic
from base.progress import set_quiet
from datasets.data import balanced_subset, check_available, check_same_classes, load_dataset
from models.checkpoint import build_checkpoint, check_weights_file, load_weights
from models.resnet import ResNet18, normalization_for
from utils.attacks.batch_size import attack_batch
from utils.eval.adversarial_store import save_adversarial
from utils.eval.eval_state import check_arguments as check_eval_arguments
from utils.eval.eval_state import open_eval_state
from utils.eval.evaluation import AttackConfig, EvalConfig, evaluate_model, load_eval_inputs
from utils.eval.strong_evaluation import evaluate_strong
from utils.outputs import files, run_log
from utils.outputs.experiment_dir import ExperimentDir
from utils.outputs.model_info import write_model_info
from utils.outputs.results import EpochLog, MetricsCSV
from utils.train.clustering import check_class_sizes
from utils.train.resume import Position, RunState, read_resume
from utils.train.training import ClusTRTrainer, TrainConfig
from utils.train_setting import ignored_arguments, params_line, parse_args, run_arguments

log = logging.getLogger("clustr")


def load_data(args):
    train = load_dataset(args.dataset, args.data_root, "train", workers=args.workers)
    test = load_dataset(args.dataset, args.data_root, "test", workers=args.workers)
    check_same_classes(train.classes, test.classes, "the training classes {} and test "
                       "classes {}", "both splits need the same class folders")
    train = balanced_subset(train, args.train_subset, args.seed, flag="--train-subset")
    test = balanced_subset(test, args.test_subset, args.seed, flag="--test-subset")
    check_strong_subset(args, test)
    return train, test


def check_strong_subset(args, test) -> None:
    """``--strong-subset`` against the evaluated test images, before any work: not after
    the training and the paper's sweep have run."""
    if args.strong_subset and (args.strong or args.autoattack):
        balanced_subset(test, args.strong_subset, args.seed, flag="--strong-subset")


def build_run(args, out: ExperimentDir, device: torch.device, dist: Dist):
    """Data, network, optimiser, scheduler and trainer, every input checked; restored from
    ``resume.pth`` with ``--resume``. Nothing is written here."""
    train_set, test_set = load_data(args)
    check_class_sizes(train_set.labels, train_set.classes, args.k)
    log.info("data: %s, %d training and %d test images, %d classes", args.dataset,
             len(train_set), len(test_set), train_set.num_classes)
    model = ResNet18(train_set.num_classes, *normalization_for(args.dataset))
    run_args = run_arguments(args)
    resume = read_resume(out.file(files.RESUME), run_args, args.epochs) if args.resume else None
    if resume is not None and resume["epoch"] >= args.epochs:  # its evaluation goes on
        check_eval_arguments(out.file(files.EVAL_RESUME), resume_settings(
            config(EvalConfig, args, normalize=not args.not_normalize),
            config(AttackConfig, args)), out.file(files.CHECKPOINT))
    if resume is None and args.pretrained_path:
        load_weights(model, args.pretrained_path)
    elif resume is None:
        log.warning("no --pretrained-path: ClusTR starts from random weights")
    model.to(device, memory_format=torch.channels_last)
    cfg = config(TrainConfig, args, K=args.k, normalize=not args.not_normalize)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if not cfg.milestones:
        log.info("no --milestones: the learning rate stays %g", cfg.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, gamma=0.1)
    trainer = ClusTRTrainer(model, optimizer, train_set, test_set, cfg, device, dist)
    trainer.check_batch_shape()
    state = RunState(out.file(files.RESUME), run_args, model, optimizer, scheduler, trainer)
    if resume is not None:
        return state, state.restore(resume)
    try:
        trainer.first_clusters()
    except FloatingPointError as exc:
        raise UsageError(f"before training: {exc} (check --pretrained-path)") from exc
    return state, Position()


def train(args, out: ExperimentDir, device: torch.device, dist: Dist) -> str:
    """Train ClusTR, or continue an interrupted run, and return the last checkpoint's path.
    Under torchrun every process trains; only the main one writes."""
    with preemption.immediate():  # loading and first clustering: a signal stops at once
        state, start = build_run(args, out, device, dist)
    epoch_log, metrics_csv = open_outputs(args, out, state, start, dist)
    extra = {"args": run_arguments(args), "dataset": args.dataset,
             "classes": list(state.trainer.train.classes)}
    ckpt_path = out.file(files.CHECKPOINT)
    log_batches(args, state.trainer, dist)
    first = time.time()
    for epoch in range(start.epoch + 1, args.epochs + 1):
        begin = time.time()
        lr = state.optimizer.param_groups[0]["lr"]
        resumed = start if epoch == start.epoch + 1 else Position(epoch - 1)
        state.trainer.after_step = stop_or_save(state, args.checkpoint_every, epoch, dist)
        metrics = run_epoch(state.trainer, epoch, resumed, ckpt_path)
        state.scheduler.step()
        if dist.is_main:
            epoch_log.append(epoch, lr, metrics.train_loss, metrics.train_acc,
                             metrics.test_loss, metrics.test_acc)
            metrics_csv.append(epoch, lr, metrics, time.time() - begin)
            save_checkpoint(state, epoch, metrics.test_acc, extra, out, args.save_all)
        state.save(Position(epoch))
        log.info("epoch %d/%d  lr %.2g  train loss %.4f acc %.2f%%  test loss %.4f acc %.2f%%  "
                 "(%.0fs; about %.0f min left)", epoch, args.epochs, lr, metrics.train_loss,
                 metrics.train_acc, metrics.test_loss, metrics.test_acc, time.time() - begin,
                 (time.time() - first) / (epoch - start.epoch) / 60 * (args.epochs - epoch))
        preemption.point(f"train-epoch-{epoch}", dist.rank)
        if preemption.should_stop(dist):
            raise preemption.stop(f"after epoch {epoch}")
    return ckpt_path


def open_outputs(args, out: ExperimentDir, state: RunState, start: Position, dist: Dist):
    """Once every process has checked its inputs: the experiment directory prepared, the
    first resume state, run.log and the arguments. Returns the epoch log and the metrics
    table, which keep a resumed run's completed epochs."""
    kept = start.epoch if args.resume else None
    epoch_log = EpochLog(out.file(files.LOG), keep_epochs=kept)
    metrics_csv = MetricsCSV(out.file(files.METRICS), keep_epochs=kept)
    # every input is checked on every process: from here on the experiment directory changes
    dist.barrier()
    if dist.is_main:
        out.prepare(evaluate_only=False, overwrite=args.overwrite,
                    inputs=[args.pretrained_path])
    if not args.resume:
        state.save(start)  # from the first result on, --resume has a state to continue from
    if dist.is_main:
        record_arguments(args, out)
        epoch_log.flush()
    return epoch_log, metrics_csv


def record_arguments(args, out: ExperimentDir) -> None:
    """run.log from here on, and the run's arguments: params.txt (the original's) and
    args.json."""
    run_log.attach(out.path)
    write_text_atomic(out.file(files.PARAMS), params_line(args) + "\n")
    run_log.write_args_json(out.path, run_arguments(args))


def log_batches(args, trainer: ClusTRTrainer, dist: Dist) -> None:
    """The epoch's steps and batch shape, which the clusters' sizes may cut."""
    most = int(torch.bincount(trainer.clusters.assignments.cpu()).max())  # a cluster's size
    log.info("%d steps of %d x %d examples per epoch%s", trainer.steps_per_epoch(), args.m,
             min(args.d, most), f" (--d {args.d}: no cluster holds more than {most} now)"
             if args.d > most else "")
    if dist.enabled:
        log.info("%d processes: effective batch %d x %d x %d = %d examples per step (the "
                 "learning rate is not rescaled)", dist.world_size, dist.world_size, args.m,
                 args.d, dist.world_size * args.m * args.d)


def save_checkpoint(state: RunState, epoch: int, test_acc: float, extra: dict,
                    out: ExperimentDir, save_all: bool) -> None:
    """``checkpoint.pth`` after epoch ``epoch`` (1-based), and with --save-all a copy of
    its own. The original's checkpoints count epochs from 0 (its log.txt rows from 1)."""
    trainer = state.trainer
    ckpt = build_checkpoint(state.model, trainer.head(), trainer.cfg.K, epoch - 1, test_acc,
                            extra, assignments=trainer.clusters.assignments)
    save_atomic(ckpt, out.file(files.CHECKPOINT))
    if save_all:
        save_atomic(ckpt, out.file(files.EPOCH_CHECKPOINT.format(epoch=epoch - 1)))


def stop_or_save(state: RunState, every: int, epoch: int, dist: Dist):
    """The trainer's ``after_step``: the resume save every ``every`` steps of epoch ``epoch``
    (``--checkpoint-every``; its last step is saved after the epoch) and, when a signal
    asked to stop, a save of this step's position and the stop."""
    steps = state.trainer.steps_per_epoch()

    def after_step(done: int, totals) -> None:  # totals(): the running sums (a collective)
        if every > 0 and done % every == 0 and done < steps:
            state.save(Position(epoch - 1, done, totals()))
        preemption.point(f"train-step-{epoch}-{done}", dist.rank)
        if done < steps and preemption.should_stop(dist):  # the last step: after the epoch
            state.save(Position(epoch - 1, done, totals()))
            raise preemption.stop(f"in epoch {epoch} after step {done}")

    return after_step


def run_epoch(trainer: ClusTRTrainer, epoch: int, start: Position, ckpt_path: str):
    """One epoch; a non-finite loss or a failed cluster refresh stops the run with one line
    naming the epoch and step, before anything of this epoch is written."""
    kept = (f"the last good checkpoint is kept ({ckpt_path}, epoch {epoch - 1})" if epoch > 1
            else "no epoch finished, so there is no checkpoint yet")
    try:
        return trainer.run_epoch(start.step, start.totals)
    except FloatingPointError as exc:
        raise UsageError(f"training stopped in epoch {epoch}: {exc}; {kept}: lower --lr or "
                         f"check the data") from exc
    except UsageError as exc:  # e.g. the epoch's k-means left a cluster too small
        raise UsageError(f"training stopped in epoch {epoch}: {exc}; {kept}") from exc


def run(args) -> int:
    """Under torchrun each process joins the group and runs this same code (the same checks,
    so a bad input fails every process alike); plain python is a world of one."""
    device = process_device(resolve_device(args.device))
    dist = init_distributed(device, args.dist_timeout)
    try:  # one run at a time in the directory, from its check to the end
        with ExperimentDir(args.checkpoint).locked(dist.is_main):
            return run_process(args, device, dist)
    finally:
        close_distributed(dist)


def run_process(args, device: torch.device, dist: Dist) -> int:
    if not dist.is_main:  # one voice: the main process logs and shows progress
        logging.getLogger().setLevel(logging.WARNING)
    set_quiet(args.quiet or not dist.is_main)
    for warning in ignored_arguments(args):
        log.warning(warning)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    out = ExperimentDir(args.checkpoint)
    evaluate_only = args.evaluate_ckpt is not None
    out.check(evaluate_only, args.resume, args.overwrite)  # before anything is read or written
    if not evaluate_only and args.pretrained_path and not args.resume:
        check_weights_file(args.pretrained_path)
    check_available(args.dataset, args.data_root, ("test",) if evaluate_only else
                    ("train", "test"))
    normalize = None if args.not_normalize is None else not args.not_normalize
    eval_cfg = config(EvalConfig, args, normalize=normalize)
    attack = config(AttackConfig, args)
    if not evaluate_only:
        ckpt_path = train(args, out, device, dist)
        dist.barrier()  # the main process has written the checkpoint
        evaluate_checkpoint(eval_cfg, attack, ckpt_path, out.path, device, dist, args.resume)
        return 0
    with preemption.immediate():  # nothing to save yet: a signal stops at once
        model, test = load_eval_inputs(eval_cfg, args.evaluate_ckpt)
    check_strong_subset(args, test)
    state = open_eval_state(eval_cfg, attack, args.evaluate_ckpt, test, out.path, device, dist,
                            "continue" if args.resume else None)
    dist.barrier()  # every process checked its inputs before anything is written
    if dist.is_main:
        out.prepare(evaluate_only=True, overwrite=args.overwrite, inputs=[args.evaluate_ckpt])
        record_arguments(args, out)
    evaluate(model, test, attack, out.path, device, about(args.evaluate_ckpt, eval_cfg), dist,
             state)
    return 0


def evaluate_checkpoint(eval_cfg: EvalConfig, attack: AttackConfig, ckpt_path: str,
                        out_dir: str, device: torch.device, dist: Dist,
                        resume: bool = False) -> None:
    """Rebuild a fresh model from the saved file (what was trained is never what gets
    evaluated) and evaluate it; with ``resume``, from where its evaluation stopped (an
    evaluation of an older checkpoint starts afresh)."""
    model, test = load_eval_inputs(eval_cfg, ckpt_path)
    state = open_eval_state(eval_cfg, attack, ckpt_path, test, out_dir, device, dist,
                            "unless-retrained" if resume else None)
    evaluate(model, test, attack, out_dir, device, about(ckpt_path, eval_cfg), dist, state)


def about(ckpt_path: str, eval_cfg: EvalConfig) -> dict:
    """What the evaluation summary names first: the checkpoint and the data set."""
    return {"checkpoint": os.path.abspath(ckpt_path), "dataset": eval_cfg.dataset}


def evaluate(model, test, attack: AttackConfig, out_dir: str, device: torch.device,
             about: dict, dist: Dist, state=None) -> None:
    """The paper's PGD sweep, then (on the main process) the strong evaluation, on the same
    test images; ``state`` (``utils.eval.eval_state``) keeps the progress for --resume. The
    attack batch is settled once, for all of them."""
    attack = dataclasses.replace(attack, attack_batch=attack_batch(attack.attack_batch, model,
                                                                   device, len(test)))
    paper = evaluate_model(model, test, attack, out_dir, device, about, dist, state)
    if (attack.strong or attack.autoattack) and dist.is_main:
        evaluate_strong(model, test, paper, attack, out_dir, device, state)
        if attack.autoattack:  # the RobustBench-style card, from the files just written
            log.info("wrote %s", write_model_info(out_dir, about["checkpoint"]))
    elif attack.save_adv and dist.is_main:
        save_adversarial(os.path.join(out_dir, files.ADVERSARIAL), model, test, paper,
                         batch=attack.test_batch, device=device)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    command = list(sys.argv[1:] if argv is None else map(str, argv))
    handler = run_log.start()
    preemption.install()
    try:
        return run(args)
    except UsageError as exc:
        return final_line(handler, f"error: {one_line(exc)}", 2)
    except OSError as exc:  # disk full, permission denied, ...: one line, not a traceback
        return final_line(handler, f"error: {one_line(exc)}", 1)
    except (preemption.Preempted, KeyboardInterrupt) as exc:
        status = exc.exit_status if isinstance(exc, preemption.Preempted) else 130
        return final_line(handler, how_to_continue(args, command, exc), status)
    finally:
        preemption.uninstall()
        run_log.stop(handler)


def how_to_continue(args, command: list[str], exc: BaseException) -> str:
    """The one line a stopped run prints: what stopped it and how to go on."""
    what = str(exc) if isinstance(exc, preemption.Preempted) else "interrupted"
    saved = [p for p in (os.path.join(args.checkpoint, n)
                         for n in (files.RESUME, files.EVAL_RESUME)) if os.path.isfile(p)]
    if not saved:
        return f"{what}: nothing was saved yet; run the command again"
    latest = max(saved, key=os.path.getmtime)  # the stage that was running
    # --overwrite would throw away what was saved (and the parser refuses it with --resume)
    again = shlex.join([a for a in command if a not in ("--resume", "--overwrite")] +
                       ["--resume"])
    return (f"{what}: state saved in {latest}; continue with the same command and --resume: "
            f"python main_clustr.py {again}")


def final_line(handler, line: str, status: int) -> int:
    """Print the run's last line on stderr and append it to run.log (when it is open)."""
    print(line, file=sys.stderr)
    handler.write_line(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
