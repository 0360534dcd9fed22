"""What is in a ClusTR checkpoint, without writing Python.

    python -m utils.inspect_ckpt PATH

The file is read with ``weights_only=True`` and rebuilt into the same ClusterClassifier the
evaluation uses, so a checkpoint that prints here also loads. Anything else, a plain ResNet18
state_dict included (the line says so), gets one line on stderr and exit status 2, so that
scripts can tell ClusTR checkpoints from anything else.
"""
from __future__ import annotations

import os
import sys

import torch

from base.cli import ArgParser
from base.errors import UsageError
from base.io import load_checkpoint
from models.checkpoint import (
    CLUSTER_KEYS,
    FORMAT,
    ORIGINAL_KEYS,
    PROJECT_KEYS,
    backbone_from_state,
    has_clusters,
)
from models.classifier import ClusterClassifier

LABEL_WIDTH = 16
LINE_WIDTH = 100
ITEM_SEP = " | "  # separates items that a wrapped line never splits


def describe(ckpt: dict) -> list[tuple[str, str]]:
    """(label, text) rows for a ClusTR checkpoint; UsageError for anything else."""
    if not has_clusters(ckpt):  # also refuses a dict with only some of the cluster keys
        raise UsageError(not_clustr(ckpt))
    model = ClusterClassifier.from_checkpoint(ckpt)  # validates weights and cluster state
    head = model.head
    names = model.class_names or [str(c) for c in range(model.num_classes)]
    acc, args, epoch, fmt = (ckpt.get(k) for k in ("test_acc", "args", "epoch", "format"))
    if isinstance(epoch, int) and not isinstance(epoch, bool):  # both codes count from 0
        epoch = f"{epoch} (counted from 0: {epoch + 1} epoch(s) done)"
    rows = [
        ("format", "the original ClusTR code's (no 'format' key)" if fmt is None
         else f"{fmt} (this project)" if fmt == FORMAT
         else f"{fmt!r} (unknown to this version; read by the original's keys)"),
        ("epoch", "not recorded" if epoch is None else str(epoch)),
        ("test accuracy", "not recorded" if acc is None else
         f"{float(acc):.2f}% (clean, cluster classifier, when the file was saved)"),
        ("data set", str(ckpt.get("dataset", "not recorded"))),
        ("classes", f"{model.num_classes}: {', '.join(names)}" if model.class_names
         else f"{model.num_classes} (names not recorded)"),
        ("input norm.", _input_normalisation(model, "dataset" in ckpt)),
        ("clusters", f"K {ckpt['K']} per class, {head.num_clusters} in all, "
                     f"{head.centers.shape[1]}-d centroids"),
        ("inference", _inference(ckpt, head.L, head.normalize, head.num_clusters)),
        ("sigma^2", _variance(head.variance)),
        ("cluster sizes", _cluster_sizes(ckpt.get("cluster_sizes"), head.classes, names)),
        ("training args", ITEM_SEP.join(f"{k}: {v}" for k, v in args.items())
         if isinstance(args, dict) else "not recorded"),
        ("parameters", _parameters(model)),
    ]
    others = [k for k in ckpt if k not in ORIGINAL_KEYS + PROJECT_KEYS]
    if others:
        rows.append(("other keys", ", ".join(map(str, others))))
    return rows


def not_clustr(ckpt: dict) -> str:
    """The one line for a dict without cluster keys: plain ResNet18 weights, or not even."""
    try:
        backbone = backbone_from_state(ckpt)
    except UsageError:
        keys = ", ".join(map(str, list(ckpt)[:5])) + (", ..." if len(ckpt) > 5 else "")
        return (f"not a ClusTR checkpoint: no cluster keys ({', '.join(CLUSTER_KEYS)}) and no "
                f"ResNet18 weights (keys: {keys})")
    n = sum(p.numel() for p in backbone.parameters())
    return (f"not a ClusTR checkpoint (no cluster keys): a plain ResNet18 state_dict "
            f"({n:,} parameters, {backbone.linear.out_features}-way linear head), usable with "
            f"--pretrained-path, or evaluated through its linear head by --evaluate-ckpt")


