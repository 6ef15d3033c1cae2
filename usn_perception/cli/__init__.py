"""``usn-perception``: the offline command-line front (datasets, training, models, evaluation).

Each subcommand is a small function over the core, registered by one module of this package;
errors the core raises on purpose (:class:`UsnPerceptionError`) and missing files become one
line on stderr naming the file and the problem, and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import textwrap
from collections.abc import Sequence

from usn_perception.allocator import keep_freed_memory
from usn_perception.cli.registry import COMMANDS
from usn_perception.errors import UsnPerceptionError

#: Modules that register subcommands, in the order they appear in --help.
COMMAND_MODULES = ('data', 'models', 'certify', 'prune', 'bag', 'demo')


def load_commands() -> dict:
    """Import every command module (each registers its subcommands) and return the registry."""
    for name in COMMAND_MODULES:
        importlib.import_module(f'usn_perception.cli.{name}')
    return COMMANDS


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    load_commands()
    parser = argparse.ArgumentParser(
        prog='usn-perception',
        description='Certified keypoint perception under brightness/contrast change.')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    parser.add_argument('--progress', action='store_true',
                        help='progress bars even when stderr is not a terminal')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name, (fn, configure, summary, example) in COMMANDS.items():
        doc = textwrap.dedent(fn.__doc__ or '').strip()
        p = sub.add_parser(name, help=summary, description=f'{summary}.\n\n{doc}',
                           epilog=f'example:\n  {example}',
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        configure(p)
        p.set_defaults(func=fn)
    return parser


_NUMBER_LIST = re.compile(r'^-\d*\.?\d+([eE][-+]?\d+)?(,-?\d*\.?\d+([eE][-+]?\d+)?)+$')


def join_negative_lists(argv: Sequence[str]) -> list[str]:
    """Let ``--beta -0.1,0.1`` mean ``--beta=-0.1,0.1`` (argparse reads it as an option)."""
    out: list[str] = []
    for tok in argv:
        if out and out[-1].startswith('--') and '=' not in out[-1] and _NUMBER_LIST.match(tok):
            out[-1] = f'{out[-1]}={tok}'
        else:
            out.append(tok)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn expected errors into a message and exit status 1."""
    argv = join_negative_lists(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # batch jobs: reuse freed tensors' memory instead of faulting it in
    try:
        return int(args.func(args) or 0)
    except (UsnPerceptionError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f'usn-perception {args.command}: error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f'usn-perception {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
