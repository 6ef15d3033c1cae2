"""Where certificates are lost: unstable ReLUs per layer over θ sub-boxes of one image.

For a homogeneous network (``DetectorConfig.arch``) every ReLU keeps its sign over a θ box in
which no pixel clips, so the forward-mode bound is exact; this bench shows, per layer, how many
ReLUs the engine finds unstable on chosen sub-boxes, the relaxation radius reaching the
logits, the effect of clip generators (``ImageEncoding.forms(generators=G)``), and the
same in clip-threshold coordinates (``ImageEncoding.threshold_forms``).

    python bench/bench_relu_stability.py --model models/default --generators 0,16

Prints a markdown table (no file is written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from bench_certify import test_images  # noqa: E402

from usn_perception.bounds.forms import form_range  # noqa: E402
from usn_perception.bounds.inputs import ImageEncoding  # noqa: E402
from usn_perception.bounds.layers import CompiledNetwork, ReluOp, compile_network  # noqa: E402
from usn_perception.bounds.propagate import propagate  # noqa: E402
from usn_perception.detector import load_detector  # noqa: E402

BOXES = {
    'node box': (0.95, 1.05, -0.03, 0.03),
    'node, beta >= 0': (0.95, 1.05, 0.0, 0.03),
    'node, beta <= 0': (0.95, 1.05, -0.03, 0.0),
    'node, beta in [-0.0075, 0]': (0.95, 1.05, -0.0075, 0.0),
    'offline, alpha <= 1, beta >= 0': (0.8, 1.0, 0.0, 0.1),
    'offline, beta >= 0': (0.8, 1.2, 0.0, 0.1),
}


#: (τ, κ) sub-boxes (clip-threshold coordinates, bounds.thresholds) inside the node box's
#: cover τ ∈ [−0.0316, 0.0316], κ ∈ [0.924, 1.084]; cells of one 8-bit level in τ.
THRESHOLD_BOXES = {
    'node cover': (-0.0316, 0.0316, 0.924, 1.084),
    'tau <= 0 (beta >= 0)': (-0.0316, 0.0, 0.924, 1.084),
    'tau in [0, 1/255]': (0.0, 1 / 255, 0.924, 1.084),
    'tau in [2/255, 3/255]': (2 / 255, 3 / 255, 0.924, 1.084),
}


def layer_profile(net: CompiledNetwork, enc: ImageEncoding, box: torch.Tensor,
                  generators: int, thresholds: bool = False) -> tuple[list[int], float]:
    """Unstable ReLUs before each ReLU layer, and the radius left at the logits."""
    if thresholds:
        centre, radius = enc.threshold_forms(box)
    else:
        centre, radius = enc.forms(box, generators)
    cuts = [i for i, op in enumerate(net.ops) if isinstance(op, ReluOp)]
    counts, start = [], 0
    for cut in cuts + [len(net.ops)]:
        part = CompiledNetwork(net.ops[start:cut], net.input_shape, net.output_shape,
                               net.max_numel)
        centre, radius, _ = propagate(part, centre, radius, box)
        if cut == len(net.ops):
            break
        lo, hi = form_range(centre, box)
        lo, hi = lo - radius[:, 0], hi + radius[:, 0]
        counts.append(int(((lo < -1e-9) & (hi > 1e-9)).sum()))  # ignore exact zeros' rounding
        relu = CompiledNetwork(net.ops[cut:cut + 1], net.input_shape, net.output_shape,
                               net.max_numel)
        centre, radius, _ = propagate(relu, centre, radius, box)
        start = cut + 1
    return counts, float(radius.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default=str(REPO / 'models' / 'default'))
    ap.add_argument('--size', default='384x288')
    ap.add_argument('--image', type=int, default=0, help='which synthetic test render')
    ap.add_argument('--generators', default='0')
    ap.add_argument('--threads', type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    det = load_detector(args.model)
    w, h = (int(v) for v in args.size.split('x'))
    image = test_images(args.image + 1, (w, h))[args.image]
    enc = ImageEncoding(image, det.config.input_size)
    net = compile_network(det.net, enc.shape)
    print(f'model {args.model} (arch {det.config.arch}), synthetic test render {args.image}, '
          f'{w}x{h}; pixels at 0: {float(np.mean(image == 0)):.3f}, at 255: '
          f'{float(np.mean(image == 255)):.3f}\n')
    print('| sub-box (α_lo, α_hi, β_lo, β_hi) | G | unstable ReLUs per layer | '
          'logit radius |\n|---|---|---|---|')
    for name, row in BOXES.items():
        box = torch.tensor([row], dtype=torch.float64)
        for g in (int(v) for v in args.generators.split(',')):
            counts, rad = layer_profile(net, enc, box, g)
            print(f'| {name} {row} | {g} | {", ".join(map(str, counts))} | {rad:.3g} |')
    print('\n| (τ, κ) sub-box (τ_lo, τ_hi, κ_lo, κ_hi) | unstable ReLUs per layer | '
          'logit radius |\n|---|---|---|')
    for name, row in THRESHOLD_BOXES.items():
        box = torch.tensor([row], dtype=torch.float64)
        counts, rad = layer_profile(net, enc, box, 0, thresholds=True)
        print(f'| {name} {tuple(round(v, 4) for v in row)} | {", ".join(map(str, counts))} | '
              f'{rad:.3g} |')


if __name__ == '__main__':
    main()
