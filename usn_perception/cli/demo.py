"""The main job: demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from usn_perception.cli.registry import command, progress


def _cfg_demo(p: argparse.ArgumentParser) -> None:
    from usn_perception.demo import BAG_SOURCES, FAST, DemoOptions

    d = DemoOptions()
    p.add_argument('--out', type=Path, default=Path('demo_output'),
                   help='output folder (default demo_output; a rerun replaces its parts)')
    p.add_argument('--model', type=Path, action='append', default=None,
                   help='model to compare (repeat for several; default: the shipped default '
                        'and the unpruned model it was pruned from)')
    p.add_argument('--fast', action='store_true',
                   help='small sizes for a quick look: ' + ', '.join(
                       f'--{k} {v}' for k, v in FAST.items()) + ' (explicit options win)')
    p.add_argument('--count', type=int, default=None,
                   help=f'synthetic images to render over train/val/test; the test split is '
                        f'10 %% of them (default {d.count})')
    p.add_argument('--images', type=int, default=None,
                   help=f'test images certified per model (default {d.images})')
    p.add_argument('--frames', type=int, default=None,
                   help=f'bag frames evaluated and replayed (default {d.frames})')
    p.add_argument('--bag-source', choices=BAG_SOURCES, default=d.bag_source,
                   help='auto: ViSP mire-2 when apt can fetch it (cached), else a synthetic '
                        'sequence with a scripted lighting change')
    p.add_argument('--visp-cache', type=Path, default=None,
                   help='ViSP cache folder (default ~/.cache/usn_perception/visp)')
    p.add_argument('--no-replay', action='store_true',
                   help='skip the lockstep replay through usn_perception_node (no ROS needed)')
    p.add_argument('--seed', type=int, default=d.seed)


@command('demo', 'the main job: shipped models side by side, certified, on images and a bag',
         'usn-perception demo --out demo_output --images 10 --frames 120', _cfg_demo)
def cmd_demo(args: argparse.Namespace) -> int:
    """Render a fresh test set, certify the shipped models, evaluate and replay a bag.

    Prints a summary table (models side by side: clean PCK, certified accuracy at τ, median
    box width, ms per image; the bag: frames, certified fraction, replay match) and writes
    report.md, summary.json, the certify / eval-bag reports, plots and debug images into
    --out. Exit status 3 when the replayed node differs from the offline evaluation.
    """
    from usn_perception.demo import FAST, DemoOptions, run_demo

    sizes = {k: getattr(args, k) for k in FAST if getattr(args, k) is not None}
    if args.fast:
        sizes = {**FAST, **sizes}
    opts = DemoOptions(**sizes, bag_source=args.bag_source, replay=not args.no_replay,
                       seed=args.seed, visp_cache=args.visp_cache)
    summary = run_demo(args.out, opts, models=args.model, progress=progress(args))
    return 0 if summary['ok'] else 3
