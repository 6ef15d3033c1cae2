"""Certification time of several models, interleaved image by image, at one box and budget.

The pruning target compares certification times of a pruned and an unpruned model "in the same
run"; on a shared machine the fairest form of that is round-robin (``time_interleaved``, as
``prune-compare`` uses): every image is certified by every model back to back, so load changes
hit all models alike. Settings (``--exact-values`` × ``--precision``) are timed one after
the other, each round-robin over the models. Also counts keypoint boxes under a width.

    python bench/bench_cert_time.py --model models/default --model models/unpruned \\
        --data W/data/test/annotations.json --first 20 --count 10 --exact-values 0,6,12 \\
        --precision auto,float64

Writes a markdown table (with this command line) to ``--out`` (default: stdout only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from usn_perception.certify import Budget, PhotometricBox  # noqa: E402
from usn_perception.certify_dataset import time_interleaved  # noqa: E402
from usn_perception.data.coco import load_coco  # noqa: E402
from usn_perception.detector import load_detector  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, time every (setting, model) pair on every image, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', action='append', required=True)
    parser.add_argument('--data', required=True, help='COCO keypoints JSON')
    parser.add_argument('--first', type=int, default=0, help='first image index')
    parser.add_argument('--count', type=int, default=10, help='number of images')
    parser.add_argument('--alpha', default='0.8,1.2')
    parser.add_argument('--beta', default='-0.1,0.1')
    parser.add_argument('--budget', type=int, default=96, help='θ sub-boxes per image')
    parser.add_argument('--exact-values', default='12', help='comma-separated settings')
    parser.add_argument('--precision', default='auto',
                        help='comma-separated certify precisions (auto, float64, float32)')
    parser.add_argument('--width', type=float, default=6.0, help='count boxes under this (px)')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--out', type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    box = PhotometricBox(tuple(float(v) for v in args.alpha.split(',')),
                         tuple(float(v) for v in args.beta.split(',')))
    budget = Budget(max_subboxes=args.budget)
    settings = [(int(v), p) for v in args.exact_values.split(',')
                for p in args.precision.split(',')]
    dataset = load_coco(args.data)
    dets = [load_detector(m) for m in args.model]
    seconds = np.zeros((len(settings), len(dets)))
    narrow = np.zeros((len(settings), len(dets)), dtype=int)
    indices = range(args.first, min(args.first + args.count, len(dataset)))
    for a, (exact, precision) in enumerate(settings):
        seconds[a], certs = time_interleaved(
            dets, (dataset.load_image(i) for i in indices), box, budget,
            warm=dataset.load_image(args.first), exact_values=exact, precision=precision)
        narrow[a] = [sum(int((c.widths.max(1) < args.width).sum()) for c in per_det)
                     for per_det in certs]
    n = len(indices)
    lines = [f'Command: `python bench/bench_cert_time.py {" ".join(sys.argv[1:])}`', '',
             f'{n} images ({args.first}–{args.first + n - 1}), box α∈{box.alpha}, β∈{box.beta}, '
             f'{args.budget} sub-boxes, {args.threads} thread(s), interleaved per image.', '',
             '| exact_values | precision | ' + ' | '.join(f'{m} s / image' for m in args.model)
             + ' | time ratio (first / last) | ' + ' | '.join(
                 f'{m} boxes < {args.width:g} px' for m in args.model) + ' |',
             '|---' * (3 + 2 * len(dets)) + '|']
    for a, (exact, precision) in enumerate(settings):
        ratio = seconds[a, 0] / seconds[a, -1]
        lines.append(f'| {exact} | {precision} | '
                     + ' | '.join(f'{t / n:.2f}' for t in seconds[a])
                     + f' | {ratio:.3f} | ' + ' | '.join(str(c) for c in narrow[a]) + ' |')
    text = '\n'.join(lines) + '\n'
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
