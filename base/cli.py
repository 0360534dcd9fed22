"""Argument-parsing pieces every command-line tool of the project shares: a parser and types
that refuse bad values in one line, and ``config``/``resume_field``, through which no code
below a command's ``main`` sees the Namespace.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys

from base.errors import exit_status


class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as for every other bad input
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def run_command(parser: argparse.ArgumentParser, run, argv=None) -> int:
    """A tool's ``main``: parse ``argv``, log INFO lines to stdout, ``exit_status(run(args))``."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    return exit_status(lambda: run(args))


def _bounded(kind, strict: bool):
    """A parser of finite ``kind`` values above 0 (``strict``) or at least 0."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            article = "an integer" if kind is int else f"a {kind.__name__}"
            raise argparse.ArgumentTypeError(f"{text!r} is not {article}") from None
        if not (value > 0 if strict else value >= 0) or not math.isfinite(value):
            bound = "above 0" if strict else ">= 0"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value
    parse.__name__ = f"{'positive' if strict else 'non-negative'} {kind.__name__}"
    return parse


pos_int, pos_float = _bounded(int, True), _bounded(float, True)
nonneg_int, nonneg_float = _bounded(int, False), _bounded(float, False)


def seed_int(text):
    """A seed numpy, torch and scikit-learn all accept: 0 <= seed < 2**32."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32 - 1, got {text}")
    return value


seed_int.__name__ = "seed"


def config(cls, args: argparse.Namespace, **values):
    """An instance of the dataclass ``cls`` whose fields take the parsed arguments of the same
    names; ``values`` give the fields that have no argument of their name (``K`` from
    ``--k``, ``normalize`` from ``--not-normalize``). Lists become tuples where the field's
    default is one. Every field must be covered: a config never silently keeps a default
    that a flag was meant to set."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            out[f.name] = values.pop(f.name)
        elif hasattr(args, f.name):
            value = getattr(args, f.name)
            out[f.name] = tuple(value) if isinstance(value, list) and isinstance(
                f.default, tuple) else value
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no argument of that name; pass it")
    if values:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(values)}")
    return cls(**out)


def resume_field(default=dataclasses.MISSING, flag: str | None = None, *,
                 argument: str | None = None, training: bool = True):
    """A config field whose value changes what is computed: a resumed run must repeat it.

    ``argument`` is the parsed argument that sets it, where named otherwise (``k`` sets
    ``K``); ``flag`` names it in an evaluation's refusal (default ``--argument-name``). A
    training run continued with --resume repeats it too (``resume_arguments``), unless
    ``training`` is False: a setting of the evaluation alone, which the evaluation's own
    resume checks (a run that trains further makes a new checkpoint, evaluated afresh)."""
    return dataclasses.field(default=default, metadata={
        "resume": flag, "argument": argument, "training": training})


def resume_settings(*configs) -> dict:
    """What a resumed evaluation must repeat: the ``resume_field`` values of ``configs``,
    keyed by their flags, as plain types (lists for tuples)."""
    out = {}
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            if "resume" in f.metadata:
                argument = f.metadata["argument"] or f.name
                value = getattr(cfg, f.name)
                out[f.metadata["resume"] or "--" + argument.replace("_", "-")] = (
                    list(value) if isinstance(value, tuple) else value)
    return out


def resume_arguments(*classes) -> frozenset[str]:
    """What a resumed training run must repeat: the parsed arguments (names without dashes,
    as ``resume.pth`` records them) behind the ``resume_field``s of the config dataclasses
    ``classes``, but those declared ``training=False``."""
    return frozenset(f.metadata["argument"] or f.name for cls in classes
                     for f in dataclasses.fields(cls)
                     if "resume" in f.metadata and f.metadata["training"])
