"""``usn-perception``: the offline command-line front (datasets, training, models, evaluation).

Each subcommand is a small function over the core; errors the core raises on purpose
(:class:`UsnPerceptionError`) and missing files become one line on stderr naming the file and
the problem, and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from usn_perception.errors import UsnPerceptionError

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str, str]] = {}


def command(
    name: str, summary: str, example: str,
    configure: Callable[[argparse.ArgumentParser], None],
) -> Callable[[Command], Command]:
    """Register the decorated function as subcommand ``name``; ``configure`` adds arguments."""

    def register(fn: Command) -> Command:
        _COMMANDS[name] = (fn, configure, summary, example)
        return fn

    return register


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(','))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'expected LO,HI, got {text!r}') from e
    return lo, hi


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(','))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}') from e


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.split(','))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'expected W,H, got {text!r}') from e
    return w, h


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, 'quiet', False) and sys.stderr.isatty() or getattr(
        args, 'progress', False)


# --- make-dataset -------------------------------------------------------------------------

def _cfg_make_dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument('--out', required=True, type=Path, help='output folder (must not exist)')
    p.add_argument('--count', type=int, default=2000, help='images over all splits')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--size', type=_size, default=(384, 288), help='image size W,H')


@command('make-dataset', 'render the procedural 5-dot target dataset (COCO keypoints)',
         'usn-perception make-dataset --out data/synth --count 2000 --seed 0', _cfg_make_dataset)
def cmd_make_dataset(args: argparse.Namespace) -> int:
    """Render train/val/test splits (split by background photo)."""
    from usn_perception.data.synthetic import make_dataset

    paths = make_dataset(args.out, args.count, args.seed, size=args.size,
                         progress=_progress(args))
    for split, path in paths.items():
        print(f'{split}: {path}')
    return 0


# --- fetch-visp / pseudo-label ------------------------------------------------------------

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

        stats = pseudo_label_frames(frames, args.labels, progress=_progress(args))
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
    stats = pseudo_label_frames(list_frames(args.frames), args.out, progress=_progress(args))
    print(f'pseudo-labelled {stats["labelled"]}/{stats["total"]} frames -> {args.out}')
    return 0


# --- train / evaluate / models ------------------------------------------------------------

def _cfg_train(p: argparse.ArgumentParser) -> None:
    p.add_argument('--data', required=True, type=Path,
                   help='training COCO file, or a make-dataset folder (uses train/ and val/)')
    p.add_argument('--val', type=Path, default=None, help='validation COCO file')
    p.add_argument('--out', required=True, type=Path, help='model folder to write')
    p.add_argument('--epochs', type=int, default=12)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--widths', type=_floats, default=None,
                   help='per-layer widths (9 comma-separated integers)')
    p.add_argument('--input-size', type=_size, default=(128, 96), help='network input W,H')
    p.add_argument('--limit', type=int, default=None, help='use only the first N images')


def _train_val_paths(data: Path, val: Path | None) -> tuple[Path, Path]:
    if data.is_dir():
        return data / 'train' / 'annotations.json', val or data / 'val' / 'annotations.json'
    if val is None:
        raise UsnPerceptionError(f'{data}: give --val VAL.json when --data is a single file')
    return data, val


@command('train', 'train the heatmap keypoint detector on a COCO keypoints dataset',
         'usn-perception train --data data/synth --out models/mine --epochs 12', _cfg_train)
def cmd_train(args: argparse.Namespace) -> int:
    """Train with validation each epoch; writes MODEL_DIR/model.{json,pt} and metrics.json."""
    from usn_perception.data.coco import load_coco
    from usn_perception.network import DetectorConfig
    from usn_perception.train import TrainOptions, train_detector

    train_path, val_path = _train_val_paths(args.data, args.val)
    train_set, val_set = load_coco(train_path), load_coco(val_path)
    if args.limit:
        train_set.samples = train_set.samples[:args.limit]
    kwargs = {'input_size': args.input_size, 'keypoint_names': tuple(train_set.keypoint_names)}
    if args.widths:
        kwargs['widths'] = tuple(int(w) for w in args.widths)
    try:
        config = DetectorConfig(**kwargs)
    except ValueError as e:
        raise UsnPerceptionError(f'invalid architecture: {e}') from e
    opts = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed)
    summary = {'train': str(train_path), 'val': str(val_path),
               'train_images': len(train_set), 'val_images': len(val_set)}
    metrics = train_detector(train_set, val_set, args.out, config=config, options=opts,
                             progress=_progress(args), data_summary=summary)
    v = metrics['val']
    print(f'model: {metrics["model"]}\nval mean error {v["mean_error_px"]:.3f} px, '
          f'PCK@4 {v["pck"]["4"]:.4f}, {metrics["train_seconds"]:.0f} s')
    return 0


def _cfg_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', type=Path, default=None, help='model (default: shipped)')
    p.add_argument('--data', required=True, type=Path, help='COCO keypoints file')
    p.add_argument('--tolerance', type=_floats, default=(2.0, 3.0, 4.0, 5.0),
                   help='PCK tolerances in pixels')
    p.add_argument('--readout', choices=('soft-argmax', 'argmax'), default=None)
    p.add_argument('--json', action='store_true', help='print the summary as JSON')


@command('evaluate', 'clean accuracy (mean error, PCK@τ) of a model on a COCO dataset',
         'usn-perception evaluate --data data/synth/test/annotations.json', _cfg_evaluate)
def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``predict`` on every image and compare with the labels."""
    from usn_perception.data.coco import load_coco
    from usn_perception.detector import load_detector
    from usn_perception.train import evaluate_detector

    det = load_detector(args.model, readout=args.readout)
    summary = evaluate_detector(det, load_coco(args.data), args.tolerance, _progress(args))
    summary['model_sha256'] = det.sha256
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        pcks = ', '.join(f'PCK@{t} {v:.4f}' for t, v in summary['pck'].items())
        print(f'{summary["images"]} images: mean error {summary["mean_error_px"]:.3f} px, '
              f'{pcks}')
    return 0


