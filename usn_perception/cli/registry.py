"""The subcommand registry and the small argument parsers every command module shares."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

#: Choices for ``--readout`` / ``--arch``, spelled out so that ``--help`` needs no torch import;
#: test/test_cli.py checks them against ``usn_perception.network``.
READOUT_CHOICES = ('centroid', 'local-centroid', 'soft-argmax', 'argmax')
ARCH_CHOICES = ('homogeneous', 'plain')

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str, str]] = {}


def command(
    name: str, summary: str, example: str,
    configure: Callable[[argparse.ArgumentParser], None],
) -> Callable[[Command], Command]:
    """Register the decorated function as subcommand ``name``; ``configure`` adds arguments."""

    def register(fn: Command) -> Command:
        COMMANDS[name] = (fn, configure, summary, example)
        return fn

    return register


def pair(text: str) -> tuple[float, float]:
    """Parse ``LO,HI``."""
    try:
        lo, hi = (float(v) for v in text.split(','))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'expected LO,HI, got {text!r}') from e
    return lo, hi


def floats(text: str) -> tuple[float, ...]:
    """Parse comma-separated numbers."""
    try:
        return tuple(float(v) for v in text.split(','))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}') from e


def size(text: str) -> tuple[int, int]:
    """Parse ``W,H``."""
    try:
        w, h = (int(v) for v in text.split(','))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'expected W,H, got {text!r}') from e
    return w, h


def progress(args: argparse.Namespace) -> bool:
    """Show progress bars on a terminal, or when --progress was given."""
    return not getattr(args, 'quiet', False) and sys.stderr.isatty() or getattr(
        args, 'progress', False)
