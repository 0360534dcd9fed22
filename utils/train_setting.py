"""Every command-line argument of ``main_clustr.py``, with the original's names and defaults.

Nothing is parsed at import time: ``parse_args(argv)`` is called from ``main()``.
"""
from __future__ import annotations

import argparse

from base.cli import ArgParser, nonneg_float, nonneg_int, pos_float, pos_int, seed_int
from datasets.data import DATASETS
from utils.attacks import autoattack_backend
from utils.outputs import files
from utils.train.consistency import ATTACKS, adversary_error


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="main_clustr.py",
                description="ClusTR: Magnet-loss clustering training and PGD evaluation.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    o = p.add_argument_group("the original's arguments")
    o.add_argument("--epochs", type=pos_int, default=90, help="training epochs")
    o.add_argument("--batch-size", type=pos_int, default=256,
                   help="ignored, accepted so that the original's commands run: a Magnet "
                        "batch holds --m x --d examples")
    o.add_argument("--test-batch", type=pos_int, default=64, help="evaluation batch size")
    o.add_argument("--lr", type=pos_float, default=1e-4, help="Adam learning rate")
    o.add_argument("--dataset", default="cifar10", choices=DATASETS, help="data set")
    o.add_argument("--checkpoint", required=True, help="experiment directory for the results")
    o.add_argument("--seed", type=seed_int, default=111, help="manual seed")
    o.add_argument("--arch", default="resnet18", choices=("resnet18",),
                   help="ignored, accepted so that the original's commands run: the network "
                        "is the CIFAR ResNet18")
    o.add_argument("--evaluate-ckpt", default=None, metavar="PATH",
                   help="evaluate this checkpoint only (no training)")
    o.add_argument("--k", type=pos_int, default=2, help="clusters per class")
    o.add_argument("--d", type=pos_int, default=20, help="examples per cluster in a batch")
    o.add_argument("--m", type=pos_int, default=12, help="clusters per batch (batch = m*d)")
    o.add_argument("--L", type=pos_int, default=None,
                   help="nearest clusters used at inference (10 when training; a "
                        "checkpoint's own value when evaluating)")
    o.add_argument("--alpha", type=nonneg_float, default=12.5, help="Magnet loss margin")
    o.add_argument("--minibatch-replays", type=nonneg_int, default=0,
                   help="M of free adversarial training (0 = off)")
    o.add_argument("--milestones", type=pos_int, nargs="*", default=[30, 60],
                   help="MultiStepLR milestones (gamma 0.1)")
    o.add_argument("--consistency-lambda", type=nonneg_float, default=0.0,
                   help="lambda of the QTRADES consistency term (0 = plain ClusTR)")
    o.add_argument("--xent-lambda", type=nonneg_float, default=0.0,
                   help="weight of a cross-entropy term on the cluster scores")
    o.add_argument("--mse-consistency", action="store_true",
                   help="consistency as MSE between clean and adversarial embeddings")
    o.add_argument("--not-normalize", action="store_true", default=None,
                   help="sum over all clusters instead of the L nearest at inference")
    o.add_argument("--actual-trades", action="store_true",
                   help="consistency adversary TRADES-style (KL, 10 steps)")
    o.add_argument("--pretrained-path", default=None, help="ResNet18 weights to start from")
    o.add_argument("--save-all", action="store_true", help="keep a checkpoint every epoch")
    o.add_argument("--restarts", type=pos_int, default=10, help="PGD restarts at evaluation")
    o.add_argument("--iterations", type=pos_int, default=20,
                   help="PGD iterations at evaluation")

    n = p.add_argument_group("added by this project (defaults keep the original behaviour)")
    n.add_argument("--data-root", default="./data",
                   help="data folder (downloaded into when missing); for --dataset "
                        "imagefolder, a folder with train/<class>/ and test/<class>/")
    n.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, "
                   "cuda or cuda:N")
    n.add_argument("--workers", type=nonneg_int, default=4,
                   help="threads decoding image-folder files at load time")
    n.add_argument("--train-subset", type=pos_int, default=None, metavar="N",
                   help="seeded, class-balanced subset of N training images")
    n.add_argument("--test-subset", type=pos_int, default=None, metavar="N",
                   help="seeded, class-balanced subset of N test images")
    n.add_argument("--embed-batch", type=pos_int, default=None,
                   help="batch size of the per-epoch embedding pass over the training set "
                        "(none given: 64 on a CPU, 256 on CUDA)")
    n.add_argument("--attack-batch", type=pos_int, default=None, metavar="N",
                   help="batch of the PGD sweep, the strong attacks and AutoAttack, apart "
                        "from --test-batch (none given: 64 on a CPU; on CUDA the largest "
                        "power of two that fits the free memory, estimated then probed)")
    n.add_argument("--kmeans-seed", type=seed_int, default=1,
                   help="random_state of every per-class k-means fit (the original fixes 1)")
    n.add_argument("--kmeans-device", action="store_true",
                   help="fit the per-class k-means on the training device instead of with "
                        "scikit-learn on the host (k-means++ and Lloyd, same n_init and "
                        "max_iter, other random starts: docs/usage.md)")
    n.add_argument("--baseline-input", choices=("normalized", "raw"), default=None,
                   help="--evaluate-ckpt of a file without cluster keys: feed its network "
                        "inputs normalised with the data set's mean and std (default, as "
                        "this project's and the seed's weights expect) or raw in [0, 1] (as "
                        "the original does for a bare state_dict, e.g. TRADES models)")
    n.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the training steps (CUDA only); the "
                        "embedding passes behind the clusters, sigma^2 and the logged "
                        "accuracies, and the attacks, stay in float32")
    n.add_argument("--quiet", action="store_true", help="no progress bars")
    n.add_argument("--save-adv", action="store_true",
                   help="write adversarial.pt: per eps, the adversarial images that fooled "
                        "the model under the paper's PGD and the strongest attack run "
                        "(docs/failures.md)")
    n.add_argument("--dist-timeout", type=pos_float, default=600.0, metavar="SECONDS",
                   help="under torchrun: a collective waiting longer than this fails the job "
                        "instead of hanging")
    n.add_argument("--as-original", action="store_true",
                   help="train exactly as the original code did, restoring every row of "
                        "docs/differences.md that changes what is trained or what log.txt "
                        "reports (train-mode passes that let test images update BatchNorm, "
                        "its reported loss, its QTRADES adversary, ...); training only")
    n.add_argument("--consistency-attack", choices=ATTACKS, default="paper",
                   help="what the QTRADES (and --actual-trades) adversary and term use: "
                        "paper = the original's bounded scores, logit = KL on the "
                        "classifier's logit (docs/usage.md)")
    n.add_argument("--consistency-steps", type=pos_int, default=1, metavar="N",
                   help="QTRADES adversary: 1 = the original's one step of 10/255; N > 1 = "
                        "N steps of 2/255 (as TRADES); both from a uniform start in 8/255")
    r = p.add_argument_group("interrupted runs and existing results (see docs/failures.md)")
    r.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --checkpoint from its resume.pth, "
                        "and its evaluation (or an --evaluate-ckpt run) from eval_resume.pth "
                        "(same arguments; --epochs may grow)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the results already in --checkpoint instead of refusing")
    r.add_argument("--checkpoint-every", type=nonneg_int, default=0, metavar="N",
                   help="also save the resume state every N training steps within an epoch "
                        "(0: only at the end of each epoch)")
    g = p.add_argument_group("strong evaluation (added by this project; off by default)")
    g.add_argument("--strong", action="store_true",
                   help="also attack the proper logit with PGD-CE and PGD-DLR on the paper's "
                        "eps grid, step, --iterations and --restarts; writes "
                        f"{files.STRONG_RESULTS} and {files.DIAGNOSTICS}")
    g.add_argument("--autoattack", action="store_true",
                   help="also run AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, "
                        "Square; needs pyautoattack); its cost grows with the model's "
                        "robustness, as every attack after APGD-CE runs on the images that "
                        "survive it")
    g.add_argument("--autoattack-eps", type=pos_float, nargs="+", default=[8.0], metavar="E",
                   help="AutoAttack eps values, in units of 1/255")
    g.add_argument("--strong-subset", type=pos_int, default=None, metavar="N",
                   help="run the strong attacks on a seeded, class-balanced subset of N of "
                        "the evaluated test images; without it, all of them")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.d < 2:
        parser.error(f"--d {args.d}: the Magnet loss needs at least 2 examples per cluster")
    if args.m < 2:
        parser.error(f"--m {args.m}: a Magnet batch needs the seed cluster and at least one "
                     f"impostor")
    if len(set(args.milestones)) != len(args.milestones):
        parser.error(f"--milestones {' '.join(map(str, args.milestones))}: an epoch is listed "
                     f"twice")
    if not args.checkpoint.strip():
        parser.error("--checkpoint is empty: name the experiment directory")
    if args.resume and args.overwrite:
        parser.error("--resume continues the results in --checkpoint and --overwrite replaces "
                     "them: give one of the two")
    if args.as_original and args.evaluate_ckpt is not None:
        parser.error("--as-original changes how a model is trained, not how it is evaluated: "
                     "drop it with --evaluate-ckpt")
    error = adversary_error(args.consistency_attack, args.consistency_steps,
                            args.mse_consistency, args.actual_trades)
    if error:
        parser.error(error)
    # the strong evaluation: refused now, before any training, if it could not run
    if args.autoattack and not autoattack_backend.available():
        parser.error(autoattack_backend.HINT)
    extras = [flag for flag, given in (("--strong-subset", args.strong_subset is not None),
                                       ("--autoattack-eps", args.autoattack_eps != [8.0]))
              if given]
    if extras and not (args.strong or args.autoattack):
        parser.error(f"{' and '.join(extras)} only apply with --strong or --autoattack")
    beyond = [e for e in args.autoattack_eps if e > 255]
    if beyond:
        parser.error(f"--autoattack-eps {beyond[0]:g}: eps is in units of 1/255, so at most "
                     f"255 (the whole pixel range)")
    if args.evaluate_ckpt is None:  # training fixes L and the normalisation rule, which
        args.L = 10 if args.L is None else args.L  # its evaluation and params.txt then use
        args.not_normalize = bool(args.not_normalize)
    return args


def ignored_arguments(args: argparse.Namespace) -> list[str]:
    """One warning per accepted-but-ignored flag given a value other than its default."""
    return [f"--batch-size {args.batch_size} is ignored: a Magnet batch holds --m x --d = "
            f"{args.m * args.d} examples"] if args.batch_size != 256 else []


def run_arguments(args: argparse.Namespace) -> dict:
    """The arguments as a plain dict of JSON types (argparse makes lists, never tuples): what
    ``resume.pth``, the checkpoint and ``args.json`` record, loadable with
    ``weights_only=True``."""
    return dict(vars(args))


def params_line(args: argparse.Namespace) -> str:
    """``name: value | name: value | ...`` with every argument, as the original's params.txt."""
    return " | ".join(f"{k}: {v}" for k, v in vars(args).items())
