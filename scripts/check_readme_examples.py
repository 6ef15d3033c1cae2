#!/usr/bin/env python3
"""Run the copy-paste examples of README.md in order; fail on the first one that fails.

Convention (also stated in a comment in the README section):

- every fenced ```bash block of the ``## Offline tools`` section (up to the next ``## ``
  heading) is run, in order;
- a block right after a ``<!-- readme-check: skip … -->`` comment is not (say why in it);
- inside a block, ``source env.sh`` lines are not run (the checker sources the checkout's
  ``env.sh`` before every command) and neither are robot-only commands (``ros2 …``,
  ``colcon …``, ``source install/…``).

Each command (backslash continuations joined) runs in its own ``bash`` in one fresh temporary
working folder, so later commands see the files of earlier ones. The first failure prints the
command, its exit status and the tail of its output, and the script exits 1.

    python scripts/check_readme_examples.py [--list] [--workdir DIR] [--timeout S]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = 'Offline tools'
SKIP_MARK = re.compile(r'<!--\s*readme-check:\s*skip\b')
#: Lines that are not run: the checker sources env.sh itself; the rest need a robot's ROS.
NOT_RUN = re.compile(r'^(source\s+(\./)?env\.sh\b|source\s+install/|ros2\s|colcon\s)')


@dataclass(frozen=True)
class Example:
    """One command of the README and the line it starts on."""

    line: int
    command: str


def section_lines(text: str, heading: str) -> list[tuple[int, str]]:
    """(line number, line) of the ``## heading`` section, without the heading itself."""
    out: list[tuple[int, str]] = []
    inside = False
    fence = False
    for no, line in enumerate(text.splitlines(), 1):
        if line.startswith('```'):
            fence = not fence
        if not fence and line.startswith('## '):
            inside = line[3:].strip() == heading
            continue
        if inside:
            out.append((no, line))
    return out


def extract_examples(text: str, heading: str = SECTION) -> list[Example]:
    """The commands the checker runs, in README order (see the module docstring)."""
    examples: list[Example] = []
    block: list[tuple[int, str]] | None = None
    skip = False
    previous = ''
    for no, line in section_lines(text, heading):
        if block is None:
            if line.strip() == '```bash':
                block, skip = [], bool(SKIP_MARK.search(previous))
            elif line.strip():
                previous = line
            continue
        if line.strip() == '```':
            if not skip:
                examples += _commands(block)
            block, previous = None, ''
            continue
        block.append((no, line))
    if block is not None:
        raise ValueError(f'README: unterminated ```bash block in section {heading!r}')
    return examples


def _commands(block: list[tuple[int, str]]) -> list[Example]:
    """Join backslash continuations; drop comments, blank lines and lines not to run."""
    out: list[Example] = []
    start, parts = 0, []
    for no, line in block:
        text = line.rstrip()
        if not parts:
            start = no
            stripped = text.strip()
            if not stripped or stripped.startswith('#'):
                continue
        if text.endswith('\\'):
            parts.append(text[:-1].strip())
            continue
        parts.append(text.strip())
        command = ' '.join(parts)
        parts = []
        if not NOT_RUN.match(command):
            out.append(Example(start, command))
    if parts:
        raise ValueError(f'README line {start}: a command ends in a line continuation')
    return out


def run_examples(examples: list[Example], workdir: Path, *, timeout: float = 900.0,
                 log=print) -> bool:
    """Run every example in ``workdir``; report the first failure and return False."""
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1'),
           'USN_VENV': os.environ.get('USN_VENV', sys.prefix)}
    prelude = f'set -eo pipefail; source {shlex.quote(str(REPO / "env.sh"))}; '
    for i, ex in enumerate(examples, 1):
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(['bash', '-c', prelude + ex.command], cwd=workdir, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout)
            status, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as e:
            status = f'timeout after {timeout:g} s'
            output = (e.stdout or b'').decode(errors='replace') if isinstance(
                e.stdout, bytes) else (e.stdout or '')
        took = time.perf_counter() - t0
        if status != 0:
            tail = '\n'.join(output.strip().splitlines()[-40:])
            log(f'FAILED README.md line {ex.line} (exit status {status}, {took:.0f} s, '
                f'in {workdir}):\n  {ex.command}\n--- output (tail) ---\n{tail}')
            return False
        log(f'[{i}/{len(examples)}] ok {took:5.1f} s  {ex.command}')
    return True


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--readme', type=Path, default=REPO / 'README.md')
    p.add_argument('--section', default=SECTION, help='the ## heading whose blocks run')
    p.add_argument('--workdir', type=Path, default=None,
                   help='run here (must be empty or missing; default: a temporary folder)')
    p.add_argument('--timeout', type=float, default=900.0, help='seconds per command')
    p.add_argument('--list', action='store_true', help='print the commands, run nothing')
    args = p.parse_args(argv)
    try:
        examples = extract_examples(args.readme.read_text(encoding='utf-8'), args.section)
    except (OSError, ValueError) as e:
        print(f'check_readme_examples: error: {e}', file=sys.stderr)
        return 2
    if not examples:
        print(f'check_readme_examples: error: no runnable ```bash block in section '
              f'{args.section!r} of {args.readme}', file=sys.stderr)
        return 2
    if args.list:
        for ex in examples:
            print(f'{ex.line:4d}: {ex.command}')
        return 0
    t0 = time.perf_counter()
    if args.workdir is not None:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            print(f'check_readme_examples: error: {args.workdir} is not empty', file=sys.stderr)
            return 2
        args.workdir.mkdir(parents=True, exist_ok=True)
        ok = run_examples(examples, args.workdir, timeout=args.timeout)
    else:
        with tempfile.TemporaryDirectory(prefix='usn_readme_') as tmp:
            ok = run_examples(examples, Path(tmp), timeout=args.timeout)
    print(f'{"all" if ok else "not all"} {len(examples)} README examples passed '
          f'({time.perf_counter() - t0:.0f} s)')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