def _input_normalisation(model: ClusterClassifier, recorded: bool) -> str:
    mean = ", ".join(f"{v:.4f}" for v in model.backbone.mean.flatten().tolist())
    std = ", ".join(f"{v:.4f}" for v in model.backbone.std.flatten().tolist())
    source = "from the data set" if recorded else "CIFAR's, assumed: data set not recorded"
    return f"mean ({mean}), std ({std}){ITEM_SEP}{source}"


def _inference(ckpt: dict, L: int, normalize: bool, num_clusters: int) -> str:
    stored = "" if "L" in ckpt else " (L not recorded: 10 assumed)"
    if normalize:
        return f"the L = {L} nearest of {num_clusters} clusters vote (normalize_probs True){stored}"
    return (f"all {num_clusters} clusters vote (normalize_probs False, --not-normalize); "
            f"L = {L}{stored}")


def _variance(variance: torch.Tensor) -> str:
    if bool((variance == variance[0]).all()):
        return f"{variance[0].item():.6g} (the same for all {len(variance)} clusters)"
    return (f"min {variance.min().item():.6g}, mean {variance.mean().item():.6g}, "
            f"max {variance.max().item():.6g} over {len(variance)} clusters")


def _cluster_sizes(sizes, classes: torch.Tensor, names: list[str]) -> str:
    """Training examples per cluster, grouped by class: 'cat 260+241'."""
    if sizes is None:
        return "not recorded"
    sizes = torch.as_tensor(sizes).reshape(-1).long()
    if len(sizes) != len(classes):
        return f"{sizes.tolist()} (does not match the {len(classes)} clusters)"
    groups = [f"{names[c]} {'+'.join(str(int(n)) for n in sizes[classes == c])}"
              for c in range(len(names)) if (classes == c).any()]
    return ITEM_SEP.join(groups) + f" (training examples, {int(sizes.sum())} in all)"


def _parameters(model: ClusterClassifier) -> str:
    n = sum(p.numel() for p in model.backbone.parameters())
    head = model.head
    return (f"{n:,} in the ResNet18 (its {model.backbone.linear.out_features}-way linear head "
            f"included){ITEM_SEP}cluster state: {head.num_clusters} x {head.centers.shape[1]} "
            f"centroids, {head.num_clusters} classes, {head.num_clusters} variances")


def render(path: str, rows: list[tuple[str, str]]) -> str:
    """Aligned 'label  text' lines; long texts wrap between items, under the text column."""
    size = os.path.getsize(path) / 1e6
    lines = [f"{'file':<{LABEL_WIDTH}}{path} ({size:.1f} MB)"]
    for label, text in rows:
        for i, line in enumerate(_pack(text.split(ITEM_SEP), LINE_WIDTH - LABEL_WIDTH)):
            lines.append(f"{label if i == 0 else '':<{LABEL_WIDTH}}{line}")
    return "\n".join(lines)


def _pack(items: list[str], width: int) -> list[str]:
    """Greedy lines of items joined by ITEM_SEP; an item longer than a line stands alone."""
    lines = [items[0]]
    for item in items[1:]:
        if len(lines[-1]) + len(ITEM_SEP) + len(item) <= width:
            lines[-1] += ITEM_SEP + item
        else:
            lines[-1] += ITEM_SEP.rstrip()
            lines.append(item)
    return lines


def main(argv=None) -> int:
    parser = ArgParser(
        prog="python -m utils.inspect_ckpt",
        description="Describe a ClusTR checkpoint (this project's or the original code's). "
                    "Exit status 2, with one line, for any other file.")
    parser.add_argument("path", help="checkpoint file, e.g. expA/checkpoint.pth")
    args = parser.parse_args(argv)
    try:
        rows = describe(load_checkpoint(args.path))
    except UsageError as exc:
        print(f"error: {args.path}: {exc}" if not str(exc).startswith(args.path)
              else f"error: {exc}", file=sys.stderr)
        return 2
    print(render(args.path, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
