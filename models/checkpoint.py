"""The checkpoint format (the original's keys and this project's extras) and weight copying.

A checkpoint is a dict with at least the original's keys (``ORIGINAL_KEYS``: the ResNet18's
``state_dict`` with the original's key names, the cluster state, K, L, ...); this project
adds plain-typed extras (``PROJECT_KEYS``) that the original ignores.
"""
from __future__ import annotations

import os

import torch

from base.errors import UsageError
from base.io import load_checkpoint
from models.cluster_head import ClusterHead
from models.resnet import EMBEDDING_DIM, ResNet18, normalization_for

FORMAT = "clustr-reference-1"
ORIGINAL_KEYS = ("state_dict", "epoch", "test_acc", "cluster_centers", "cluster_classes",
                 "variance", "K", "L", "normalize_probs")  # what the original code writes
PROJECT_KEYS = ("format", "cluster_sizes", "args", "dataset", "classes")  # what this adds
CLUSTER_KEYS = ("cluster_centers", "cluster_classes", "variance", "K")
WRAPPER_KEYS = ("state_dict", "net", "model")
PREFIXES = ("module.", "model.")


def extract_state_dict(obj: dict) -> dict:
    """The weights inside ``obj``: unwrap ``state_dict``/``net``/``model``, drop prefixes."""
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def check_weights_file(path: str) -> None:
    """Refuse a ``--pretrained-path`` that does not exist, saying how to make one."""
    if not os.path.exists(path):
        raise UsageError(f"--pretrained-path {path}: no such file; make the stand-in offline "
                         f"in seconds with `python -m pretrained_weights.from_autoattack` "
                         f"(writes pretrained_weights/resnet18.pt), or pretrain one with "
                         f"`python -m utils.train.pretrain`; see pretrained_weights/README.md")


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Copy the weights in ``path`` into ``model`` by name, strictly (``copy_weights``)."""
    check_weights_file(path)
    sd = extract_state_dict(load_checkpoint(path))
    if not sd:
        raise UsageError(f"{path} holds no tensors: not a weight file")
    copy_weights(model, sd, path)


def copy_weights(model: torch.nn.Module, sd: dict, source: str) -> None:
    """``model.load_state_dict(sd, strict=True)``, refusing in one line weights with NaN/inf
    and listing missing, unexpected and mis-shaped keys together."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UsageError(f"{source} holds non-finite values (NaN or inf) in "
                         f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}: not usable "
                         f"weights")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected),
                           ("mis-shaped (file vs model)", shapes)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{name}: {', '.join(keys[:5])}{more}")
        raise UsageError(f"{source} does not match the {type(model).__name__} of this project "
                         f"({'; '.join(parts)})")
    model.load_state_dict(sd, strict=True)


def has_clusters(ckpt: dict) -> bool:
    """True for a ClusTR checkpoint; False for a plain classifier; error for a mix."""
    present = [k for k in CLUSTER_KEYS if k in ckpt]
    if present and len(present) < len(CLUSTER_KEYS):
        missing = [k for k in CLUSTER_KEYS if k not in ckpt]
        raise UsageError(f"checkpoint has {', '.join(present)} but lacks {', '.join(missing)}: "
                         f"not a complete ClusTR checkpoint")
    return bool(present)


def build_checkpoint(backbone: ResNet18, head: ClusterHead, K: int, epoch: int,
                     test_acc: float, extra: dict | None = None,
                     assignments: torch.Tensor | None = None) -> dict:
    """The checkpoint dict: the original's keys first, this project's extras after;
    ``assignments`` (N,), the last refresh's clusters, stored as ``cluster_sizes`` (C*K,)."""
    ckpt = {
        "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        "epoch": int(epoch),
        "test_acc": float(test_acc),
        "cluster_centers": head.centers.detach().cpu().clone(),
        "cluster_classes": head.classes.detach().cpu().clone(),
        "variance": head.variance.detach().cpu().clone(),
        "K": int(K),
        "L": int(head.L),
        "normalize_probs": bool(head.normalize),
        "format": FORMAT,
    }
    if assignments is not None:
        ckpt["cluster_sizes"] = torch.bincount(assignments.detach().cpu(),
                                               minlength=head.num_clusters)
    ckpt.update(extra or {})
    return ckpt


