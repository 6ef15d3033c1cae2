"""The main job: demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from usn_perception.cli.registry import command, progress


def _cfg_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument('--out', type=Path, default=Path('demo_output'), help='output folder')
    p.add_argument('--model', type=Path, default=None, help='model (default: shipped)')
    p.add_argument('--count', type=int, default=300, help='synthetic images to render')
    p.add_argument('--seed', type=int, default=2026)


@command('demo', 'the main job: run the shipped default end to end and write a report',
         'usn-perception demo --out demo_output', _cfg_demo)
def cmd_demo(args: argparse.Namespace) -> int:
    """Fresh synthetic test set → shipped detector → table, summary.json and pictures."""
    from usn_perception.demo import run_demo

    run_demo(args.out, model=args.model, count=args.count, seed=args.seed,
             progress=progress(args))
    return 0
