"""Where the node's level-node certificates lose: the radius against the true deviation.

At level nodes (``docs/certification.md``, "Level nodes") the network is exact at every
node and a radius r bounds, per neuron, how far the value strays from the interpolant of the
nodes in between. This script measures, on frames of ``bench_node.py``'s stream over the Θ
the node measures (as ``bench_node_tightness.py`` does):

* the true deviation of the logits from that interpolant (the network run at ``--samples``
  points inside every segment), against the radius with one row for all segments (the
  node's) and with one row per segment, on the cells of each keypoint's local-centroid window;
* per ReLU layer, the chord gaps of its neurons that change sign inside a segment, pushed to
  those cells once through |W| (what the radius does) and once through the signed weights
  with the masks of the segment's midpoint (what they really do, to first order);
* the ceiling: the tightness the readout bound would give with a radius c times the true
  deviation (not sound: a measurement of what a tighter radius could buy), with one leaf
  (the node's) or one leaf per segment.

    python bench/bench_level_radius.py --scenes 0,1 --frames 2 --out bench/results_level_radius.md

Single-thread, one process. Tightness as in ``bench_certify.py`` (half-perimeters, image px).
"""

from __future__ import annotations

import argparse
import platform
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_certify import Report, ratios  # noqa: E402
from bench_node_tightness import NodeStream, _widths, add_stream_options  # noqa: E402

from usn_perception.bounds import levels  # noqa: E402
from usn_perception.bounds.attack import empirical_range  # noqa: E402
from usn_perception.bounds.free import free_radius, tau_reach  # noqa: E402
from usn_perception.bounds.inputs import ImageEncoding  # noqa: E402
from usn_perception.bounds.layers import AffineOp, LinearOp, compile_network  # noqa: E402
from usn_perception.bounds.split import RefineResult  # noqa: E402
from usn_perception.bounds.thresholds import threshold_row  # noqa: E402
from usn_perception.certify import READOUT_BOUNDS, _to_pixels  # noqa: E402
from usn_perception.detector import load_detector  # noqa: E402
from usn_perception.readout import LOCAL_RADIUS, cell_grid  # noqa: E402

#: Multiples of the true deviation tried as a radius for the ceiling.
CEILING = (1.0, 2.0, 10.0)


def _window_cells(logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keypoint, cell) indices of the local-centroid window around each keypoint's argmax."""
    ks, cs = [], []
    height = logits.shape[-1] // width
    for k, peak in enumerate(logits.argmax(-1).tolist()):
        pu, pv = peak % width, peak // width
        for dv in range(-LOCAL_RADIUS, LOCAL_RADIUS + 1):
            for du in range(-LOCAL_RADIUS, LOCAL_RADIUS + 1):
                if 0 <= pu + du < width and 0 <= pv + dv < height:
                    ks.append(k)
                    cs.append((pv + dv) * width + pu + du)
    return torch.tensor(ks), torch.tensor(cs)


def _nodal_inputs(enc: ImageEncoding, points: torch.Tensor, axis: int) -> torch.Tensor:
    """(G, 1, H, W) float64 network inputs at the points (unshifted, as the nodes run)."""
    lo, hi = float(enc.values.min()), float(enc.values.max())
    if axis == levels.KAPPA:
        return enc.threshold_inputs(torch.full_like(points, lo), points, shift=False)
    return enc.threshold_inputs(points, torch.full_like(points, hi), shift=False)


def _true_deviation(net, inputs: torch.Tensor, logits: torch.Tensor,
                    samples: int) -> torch.Tensor:
    """(G − 1, K, P) largest |logit − interpolant| over ``samples`` points of each segment."""
    fr = torch.linspace(0.0, 1.0, samples, dtype=torch.float64)
    out = torch.zeros((inputs.shape[0] - 1, *logits.shape[1:]), dtype=torch.float64)
    for s in range(inputs.shape[0] - 1):
        w = fr.view(-1, 1, 1, 1)
        x = (1 - w) * inputs[s:s + 1] + w * inputs[s + 1:s + 2]
        got = net.forward(x).flatten(2)
        chord = (1 - fr).view(-1, 1, 1) * logits[s] + fr.view(-1, 1, 1) * logits[s + 1]
        out[s] = (got - chord).abs().amax(0)
    return out


