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
import warnings

import torch

from models.classifier import ClusterClassifier
from models.cluster_head import ClusterHead
from models.resnet import EMBEDDING_DIM, ResNet18, normalization_for
from base.errors import UsageError

FORMAT = "clustr-reference-1"
CLUSTER_KEYS = ("cluster_centers", "cluster_classes", "variance", "K")
WRAPPER_KEYS = ("state_dict", "net", "model")
PREFIXES = ("module.", "model.")


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)``, with a one-line error for every failure.

    ``weights_only=True`` only rebuilds tensors and plain Python types: a file that holds a
    pickled object (a class instance, a numpy scalar, ...) is refused rather than executed.
    """
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # torch's own warnings would break the one-line answer
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(_refusal(path, str(exc))) from exc
    except MemoryError:
        raise
    except Exception as exc:  # truncated zip, text file, empty file, bad map_location, ...
        raise UsageError(f"{path} is not a readable PyTorch file (truncated or corrupt?): "
                         f"{_first_line(exc)}") from exc
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def _refusal(path: str, message: str) -> str:
    """The one-line reason a file was refused by the weights-only unpickler."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if found:
        what = f"a pickled {found.group(1)} object"
    else:
        found = re.search(r"WeightsUnpickler error: \s*(.+)", message)
        what = "pickled data" + (f" ({found.group(1).strip()[:80]})" if found else "")
    return (f"{path} holds {what}: refused, because unpickling arbitrary objects can run code "
            f"(weights_only=True); if you trust the file, re-save it with tensors and plain "
            f"types only")


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:200]


def save_atomic(obj, path: str) -> None:
    """Write ``obj`` with ``torch.save`` to a temporary file, then move it into place."""
    atomic_write(path, lambda f: torch.save(obj, f))


def write_text_atomic(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write(path: str, write) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``.

    A process killed at any moment leaves either the previous file or the new one, never a
    partial one (at worst a hidden ``.<name>.*`` temporary, removed by the next run). The
    data and the rename are both flushed to disk before returning.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=folder)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; keep the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _file_mode(path: str) -> int:
    """The replaced file's permissions, or those a plain ``open(path, "w")`` would give."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def temp_prefix(path: str) -> str:
    """Temporary files of ``atomic_write(path)`` are named ``<prefix>XXXXXXXX``."""
    return "." + os.path.basename(path) + "."


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    try:
        classes = _tensor(ckpt["cluster_classes"], torch.long).reshape(-1)
        centers = _tensor(ckpt["cluster_centers"], torch.float32)
        variance = _tensor(ckpt["variance"], torch.float32).reshape(-1)
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
    copy_weights(backbone, sd, "checkpoint")
    return backbone.eval()