def cluster_parts(ckpt: dict, dataset: str | None = None, L: int | None = None,
                  normalize: bool | None = None
                  ) -> tuple[ResNet18, ClusterHead, list[str] | None]:
    """The backbone (eval mode), the cluster head and the class names of a ClusTR checkpoint,
    every value checked; explicit ``L``/``normalize`` win over the file's. ``ClusterClassifier``
    is built from them in ``models.classifier``."""
    if not has_clusters(ckpt):
        raise UsageError("checkpoint lacks the cluster keys "
                         f"({', '.join(CLUSTER_KEYS)}): not a ClusTR checkpoint")
    backbone = backbone_from_state(ckpt, dataset)
    try:
        classes = torch.as_tensor(ckpt["cluster_classes"]).long().reshape(-1)
        centers = torch.as_tensor(ckpt["cluster_centers"]).float()
        variance = torch.as_tensor(ckpt["variance"]).float().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"checkpoint cluster state is not numeric tensors: {exc}") from exc
    if centers.dim() != 2 or centers.shape[1] != EMBEDDING_DIM or len(centers) == 0 or \
            len(classes) != len(centers) or len(variance) not in (1, len(centers)):
        raise UsageError(f"inconsistent cluster state: centers {tuple(centers.shape)} (need "
                         f"(C*K, {EMBEDDING_DIM})), classes {tuple(classes.shape)}, variance "
                         f"{tuple(variance.shape)}")
    if not (torch.isfinite(centers).all() and torch.isfinite(variance).all()
            and (variance > 0).all() and (classes >= 0).all()):
        raise UsageError("checkpoint cluster state holds NaN/inf, a non-positive variance or a "
                         "negative class: not usable")
    num_classes = max(int(classes.max()) + 1, backbone.linear.out_features)
    head = ClusterHead(centers, classes, variance.expand(len(centers)), num_classes,
                       L=stored_L(ckpt, len(centers)) if L is None else L,
                       normalize=stored_normalize(ckpt) if normalize is None else normalize)
    names = ckpt.get("classes")
    names = [str(n) for n in names] if isinstance(names, (list, tuple)) else None
    return backbone, head, names


def stored_L(ckpt: dict, num_clusters: int) -> int:
    """The checkpoint's L (10, the original's default, when not recorded), checked as the
    flag ``--L`` is: a whole number from 1 to the number of clusters."""
    if "L" not in ckpt:
        return 10
    value = ckpt["L"]
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_clusters:
        raise UsageError(f"the checkpoint's L {str(value)[:40]!r} is not a whole number from 1 "
                         f"to its {num_clusters} clusters (main_clustr.py --evaluate-ckpt "
                         f"takes --L N instead)")
    return value


def stored_normalize(ckpt: dict) -> bool:
    """The checkpoint's ``normalize_probs`` (True when not recorded): a bool, as the flag."""
    value = ckpt.get("normalize_probs", True)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if value not in (True, False) or isinstance(value, float):
        raise UsageError(f"the checkpoint's normalize_probs {str(value)[:40]!r} is not True or "
                         f"False: a damaged checkpoint, or one of other code")
    return bool(value)


def backbone_from_state(ckpt: dict, dataset: str | None = None) -> ResNet18:
    """A ResNet18 with the checkpoint's weights and the data set's input normalisation."""
    sd = extract_state_dict(ckpt)
    if "linear.weight" not in sd:
        raise UsageError("checkpoint has no ResNet18 weights (no linear.weight)")
    dataset = ckpt.get("dataset", dataset) if dataset is None else dataset
    backbone = ResNet18(sd["linear.weight"].shape[0], *normalization_for(dataset or "cifar10"))
    copy_weights(backbone, sd, "checkpoint")
    return backbone.eval()