def _gap_reach(net, inputs: torch.Tensor, ks: torch.Tensor, cs: torch.Tensor) -> list[tuple]:
    """Per ReLU layer: (mixed neurons, |W| reach, signed reach): means over the cells, medians
    over the segments.

    A neuron with node values a < 0 < b gets the chord gap |a|·b / (|a| + b); the gaps of one
    layer are pushed to the logits through |W| with the nodes' on/off masks (the radius's
    way) and through W with the masks of the segment's midpoint (their first-order effect).
    """
    traces = [net.trace(inputs[j:j + 1]) for j in range(inputs.shape[0])]
    mids = [net.trace(0.5 * (inputs[j:j + 1] + inputs[j + 1:j + 2]))
            for j in range(inputs.shape[0] - 1)]
    rows = []
    for i, op in enumerate(net.ops):
        if isinstance(op, (LinearOp, AffineOp)):
            continue
        mixed, by_abs, by_sign = [], [], []
        for s in range(inputs.shape[0] - 1):
            a, b = traces[s][i - 1], traces[s + 1][i - 1]
            ab = a * b
            gap = (ab.abs() - ab) / (a.abs() + b.abs()).clamp(min=1e-300) * 0.5
            mixed.append(int((gap > 0).sum()))
            r_abs, r_sign = gap.clone(), gap.clone()
            for j in range(i + 1, len(net.ops)):
                nxt = net.ops[j]
                if isinstance(nxt, LinearOp):
                    r_abs = nxt.apply(r_abs) if nxt.nonneg else nxt.apply_abs(r_abs)
                    r_sign = nxt.apply(r_sign)
                elif isinstance(nxt, AffineOp):
                    r_abs, r_sign = r_abs * nxt.scale.abs(), r_sign * nxt.scale
                else:
                    live = (traces[s][j - 1] > 0) | (traces[s + 1][j - 1] > 0)
                    r_abs = r_abs * live
                    r_sign = r_sign * (mids[s][j - 1] > 0)
            by_abs.append(float(r_abs.flatten(2)[0][ks, cs].mean()))
            by_sign.append(float(r_sign.flatten(2)[0][ks, cs].abs().mean()))
        rows.append((op.name, float(np.median(mixed)), float(np.median(by_abs)),
                     float(np.median(by_sign))))
    return rows


