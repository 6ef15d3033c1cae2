"""Tightness of the node's own certificates, on the frames and Θ boxes the node measures.

``bench_certify.py`` measures tightness on test renders over a fixed node-sized box; this
script measures it where the node works: frames of ``bench_node.py``'s stream (a target render
under the slow brightness/contrast swing), each certified by :class:`FramePipeline` exactly as
a node worker does (Θ measured over the sliding window, the budget sized by time, the shipped
settings), against the empirical range over that frame's measured Θ (dense θ grid plus the
attack, :func:`~usn_perception.bounds.attack.empirical_range`). For reference the same frame
and Θ are also certified at fixed sub-box budgets without a time limit (``--budgets``), and at
fixed level work (``--works``: the ``Budget.level_work`` units the node sizes its plans in,
here without a time limit, so the plan each work buys is compared on the same frames
whatever the machine's speed) with the rows' bands only (``backward=False``), and with
``--backward-works`` the same with the local-centroid window's moments bounded backward
(:mod:`usn_perception.bounds.backward`, ``certify_keypoints``' default, which the node and
the fixed sub-box budgets use too).

    python bench/bench_node_tightness.py --scenes 0,1 --frames 4 --budgets 4,8,12,16,24 \\
        --works 16,19,22,25,28,31 --backward-works 7,10,13,16 \\
        --out bench/results_node_tightness.md

Tightness of a keypoint: half-perimeter of the certified box over that of the empirical one
(as in ``bench_certify.py``), both in image pixels. Times are single-thread, one process.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_certify import Report, ratios  # noqa: E402
from bench_node import _frames  # noqa: E402

from usn_perception.bounds.attack import empirical_range  # noqa: E402
from usn_perception.bounds.box import Budget  # noqa: E402
from usn_perception.certify import certify_keypoints  # noqa: E402
from usn_perception.detector import load_detector  # noqa: E402
from usn_perception.pipeline import FramePipeline, PipelineSettings  # noqa: E402

#: The shipped node's certification settings (config/usn_perception.yaml), less its
#: deadline: a frame processed alone here never waits for a worker, and a frame the deadline
#: cut would have no box to measure.
NODE_SETTINGS = PipelineSettings(budget_ms=40.0, max_width_px=20.0)


#: Frame rate of bench_node.py's stream.
RATE = 30.0


def add_stream_options(ap: argparse.ArgumentParser, frames: int) -> None:
    """The options of a bench on the node's own frames: the model and bench_node.py's stream."""
    ap.add_argument('--model', default='models/default')
    ap.add_argument('--scenes', default='0,1', help='bench_node.py scenes, comma-separated')
    ap.add_argument('--frames', type=int, default=frames, help='frames measured per scene')
    ap.add_argument('--size', default='640x480')
    ap.add_argument('--swing', default='0.03,0.01,10', help="as bench_node.py's --swing")


@dataclass(frozen=True)
class NodeStream:
    """bench_node.py's stream (one scene at a time) and the frames a bench measures on it."""

    width: int
    height: int
    swing: tuple[float, float]
    period: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NodeStream:
        """From the options of :func:`add_stream_options`."""
        width, height = (int(v) for v in args.size.split('x'))
        amp_a, amp_b, period = (float(v) for v in args.swing.split(','))
        return cls(width, height, (amp_a, amp_b), period)

    def describe(self) -> str:
        """One line for a report's header."""
        return (f'{self.width}x{self.height} mono8 at {RATE:g} Hz, swing α = 1 ± '
                f'{self.swing[0]:g}, β = ±{self.swing[1]:g} over {self.period:g} s')

    def picked(self, det, scenes: str, per_scene: int) -> Iterator[tuple]:
        """(scene, frame index, frame, the node pipeline's FrameResult) of the measured frames.

        Every frame of a scene goes through :class:`FramePipeline` with the node's settings,
        as a node worker runs it (Θ measured over the window); ``per_scene`` frames spread
        over one swing period from the third second on (the window has filled) are yielded.
        """
        n_stream = max(1, round(self.period * RATE))
        start = 2 * int(RATE)
        for scene in (int(s) for s in scenes.split(',')):
            frames = _frames(self.width, self.height, n_stream, scenes=1, first=scene,
                             swing=self.swing)
            pipe = FramePipeline(det, NODE_SETTINGS)
            picks = set(np.linspace(start, start + n_stream - 1, per_scene).round().astype(int))
            for i in range(start + n_stream):
                img = np.frombuffer(frames[i % n_stream], np.uint8).reshape(self.height,
                                                                            self.width)
                result = pipe.process(img, i / RATE)
                if i in picks:
                    yield scene, i, img, result


def _widths(boxes: np.ndarray) -> np.ndarray:
    """(K, 2) widths (x, y) of (K, 4) [u_lo, u_hi, v_lo, v_hi] boxes."""
    return np.stack([boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]], -1)


def _plan(stats: dict) -> str:
    """A level plan in a few characters: radius rows, 'o' with offset rows, 'm' merged rows."""
    if not stats.get('level_work'):
        return f'{stats.get("subboxes", 0)} sub-boxes'
    return (f'{stats.get("rows", stats["leaves"])}{"o" if stats.get("offset_rows") else ""}'
            f'{"m" if stats.get("merged_leaves") else ""} / {stats["level_nodes"]}')


