"""Checkpoint files: safe loading, atomic saving, and the original's format.

A checkpoint is a dict with at least the original's keys: ``state_dict`` (the ResNet18 only,
original key names), ``epoch``, ``test_acc``, ``cluster_centers`` (C*K, 512),
``cluster_classes`` (C*K,), ``variance`` (C*K,), ``K``, ``L`` and ``normalize_probs``. This
project adds plain-typed extras (``args``, ``dataset``, ``classes``, ``format``) that the
original ignores. Everything is loaded with ``weights_only=True``: no arbitrary unpickling.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile

import torch

from models.classifier import ClusterClassifier
from models.cluster_head import ClusterHead
from models.resnet import ResNet18, normalization_for
from utils.errors import UsageError

FORMAT = "clustr-reference-1"
CLUSTER_KEYS = ("cluster_centers", "cluster_classes", "variance", "K")
WRAPPER_KEYS = ("state_dict", "net", "model")
PREFIXES = ("module.", "model.")


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)``, with a one-line error for every failure."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise UsageError(f"{path} is not a readable PyTorch file: {_one_line(exc)}") from exc
        raise UsageError(f"{path} holds Python objects that are not tensors or plain "
                         f"containers, and arbitrary unpickling is refused for safety "
                         f"(weights_only=True): {_one_line(exc)}") from exc
    except Exception as exc:  # a truncated zip, an empty or foreign file: many error types
        raise UsageError(f"{path} is not a readable PyTorch file (truncated or corrupt?): "
                         f"{_one_line(exc)}") from exc
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def _one_line(exc: BaseException) -> str:
    """The informative part of a loader's message, as one short line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    refused = re.search(r"Unsupported global: GLOBAL \S+", text)
    if refused:
        return refused.group(0)
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(exc).__name__}: {first[:160]}" if first else type(exc).__name__


def save_atomic(obj, path: str) -> None:
    """Write ``obj`` with ``torch.save`` to a temporary file, then move it into place."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def write_text_atomic(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


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


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Copy the weights in ``path`` into ``model`` by name, strictly, with a shape check.

    Missing, unexpected and mis-shaped keys are all listed in one error.
    """
    sd = extract_state_dict(load_checkpoint(path))
    if not sd:
        raise UsageError(f"{path} holds no tensors: not a weight file")
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
        raise UsageError(f"{path} does not match the {type(model).__name__} of this project "
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
    """The checkpoint dict: the original's keys first, this project's extras after.

    ``assignments`` (N,), the training examples' clusters at the last refresh, are stored as
    ``cluster_sizes`` (C*K,) so a checkpoint shows how its clusters are populated.
    """
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


def _tensor(value, dtype) -> torch.Tensor:
    return torch.as_tensor(value).to(dtype)


def classifier_from_checkpoint(ckpt: dict, dataset: str | None = None, L: int | None = None,
                               normalize: bool | None = None) -> ClusterClassifier:
    """A ClusterClassifier in eval mode; explicit ``L``/``normalize`` win over the file's."""
    if not has_clusters(ckpt):
        raise UsageError("checkpoint lacks the cluster keys "
                         f"({', '.join(CLUSTER_KEYS)}): not a ClusTR checkpoint")
    backbone = backbone_from_state(ckpt, dataset)
    classes = _tensor(ckpt["cluster_classes"], torch.long).reshape(-1)
    centers = _tensor(ckpt["cluster_centers"], torch.float32)
    variance = _tensor(ckpt["variance"], torch.float32).reshape(-1)
    if centers.dim() != 2 or len(classes) != len(centers) or \
            len(variance) not in (1, len(centers)):
        raise UsageError(f"inconsistent cluster state: centers {tuple(centers.shape)}, "
                         f"classes {tuple(classes.shape)}, variance {tuple(variance.shape)}")
    valid = (len(centers) > 0 and torch.isfinite(centers).all() and (classes >= 0).all()
             and torch.isfinite(variance).all() and (variance > 0).all())
    if not valid:
        raise UsageError("invalid cluster state: needs at least one cluster, finite centroids, "
                         "non-negative cluster classes and positive finite variances")
    num_classes = max(int(classes.max()) + 1, backbone.linear.out_features)
    head = ClusterHead(centers, classes, variance.expand(len(centers)), num_classes,
                       L=int(ckpt.get("L", 10)) if L is None else L,
                       normalize=bool(ckpt.get("normalize_probs", True))
                       if normalize is None else normalize)
    names = ckpt.get("classes")
    names = [str(n) for n in names] if isinstance(names, (list, tuple)) else None
    return ClusterClassifier(backbone, head, names)


def backbone_from_state(ckpt: dict, dataset: str | None = None) -> ResNet18:
    """A ResNet18 with the checkpoint's weights and the data set's input normalisation."""
    sd = extract_state_dict(ckpt)
    if "linear.weight" not in sd:
        raise UsageError("checkpoint has no ResNet18 weights (no linear.weight)")
    dataset = ckpt.get("dataset", dataset) if dataset is None else dataset
    mean, std = normalization_for(dataset or "cifar10")
    backbone = ResNet18(num_classes=sd["linear.weight"].shape[0], mean=mean, std=std)
    try:
        backbone.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise UsageError(f"checkpoint weights do not fit the ResNet18: "
                         f"{str(exc).splitlines()[0]}") from exc
    return backbone.eval()