def _tightness(det, img, root, points, axis, logits, radius, leaves, *, net, enc, grid,
               emp) -> float:
    """Median tightness of the readout bound on these leaves (hull over them, image px)."""
    part, centre, rad = levels.leaf_forms(root, points, axis, logits, radius, leaves)
    rad = rad + tau_reach(part, free_radius(net, enc))[:, None]
    bounds = READOUT_BOUNDS['local-centroid'](centre, rad, part, grid)
    boxes = _to_pixels(det, img.shape, RefineResult(part, bounds, 1, 1, 'budget'))
    return float(np.median(ratios(_widths(boxes), emp)))


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and write the Markdown report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stream_options(ap, frames=2)
    ap.add_argument('--samples', type=int, default=33,
                    help='network runs per segment for the true deviation')
    ap.add_argument('--out', type=Path, help='write the Markdown report here')
    args = ap.parse_args(argv)
    if args.samples < 2:
        ap.error('--samples must be at least 2 (the segment ends)')
    torch.set_num_threads(1)
    stream = NodeStream.from_args(args)
    det = load_detector(args.model)
    grid = cell_grid(*det.config.heatmap_size[::-1])
    say = Report()
    say('# Level nodes: the radius against the true deviation')
    say()
    say(f'Command: `python bench/{Path(__file__).name} {" ".join(argv or sys.argv[1:])}`  ')
    say(f'Machine: {platform.machine()}, torch {torch.__version__}, 1 thread  ')
    say(f'Model: `{det.source}` ({det!r}); stream: {stream.describe()}; cells: the '
        f'(2·{LOCAL_RADIUS} + 1)² window around each keypoint\'s argmax')
    say()
    say('| scene | frame | segments | true dev. (median) | one-row radius ÷ true | '
        'per-segment radius ÷ true | node tightness | per-segment rows and leaves | '
        + ' | '.join(f'{c:g}× true, 1 leaf | {c:g}× true, per segment' for c in CEILING)
        + ' |')
    say('|' + '---|' * (8 + 2 * len(CEILING)))
    layers: dict[str, list[tuple]] = {}
    for scene, i, img, result in stream.picked(det, args.scenes, args.frames):
        box = result.interval.as_box()
        enc = ImageEncoding(img, det.config.input_size, det.device)
        net = compile_network(det.net, enc.shape)
        root = threshold_row(box)[0]
        axis = levels.level_axis(root, enc.values, enc.value_weights)
        if axis is None:
            say(f'| {scene} | {i} | both thresholds clip (or neither): no level nodes |')
            continue
        nodes = levels.level_nodes(root, enc.values, enc.value_weights, axis)
        points, _ = levels.evaluation_points(nodes, enc.values, enc.value_weights, axis)
        segments = points.shape[0] - 1
        trace = det.run(img, trace=True).trace
        with torch.inference_mode():
            one = levels.level_logits(net, enc, points, axis, nominal=trace,
                                      group=torch.zeros(segments, dtype=torch.long))
            each = levels.level_logits(net, enc, points, axis, nominal=trace)
            # Symmetric radii (offset folded in), as the readout bounds once took them.
            logits = one.logits
            r_one, r_each = (x.radius + x.offset.abs() for x in (one, each))
            inputs = _nodal_inputs(enc, points, axis)
            true = _true_deviation(net, inputs, logits, args.samples)
            ks, cs = _window_cells(logits[0], det.config.heatmap_size[0])
            for row in _gap_reach(net, inputs, ks, cs):
                layers.setdefault(row[0], []).append(row[1:])
        emp = empirical_range(det, img, box).widths
        floor = torch.finfo(torch.float64).tiny

        tight = partial(_tightness, det, img, root, points, axis, logits, net=net,
                        enc=enc, grid=grid, emp=emp)
        t_cells = true[:, ks, cs]
        cells = [f' {tight(c * true, 1):.3g} | {tight(c * true, None):.3g} |'
                 for c in CEILING]
        say(f'| {scene} | {i} | {segments} | {float(t_cells.median()):.2g} | '
            f'{float((r_one[:, ks, cs] / t_cells.clamp(min=floor)).median()):.3g} | '
            f'{float((r_each[:, ks, cs] / t_cells.clamp(min=floor)).median()):.3g} | '
            f'**{tight(r_one, 1):.3g}** | {tight(r_each, None):.3g} |' + ''.join(cells))
    say()
    say('Per ReLU layer, the chord gaps of its neurons that change sign inside a segment, '
        'pushed to the window cells (mean over the cells; median over segments and frames):')
    say()
    say('| ReLU | mixed neurons per segment | through \\|W\\| (the radius) | signed, midpoint '
        'masks | ratio |')
    say('|---|---|---|---|---|')
    for name, rows in layers.items():
        mixed, by_abs, by_sign = (float(np.median([r[j] for r in rows])) for j in range(3))
        ratio = by_abs / by_sign if by_sign > 0 else float('nan')
        say(f'| {name} | {mixed:.0f} | {by_abs:.2g} | {by_sign:.2g} | {ratio:.3g} |')
    if args.out:
        say.write(args.out)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
