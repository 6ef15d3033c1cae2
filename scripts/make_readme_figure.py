"""Draw the README's picture: certified keypoint boxes of the shipped default on a render.

    python scripts/make_readme_figure.py [--out docs/img/certified_keypoints.png]

A procedural render (no third-party frames; yellow crosses: its exact labels), certified over
the node-sized box with 48 sub-boxes; the crop around the target is enlarged 3x so small
boxes stay visible.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from usn_perception.certify import Budget, PhotometricBox
from usn_perception.data.synthetic import SPLIT_BACKGROUNDS, render_sample
from usn_perception.detector import load_detector
from usn_perception.visualize import draw_keypoints

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    """Render, certify, draw, save."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', type=Path, default=REPO / 'docs' / 'img' / 'certified_keypoints.png')
    ap.add_argument('--seed', type=int, default=4)
    args = ap.parse_args()
    det = load_detector()
    render = render_sample(np.random.default_rng(args.seed), SPLIT_BACKGROUNDS['test'][0],
                           (384, 288))
    box = PhotometricBox((0.95, 1.05), (-0.03, 0.03))
    cert = det.certify(render.image, box, budget=Budget(48))
    kps = cert.nominal
    x0, y0 = np.maximum(np.floor(kps.min(0) - 24), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(kps.max(0) + 24), [383, 287]).astype(int)
    crop = render.image[y0:y1 + 1, x0:x1 + 1]
    shift = np.array([x0, x0, y0, y0], dtype=np.float64)
    widths = cert.widths.sum(1)
    text = (f'alpha [0.95, 1.05] beta [-0.03, +0.03]: {int(cert.certified.sum())}/'
            f'{len(widths)} certified, box u+v widths {widths.min():.2f}-{widths.max():.2f} px')
    canvas = draw_keypoints(crop, kps - [x0, y0], boxes=cert.boxes - shift,
                            certified=cert.certified, truth=render.keypoints - [x0, y0],
                            scale=3, text=text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), canvas)
    print(f'{args.out}: {text}')


if __name__ == '__main__':
    main()
