"""Dataset commands: make-dataset, fetch-visp, pseudo-label."""

from __future__ import annotations

import argparse
from pathlib import Path

from usn_perception.cli.registry import command, progress, size
from usn_perception.errors import UsnPerceptionError


def _cfg_make_dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument('--out', required=True, type=Path, help='output folder (must not exist)')
    p.add_argument('--count', type=int, default=2000, help='images over all splits')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--size', type=size, default=(384, 288), help='image size W,H')


@command('make-dataset', 'render the procedural 5-dot target dataset (COCO keypoints)',
         'usn-perception make-dataset --out data/synth --count 2000 --seed 0', _cfg_make_dataset)
def cmd_make_dataset(args: argparse.Namespace) -> int:
    """Render train/val/test splits (split by background photo)."""
    from usn_perception.data.synthetic import make_dataset

    paths = make_dataset(args.out, args.count, args.seed, size=args.size,
                         progress=progress(args))
    for split, path in paths.items():
        print(f'{split}: {path}')
    return 0


def _cfg_fetch_visp(p: argparse.ArgumentParser) -> None:
    p.add_argument('--cache', type=Path, default=None,
                   help='cache folder (default: ~/.cache/usn_perception/visp)')
    p.add_argument('--sequence', default='mire-2')
    p.add_argument('--labels', type=Path, default=None,
                   help='also pseudo-label the frames into this COCO file')


@command('fetch-visp', "fetch the real ViSP frames from Debian's visp-images-data (GPL-2)",
         'usn-perception fetch-visp --labels data/mire2.json', _cfg_fetch_visp)
def cmd_fetch_visp(args: argparse.Namespace) -> int:
    """Download the .deb (no install), extract one sequence into the cache, optionally label."""
    from usn_perception.data.visp import default_cache_dir, fetch_visp, list_frames

    folder = fetch_visp(args.cache or default_cache_dir(), args.sequence)
    frames = list_frames(folder)
    print(f'{len(frames)} frames in {folder}')
    if args.labels:
        from usn_perception.data.pseudo_label import pseudo_label_frames

        stats = pseudo_label_frames(frames, args.labels, progress=progress(args))
        print(f'pseudo-labelled {stats["labelled"]}/{stats["total"]} frames -> {args.labels}')
    return 0


def _cfg_pseudo_label(p: argparse.ArgumentParser) -> None:
    p.add_argument('frames', type=Path, help='folder of frames (png/pgm/jpg)')
    p.add_argument('--out', required=True, type=Path, help='COCO file to write')


@command('pseudo-label', 'label target frames with the classical blob detector',
         'usn-perception pseudo-label ~/.cache/usn_perception/visp/mire-2 --out mire2.json',
         _cfg_pseudo_label)
def cmd_pseudo_label(args: argparse.Namespace) -> int:
    """Threshold + blob geometry; writes only the frames it labels confidently."""
    from usn_perception.data.pseudo_label import pseudo_label_frames
    from usn_perception.data.visp import list_frames

    if not args.frames.is_dir():
        raise UsnPerceptionError(f'{args.frames}: not a folder of frames')
    stats = pseudo_label_frames(list_frames(args.frames), args.out, progress=progress(args))
    print(f'pseudo-labelled {stats["labelled"]}/{stats["total"]} frames -> {args.out}')
    return 0
