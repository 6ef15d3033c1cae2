"""Model commands: train, evaluate, models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from usn_perception.cli.registry import (
    ARCH_CHOICES,
    READOUT_CHOICES,
    command,
    floats,
    progress,
    size,
)
from usn_perception.errors import UsnPerceptionError


def _cfg_train(p: argparse.ArgumentParser) -> None:
    p.add_argument('--data', required=True, type=Path,
                   help='training COCO file, or a make-dataset folder (uses train/ and val/)')
    p.add_argument('--val', type=Path, default=None, help='validation COCO file')
    p.add_argument('--out', required=True, type=Path, help='model folder to write')
    p.add_argument('--epochs', type=int, default=12)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--widths', type=floats, default=None,
                   help='per-layer widths (9 comma-separated integers)')
    p.add_argument('--input-size', type=size, default=(128, 96), help='network input W,H')
    p.add_argument('--limit', type=int, default=None, help='use only the first N images')
    p.add_argument('--arch', choices=ARCH_CHOICES, default='homogeneous',
                   help='homogeneous (default): certifiable by construction, see '
                        'docs/certification.md; plain: biased BatchNorm net')
    p.add_argument('--readout', choices=READOUT_CHOICES, default=None,
                   help='default readout (default: centroid for homogeneous, soft-argmax '
                        'for plain)')
    p.add_argument('--gain-weight', type=float, default=0.0,
                   help='certified training: weight of log(radius gain) in the loss '
                        '(0 = off; see docs/certification.md)')
    p.add_argument('--no-first-relu', action='store_true',
                   help='no ReLU after the first conv: the first two convs form one linear '
                        'stage (tighter node-sized certificates; docs/certification.md, '
                        '"A linear first stage")')


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
    from usn_perception.network import PLAIN_DEFAULTS, DetectorConfig
    from usn_perception.train import TrainOptions, train_detector

    train_path, val_path = _train_val_paths(args.data, args.val)
    train_set, val_set = load_coco(train_path), load_coco(val_path)
    if args.limit:
        train_set.samples = train_set.samples[:args.limit]
    kwargs = {'input_size': args.input_size, 'keypoint_names': tuple(train_set.keypoint_names),
              'arch': args.arch, 'first_relu': not args.no_first_relu}
    if args.arch == 'plain':
        kwargs.update(PLAIN_DEFAULTS)
    if args.readout:
        kwargs['readout'] = args.readout
    if args.widths:
        kwargs['widths'] = tuple(int(w) for w in args.widths)
    try:
        config = DetectorConfig(**kwargs)
    except ValueError as e:
        raise UsnPerceptionError(f'invalid architecture: {e}') from e
    opts = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, gain_weight=args.gain_weight)
    summary = {'train': str(train_path), 'val': str(val_path),
               'train_images': len(train_set), 'val_images': len(val_set),
               'train_info': train_set.info}
    metrics = train_detector(train_set, val_set, args.out, config=config, options=opts,
                             progress=progress(args), data_summary=summary)
    v = metrics['val']
    print(f'model: {metrics["model"]}\nval mean error {v["mean_error_px"]:.3f} px, '
          f'PCK@4 {v["pck"]["4"]:.4f}, {metrics["train_seconds"]:.0f} s')
    return 0


def _cfg_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', type=Path, default=None, help='model (default: shipped)')
    p.add_argument('--data', required=True, type=Path, help='COCO keypoints file')
    p.add_argument('--tolerance', type=floats, default=(2.0, 3.0, 4.0, 5.0),
                   help='PCK tolerances in pixels')
    p.add_argument('--readout', choices=READOUT_CHOICES, default=None)
    p.add_argument('--json', action='store_true', help='print the summary as JSON')


@command('evaluate', 'clean accuracy (mean error, PCK@τ) of a model on a COCO dataset',
         'usn-perception evaluate --data data/synth/test/annotations.json', _cfg_evaluate)
def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``predict`` on every image and compare with the labels."""
    from usn_perception.data.coco import load_coco
    from usn_perception.detector import load_detector
    from usn_perception.train import evaluate_detector

    det = load_detector(args.model, readout=args.readout)
    summary = evaluate_detector(det, load_coco(args.data), args.tolerance, progress(args))
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
    from usn_perception.model_io import find_models, load_model, model_name
    from usn_perception.network import count_parameters

    rows = []
    for path in find_models():
        try:
            net, config, doc = load_model(path)
            rows.append({'name': model_name(path),
                         'path': str(path), 'parameters': count_parameters(net),
                         'widths': list(config.widths), 'sha256': doc['weights_sha256']})
        except UsnPerceptionError as e:
            rows.append({'name': model_name(path), 'path': str(path), 'error': str(e)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        if not rows:
            print('no models found')
        for r in rows:
            detail = r.get('error') or f'{r["parameters"]:>8} params  sha256 {r["sha256"][:16]}'
            print(f'{r["name"]:<16} {detail}  {r["path"]}')
    return 0
