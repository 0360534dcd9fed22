"""Make ``pretrained_weights/resnet18.pt`` from the CIFAR-10 ResNet18 inside ``pyautoattack``.

    python -m pretrained_weights.from_autoattack [--out PATH] [--force]

The AutoAttack package ships ``examples/model_test.pt``: a plain state_dict of the same CIFAR
ResNet18 as the original ClusTR code (same key names), cross-entropy trained on CIFAR-10 with
inputs in [0, 1]. ClusTR's pretrained weights instead expect inputs normalised with the CIFAR
mean and std (``models/resnet.py`` normalises inside the model). Folding that normalisation
into the first convolution and BatchNorm turns one convention into the other:

    with x = std * z + mean (z: the normalised image), per output channel o,
    conv(W, x)[o] = conv(W * std, z)[o] + sum_{c,i,j} W[o, c, i, j] * mean[c]

so ``conv1.weight`` is scaled by std per input channel and the constant
``sum W * mean`` moves into ``bn1.running_mean`` (BatchNorm subtracts it right after the
convolution). This is exact wherever the 3x3 window lies inside the image; at the border the
zero padding of z corresponds to x = mean, not 0, so the outermost pixels differ slightly.
Everything else is copied by name, with a shape check per tensor. Nothing is downloaded.
"""
from __future__ import annotations

import importlib
import importlib.resources
import sys
from importlib.resources.abc import Traversable
from pathlib import Path

import torch

from base.cli import ArgParser
from base.errors import UsageError, exit_status
from base.io import file_sha256, save_atomic
from models.checkpoint import load_weights
from models.resnet import CIFAR_MEAN, CIFAR_STD, ResNet18
from utils.attacks.autoattack_backend import package_version
from utils.outputs.output_files import check_outputs

PACKAGE = "pyautoattack"
PACKAGE_PIN = "pyautoattack==0.2.0"
SOURCE = ("examples", "model_test.pt")
DEFAULT_OUT = Path(__file__).resolve().parent / "resnet18.pt"


def package_source() -> tuple[Traversable, str]:
    """The package's model file (found through the installed package) and its version."""
    try:
        module = importlib.import_module(PACKAGE)
    except ImportError as exc:
        raise UsageError(f"{PACKAGE} is not installed: pip install {PACKAGE_PIN}") from exc
    source = importlib.resources.files(module).joinpath(*SOURCE)
    if not source.is_file():
        raise UsageError(f"the installed {PACKAGE} has no {'/'.join(SOURCE)}: "
                         f"pip install --force-reinstall {PACKAGE_PIN}")
    return source, package_version(PACKAGE, module)


def converted() -> tuple[dict, str]:
    """The package's weights, checked by name and shape against the ResNet18, with the CIFAR
    mean and std folded in (only ``conv1.weight`` and ``bn1.running_mean`` change), and the
    package's version."""
    source, version = package_source()
    model = ResNet18(num_classes=10)
    with importlib.resources.as_file(source) as path:  # a real file even from a zip install
        load_weights(model, str(path))  # by name, strict, one-line error listing any mismatch
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weight = state["conv1.weight"]  # (64, 3, 3, 3)
    mean = torch.tensor(CIFAR_MEAN, dtype=weight.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, dtype=weight.dtype).view(1, 3, 1, 1)
    state["conv1.weight"] = weight * std
    state["bn1.running_mean"] = state["bn1.running_mean"] - (weight * mean).sum((1, 2, 3))
    return state, version


def run(out: Path, force: bool) -> None:
    check_outputs({"--out": str(out)}, "--force", force, make_folder=True)
    state, version = converted()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(state, str(out))
    print(f"wrote {out}")
    print(f"  source  {PACKAGE} {version}: {'/'.join(SOURCE)} (CIFAR-10 ResNet18, inputs in "
          f"[0, 1]), CIFAR mean/std folded into conv1 and bn1")
    print(f"  sha256  {file_sha256(out)}")


def main(argv=None) -> int:
    parser = ArgParser(
        prog="python -m pretrained_weights.from_autoattack",
        description="Write a stand-in pretrained_weights/resnet18.pt from the CIFAR-10 "
                    "ResNet18 shipped by the installed pyautoattack package (offline).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the weights (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)
    return exit_status(lambda: run(args.out, args.force))


if __name__ == "__main__":
    sys.exit(main())
