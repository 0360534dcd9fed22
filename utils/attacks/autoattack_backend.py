"""AutoAttack from either package: the authors' GitHub ``autoattack`` or PyPI ``pyautoattack``.

The two differ in their signatures (docs/failures.md has the table): ``autoattack`` takes
``log_path`` and ``bs=`` and returns the adversarial images; ``pyautoattack`` is keyword-only,
takes ``batch_size=``, returns ``(x_adv, y_adv)`` and logs its progress at DEBUG level.
``find_backend()`` prefers ``autoattack``; the results name the package and version that ran.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass

import torch

from base.errors import UsageError

log = logging.getLogger("clustr")

HINT = ("--autoattack needs AutoAttack: python -m pip install "
        "git+https://github.com/fra31/auto-attack (the authors' package) or "
        "python -m pip install pyautoattack==0.2.0")
PACKAGES = ("autoattack", "pyautoattack")  # in order of preference


@dataclass
class Backend:
    package: str        # "autoattack" or "pyautoattack"
    version: str
    module: object      # the imported package

    def name(self) -> str:
        return f"{self.package} {self.version}"


def available() -> bool:
    """Whether one of the packages can be imported (checked without importing)."""
    return any(importlib.util.find_spec(p) is not None for p in PACKAGES)


def find_backend() -> Backend:
    """The first installed package of ``PACKAGES``, or a UsageError with the install hint."""
    for package in PACKAGES:
        if importlib.util.find_spec(package) is None:
            continue
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            log.warning("AutoAttack package %s is installed but fails to import (%s)", package, exc)
            continue
        if not hasattr(module, "AutoAttack"):
            log.warning("the installed package %s has no AutoAttack class: not the AutoAttack "
                        "authors' package, skipped", package)
            continue
        return Backend(package, package_version(package, module), module)
    raise UsageError(HINT)


def package_version(package: str, module) -> str:
    """The installed distribution's version, else the module's ``__version__``."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown"))


def make_adversary(backend: Backend, model: torch.nn.Module, eps: float, device: torch.device,
                   seed: int, log_path: str | None = None):
    """An AutoAttack l-inf adversary, standard version, at ``eps`` (pixel units)."""
    kwargs = {"log_path": log_path} if backend.package == "autoattack" else {}
    return backend.module.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                                     device=device, seed=seed, **kwargs)


def run_adversary(backend: Backend, adversary, x: torch.Tensor, y: torch.Tensor,
                  batch: int) -> torch.Tensor:
    """The adversarial images (N, 3, H, W) AutoAttack returns for ``x``, ``y``."""
    if backend.package == "autoattack":
        return adversary.run_standard_evaluation(x, y, bs=batch)
    with _forward_pyautoattack_log():
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch)
    return x_adv


class _Forward(logging.Handler):
    def emit(self, record):
        log.info("AutoAttack: %s", record.getMessage())


@contextlib.contextmanager
def _forward_pyautoattack_log():
    """Show pyautoattack's progress lines (it logs them at DEBUG) in this project's log."""
    logger = logging.getLogger("auto-attack")
    saved = (logger.level, logger.propagate)
    handler = _Forward()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