def _ms(fn, *args) -> float:
    """Wall time of one call, in milliseconds."""
    t = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t) * 1e3


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and write the Markdown report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stream_options(ap, frames=4)
    ap.add_argument('--budgets', default='4,8,12,16,24',
                    help='fixed sub-box budgets (no time limit) to certify the same frames at')
    ap.add_argument('--works', default='',
                    help='fixed level work units (Budget.level_work, no time limit) to certify '
                         'the same frames at, comma-separated')
    ap.add_argument('--backward-works', default='',
                    help='the same with the window cells bounded backward too '
                         '(certify_keypoints(backward=True))')
    ap.add_argument('--out', type=Path, help='write the Markdown report here')
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    stream = NodeStream.from_args(args)
    budgets = [int(b) for b in args.budgets.split(',') if b]
    works = [(int(w), False) for w in args.works.split(',') if w]
    works += [(int(w), True) for w in args.backward_works.split(',') if w]
    if any(b < 1 for b in budgets) or any(w < 1 for w, _ in works):
        ap.error('--budgets, --works and --backward-works take positive integers')
    det = load_detector(args.model)
    say = Report()
    say('# Tightness of the node\'s certificates on its own frames')
    say()
    say(f'Command: `python bench/{Path(__file__).name} {" ".join(argv or sys.argv[1:])}`  ')
    say(f'Machine: {platform.machine()}, torch {torch.__version__}, 1 thread  ')
    say(f'Model: `{det.source}` ({det!r}); stream: {stream.describe()}; node settings: '
        f'budget_ms {NODE_SETTINGS.budget_ms:g}, shipped defaults otherwise')
    say()
    head = ('| scene | frame | measured Θ (α; β) | level nodes / rows | node certify ms | '
            'predict ms | node tightness | node box px | empirical px |'
            + ''.join(f' {b} sub-boxes | ms |' for b in budgets)
            + ''.join(f' work {w}{" + moments" if back else ""}: plan | tightness | ms |'
                      for w, back in works))
    say(head)
    say('|' + '---|' * (9 + 2 * len(budgets) + 3 * len(works)))
    summary: dict[str, list[float]] = {'node': []}
    summary.update({str(b): [] for b in budgets})
    summary.update({f'{"b" if back else "w"}{w}': [] for w, back in works})
    cost: dict[str, list[float]] = {k: [] for k in summary}
    for scene, i, img, result in stream.picked(det, args.scenes, args.frames):
        box = result.interval.as_box()
        emp = empirical_range(det, img, box).widths
        predict_ms = float(np.median([_ms(det.predict, img) for _ in range(5)]))
        node_r = ratios(_widths(result.boxes), emp)
        summary['node'].append(float(np.median(node_r)))
        cost['node'].append(result.timings_ms['certify'])
        cells = []
        for b in budgets:
            t = time.perf_counter()
            cert = certify_keypoints(det, img, box, budget=Budget(b))
            ms = (time.perf_counter() - t) * 1e3  # one run: these take 30-100 ms
            r = float(np.median(ratios(cert.widths, emp)))
            summary[str(b)].append(r)
            cost[str(b)].append(ms)
            cells.append(f' {r:.3g} | {ms:.0f} |')
        for w, back in works:
            t = time.perf_counter()
            cert = certify_keypoints(det, img, box, budget=Budget(1, max_ms=1e6, level_work=w),
                                     backward=back)
            ms = (time.perf_counter() - t) * 1e3
            r = float(np.median(ratios(cert.widths, emp)))
            key = f'{"b" if back else "w"}{w}'
            summary[key].append(r)
            cost[key].append(ms)
            cells.append(f' {_plan(cert.stats)} | {r:.3g} | {ms:.0f} |')
        say(f'| {scene} | {i} | [{box.alpha[0]:.3f}, {box.alpha[1]:.3f}]; '
            f'[{box.beta[0]:.3f}, {box.beta[1]:.3f}] | '
            f'{result.certify_stats.get("level_nodes", 0)} / '
            f'{result.certify_stats.get("rows", 0)} | '
            f'{result.timings_ms["certify"]:.1f} | {predict_ms:.1f} | '
            f'**{np.median(node_r):.3g}** | {np.median(_widths(result.boxes).max(1)):.3g} | '
            f'{np.median(emp.max(1)):.3g} |' + ''.join(cells))
    say()
    say('Median over frames (each frame: the median over its keypoints):')
    say()
    say('| budget | median tightness | certify ms (median) |')
    say('|---|---|---|')
    for key, vals in summary.items():
        label = ('node (time-sized)' if key == 'node' else
                 f'level work {key[1:]}, no time limit' if key.startswith('w') else
                 f'level work {key[1:]} + window moments, no time limit'
                 if key.startswith('b') else f'{key} sub-boxes, no time limit')
        say(f'| {label} | **{np.median(vals):.3g}** | {np.median(cost[key]):.0f} |')
    if args.out:
        say.write(args.out)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
