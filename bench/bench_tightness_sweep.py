"""Certified vs empirical keypoint ranges per image, over budgets: is a model certifiable?

For each image (synthetic test renders and, when cached, ViSP mire-2 frames) and each budget,
prints the certified box half-perimeter per keypoint next to the empirical range (dense θ
grid plus the attack) and the time as a multiple of ``predict``; writes the rows as markdown.

    python bench/bench_tightness_sweep.py --model M --budgets 3,16,48 --box node --out R.md
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from bench_certify import NODE_BOX, OFFLINE_BOX, test_images  # noqa: E402

from usn_perception.bounds.attack import empirical_range  # noqa: E402
from usn_perception.certify import Budget, certify_keypoints  # noqa: E402
from usn_perception.detector import load_detector  # noqa: E402

VISP = Path.home() / '.cache' / 'usn_perception' / 'visp' / 'mire-2'


def images(n_synthetic: int, n_visp: int) -> list[tuple[str, np.ndarray]]:
    """Synthetic test renders (384x288) and every 200th mire-2 frame when cached."""
    out = [(f'synthetic {i}', im) for i, im in enumerate(test_images(n_synthetic, (384, 288)))]
    frames = sorted(glob.glob(str(VISP / '*.pgm')))[::200][:n_visp]
    out += [(f'mire-2 {Path(f).stem}', cv2.imread(f, cv2.IMREAD_UNCHANGED)) for f in frames]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default=str(REPO / 'models' / 'default'))
    ap.add_argument('--budgets', default='3,16,48')
    ap.add_argument('--box', choices=('node', 'offline'), default='node')
    ap.add_argument('--synthetic', type=int, default=2)
    ap.add_argument('--visp', type=int, default=2)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--out', type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    det = load_detector(args.model)
    box = NODE_BOX if args.box == 'node' else OFFLINE_BOX
    lines = [f'`{" ".join(sys.argv)}` — model sha256 {det.sha256[:12]}, box {box}', '',
             '| image | sub-boxes | certified (px, per keypoint) | empirical (px) | × predict |',
             '|---|---|---|---|---|']
    for name, img in images(args.synthetic, args.visp):
        emp = empirical_range(det, img, box, grid=7, rounds=2, local=3, random=8).widths.sum(1)
        t = time.perf_counter()
        det.predict(img)
        t_pred = time.perf_counter() - t
        for n in (int(v) for v in args.budgets.split(',')):
            t = time.perf_counter()
            cert = certify_keypoints(det, img, box, budget=Budget(n))
            ratio = (time.perf_counter() - t) / t_pred
            row = (f'| {name} | {n} | {", ".join(f"{w:.2f}" for w in cert.widths.sum(1))} | '
                   f'{", ".join(f"{w:.2f}" for w in emp)} | {ratio:.0f} |')
            print(row, flush=True)
            lines.append(row)
    if args.out:
        args.out.write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
