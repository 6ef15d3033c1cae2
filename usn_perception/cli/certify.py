"""Certification command: certify one or more models on a labelled dataset, with a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from usn_perception.cli.registry import READOUT_CHOICES, command, floats, pair, progress
from usn_perception.errors import UsnPerceptionError


def _cfg_certify(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', type=Path, action='append', default=None,
                   help='model to certify (repeat to compare models side by side; '
                        'default: the shipped default)')
    p.add_argument('--data', required=True, type=Path, help='COCO keypoints file')
    p.add_argument('--alpha', type=pair, default=(0.8, 1.2), help='contrast range LO,HI')
    p.add_argument('--beta', type=pair, default=(-0.1, 0.1), help='brightness range LO,HI')
    p.add_argument('--tolerance', type=floats, default=(2.0, 3.0, 5.0),
                   help='tolerances τ in pixels for certified accuracy and PCK')
    p.add_argument('--out', required=True, type=Path, help='report folder')
    p.add_argument('--method', choices=('forward', 'ibp'), default='forward')
    p.add_argument('--budget', type=int, default=None,
                   help='maximum θ sub-boxes per image (default: the offline budget)')
    p.add_argument('--budget-ms', type=float, default=None,
                   help='wall-clock limit per image in ms')
    p.add_argument('--exact-values', type=int, default=None, metavar='N',
                   help='clipped pixel values per sub-box bounded exactly through the first '
                        'layer (threshold coordinates; default 12; 0 = per-pixel relaxation: '
                        'cheaper per sub-box, looser)')
    p.add_argument('--level-nodes', type=int, default=None, metavar='N',
                   help='most network runs at the clip levels of a box where only dark or only '
                        'bright pixels clip (budgets up to 8 sub-boxes; default 64; 0 = off: '
                        'the partition, as at larger budgets)')
    p.add_argument('--precision', choices=('auto', 'float64', 'float32'), default='auto',
                   help='float32 forms with tracked rounding (auto: where sound, i.e. on the '
                        'CPU; same boxes within ~1 %%, faster) or float64 throughout')
    p.add_argument('--readout', choices=READOUT_CHOICES, default=None)
    p.add_argument('--limit', type=int, default=None, help='certify only the first N images')
    p.add_argument('--sweep', type=floats, default=None,
                   help='also certify the box scaled by these factors about θ=(1,0), '
                        'e.g. 0.25,0.5,1,1.5 (plot: certified accuracy vs perturbation size)')
    p.add_argument('--sweep-limit', type=int, default=20,
                   help='images per sweep point (default 20)')


@command('certify', 'certified keypoint boxes over a brightness/contrast box, with a report',
         'usn-perception certify --data data/synth/test/annotations.json --alpha 0.8,1.2 '
         '--beta -0.1,0.1 --tolerance 2,3,5 --out reports/cert', _cfg_certify)
def cmd_certify(args: argparse.Namespace) -> int:
    """Certify every image; write summary.json, keypoints.csv, report.md and plots.

    A keypoint is certified correct at τ when its whole certified box lies within τ pixels of
    the ground truth. Several --model values are certified on the same images in one run.
    """
    from usn_perception.certify import EXACT_VALUES, LEVEL_NODES, Budget, PhotometricBox
    from usn_perception.certify_report import write_certify_report
    from usn_perception.data.coco import load_coco
    from usn_perception.detector import load_detector

    exact_values = EXACT_VALUES if args.exact_values is None else args.exact_values
    if exact_values < 0:
        raise UsnPerceptionError(f'--exact-values must be >= 0, got {exact_values}')
    level_nodes = LEVEL_NODES if args.level_nodes is None else args.level_nodes
    if level_nodes < 0:
        raise UsnPerceptionError(f'--level-nodes must be >= 0, got {level_nodes}')
    try:
        box = PhotometricBox(args.alpha, args.beta)
        budget = None
        if args.budget is not None or args.budget_ms is not None:
            # A time limit alone means: split as far as the time allows.
            budget = Budget(max_subboxes=1_000_000 if args.budget is None else args.budget,
                            max_ms=args.budget_ms)
    except ValueError as e:
        raise UsnPerceptionError(f'invalid perturbation box or budget: {e}') from e
    dataset = load_coco(args.data)
    models = args.model or [None]
    detectors = [load_detector(m, readout=args.readout) for m in models]
    write_certify_report(
        args.out, detectors, dataset, box, tolerances=args.tolerance, method=args.method,
        budget=budget, limit=args.limit, sweep=args.sweep, sweep_limit=args.sweep_limit,
        progress=progress(args), data_path=args.data, exact_values=exact_values,
        precision=args.precision, level_nodes=level_nodes)
    print(f'report: {args.out / "report.md"}')
    return 0