def _cfg_models(p: argparse.ArgumentParser) -> None:
    p.add_argument('--json', action='store_true', help='machine-readable output')


@command('models', 'list the models found (shipped and $USN_PERCEPTION_MODELS)',
         'usn-perception models --json', _cfg_models)
def cmd_models(args: argparse.Namespace) -> int:
    """Name, path, parameters and sha256 of every model found."""
    from usn_perception.model_io import find_models, load_model
    from usn_perception.network import count_parameters

    rows = []
    for path in find_models():
        try:
            net, config, doc = load_model(path)
            rows.append({'name': path.parent.name if path.name == 'model.json' else path.stem,
                         'path': str(path), 'parameters': count_parameters(net),
                         'widths': list(config.widths), 'sha256': doc['weights_sha256']})
        except UsnPerceptionError as e:
            rows.append({'name': path.parent.name, 'path': str(path), 'error': str(e)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        if not rows:
            print('no models found')
        for r in rows:
            detail = r.get('error') or f'{r["parameters"]:>8} params  sha256 {r["sha256"][:16]}'
            print(f'{r["name"]:<16} {detail}  {r["path"]}')
    return 0


# --- demo -----------------------------------------------------------------------------------

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
             progress=_progress(args))
    return 0


# --- entry point --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog='usn-perception',
        description='Certified keypoint perception under brightness/contrast change.')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    parser.add_argument('--progress', action='store_true',
                        help='progress bars even when stderr is not a terminal')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name, (fn, configure, summary, example) in _COMMANDS.items():
        doc = textwrap.dedent(fn.__doc__ or '').strip()
        p = sub.add_parser(name, help=summary, description=f'{summary}.\n\n{doc}',
                           epilog=f'example:\n  {example}',
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        configure(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn expected errors into a message and exit status 1."""
    args = build_parser().parse_args(argv)
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
