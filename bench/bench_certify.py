"""Tightness, speed and memory of certificates on a trained detector.

Tightness: per keypoint, (certified u-width + v-width) / (empirical u-width + v-width), the
empirical range coming from a dense θ grid plus the zooming search attack. Speed: certification
time at the node-sized box with the node budget, divided by plain ``predict`` time measured in
the same run (interleaved, median of repeats). Memory: peak RSS growth while certifying.

    python bench/bench_certify.py --model models/default --images 4 --threads 2

Writes a markdown summary (with this command line) to ``bench/results_certify.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from usn_perception.allocator import keep_freed_memory  # noqa: E402
from usn_perception.bounds.attack import empirical_range  # noqa: E402
from usn_perception.certify import (  # noqa: E402
    NODE_BUDGET,
    OFFLINE_BUDGET,
    Budget,
    PhotometricBox,
    certify_keypoints,
)
from usn_perception.detector import load_detector  # noqa: E402

OFFLINE_BOX = PhotometricBox((0.8, 1.2), (-0.1, 0.1))
NODE_BOX = PhotometricBox((0.95, 1.05), (-0.03, 0.03))
EMPIRICAL_FLOOR_PX = 1e-9


def test_images(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    """Procedural target renders on the held-out test backgrounds (deterministic)."""
    from usn_perception.data.synthetic import SPLIT_BACKGROUNDS, render_sample

    rng = np.random.default_rng(2024)
    names = SPLIT_BACKGROUNDS['test']
    return [render_sample(rng, names[i % len(names)], size).image for i in range(n)]


def ratios(cert_widths: np.ndarray, emp_widths: np.ndarray) -> np.ndarray:
    """(K,) per-keypoint tightness: half-perimeter of the certified / empirical box."""
    return cert_widths.sum(1) / np.maximum(emp_widths.sum(1), EMPIRICAL_FLOOR_PX)


class Report:
    """A Markdown report printed as it is written: ``report(line)``, then :meth:`write`."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = '') -> None:
        """Print one line and keep it."""
        print(line, flush=True)
        self.lines.append(line)

    def write(self, path: str | Path) -> None:
        """The whole report to ``path``."""
        Path(path).write_text('\n'.join(self.lines) + '\n')


def peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best.append(time.perf_counter() - t0)
    return float(np.median(best)), out


def memory_probe(model: str, size: tuple[int, int], threads: int) -> dict:
    """Peak RSS growth of certification alone, in a fresh process (MB)."""
    torch.set_num_threads(threads)
    det = load_detector(model)
    img = test_images(1, size)[0]
    det.predict(img)
    base = peak_rss_mb()
    certify_keypoints(det, img, NODE_BOX, budget=NODE_BUDGET)
    node = peak_rss_mb()
    certify_keypoints(det, img, OFFLINE_BOX, budget=OFFLINE_BUDGET)
    offline = peak_rss_mb()
    return {'baseline_mb': base, 'node_mb': node - base, 'offline_mb': offline - base}


def node_curve(det, images: list[np.ndarray], readout: str, budgets: str, say) -> None:
    """Node-box tightness and time against the sub-box budget (interleaved with predict)."""
    if not budgets:
        return
    emps = [empirical_range(det, img, NODE_BOX, readout=readout) for img in images]
    say('Node box, tightness against the budget (median over each image\'s keypoints, then '
        'over images; "pooled": over all keypoints):')
    say()
    say('| sub-boxes | level nodes | median tightness | pooled | per image | certify ms '
        '(median) | ÷ predict |')
    say('|---|---|---|---|---|---|---|')
    for b in (int(v) for v in budgets.split(',')):
        per, pooled, ms, ratio, nodes = [], [], [], [], []
        for img, emp in zip(images, emps, strict=True):
            def run(img=img, b=b):
                return certify_keypoints(det, img, NODE_BOX, readout=readout, budget=Budget(b))

            run()  # warm
            tp, _ = timed(lambda img=img: det.predict(img, readout=readout), 5)
            tc, cert = timed(run, 3)
            tp2, _ = timed(lambda img=img: det.predict(img, readout=readout), 5)
            r = ratios(cert.widths, emp.widths)
            per.append(float(np.median(r)))
            pooled.append(r)
            ms.append(tc * 1000)
            ratio.append(tc / (0.5 * (tp + tp2)))
            nodes.append(cert.stats['level_nodes'])
        say(f'| {b} | {"/".join(str(n) for n in nodes)} | **{np.median(per):.3g}** | '
            f'{np.median(np.concatenate(pooled)):.3g} | '
            f'{", ".join(f"{v:.3g}" for v in per)} | {np.median(ms):.0f} | '
            f'{np.median(ratio):.1f}x |')
    say()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--model', default=str(REPO / 'models' / 'default'))
    ap.add_argument('--images', type=int, default=4)
    ap.add_argument('--size', default='384x288', help='image WxH')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--readout', default=None)
    ap.add_argument('--offline-budgets', default='1,8,32,96')
    ap.add_argument('--scales', default='1e-5,1e-4,1e-3,1e-2,1',
                    help='node-box scale factors for the size sweep')
    ap.add_argument('--node-budgets', default='3,8,12,16',
                    help='sub-box budgets for the node-box tightness curve ("" = none)')
    ap.add_argument('--out', default=str(REPO / 'bench' / 'results_certify.md'))
    ap.add_argument('--memory-probe', action='store_true', help=argparse.SUPPRESS)
    args = ap.parse_args()
    keep_freed_memory()  # as the CLI does
    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.split('x'))
    if args.memory_probe:
        print(json.dumps(memory_probe(args.model, (w, h), args.threads)))
        return
    det = load_detector(args.model)
    readout = args.readout or det.readout
    images = test_images(args.images, (w, h))
    det.predict(images[0])
    say = Report()
    say('# Certification benchmark')
    say()
    say(f'Command: `python bench/bench_certify.py {" ".join(sys.argv[1:])}`  ')
    say(f'Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, '
        f'{args.threads} threads, {platform.python_version()}  ')
    say(f'Model: `{det.source}` ({det!r}), readout {readout}, {len(images)} test renders '
        f'{w}x{h}')
    say()

    # --- speed at the node box ---------------------------------------------------------
    say(f'## Node box α∈{list(NODE_BOX.alpha)}, β∈{list(NODE_BOX.beta)}, '
        f'budget {NODE_BUDGET}')
    say()
    say('| image | predict ms | certify ms | ratio | sub-boxes | median tightness |')
    say('|---|---|---|---|---|---|')
    node_ratio, node_tight, node_ms, node_pred = [], [], [], []
    for i, img in enumerate(images):
        certify_keypoints(det, img, NODE_BOX, readout=readout, budget=NODE_BUDGET)  # warm
        tp, _ = timed(lambda img=img: det.predict(img, readout=readout), 5)
        tc, cert = timed(lambda img=img: certify_keypoints(det, img, NODE_BOX, readout=readout,
                                                           budget=NODE_BUDGET), 3)
        tp2, _ = timed(lambda img=img: det.predict(img, readout=readout), 5)
        tp = 0.5 * (tp + tp2)
        emp = empirical_range(det, img, NODE_BOX, readout=readout)
        tight = float(np.median(ratios(cert.widths, emp.widths)))
        node_ratio.append(tc / tp)
        node_tight.append(tight)
        node_ms.append(tc * 1000)
        node_pred.append(tp * 1000)
        say(f'| {i} | {tp * 1000:.1f} | {tc * 1000:.0f} | {tc / tp:.1f} | '
            f'{cert.stats["subboxes"]} | {tight:.3g} |')
    say()
    say(f'Median: certify/predict **{np.median(node_ratio):.1f}x** '
        f'({np.median(node_ms):.0f} ms vs {np.median(node_pred):.1f} ms), tightness '
        f'**{np.median(node_tight):.3g}**')
    say()
    node_curve(det, images, readout, args.node_budgets, say)
    probe = subprocess.run([sys.executable, __file__, '--memory-probe', '--model', args.model,
                            '--size', args.size, '--threads', str(args.threads)],
                           capture_output=True, text=True, check=True)
    mem = json.loads(probe.stdout.strip().splitlines()[-1])
    say(f'Memory (fresh process, peak RSS growth over model + one predict at '
        f'{mem["baseline_mb"]:.0f} MB): node budget **{mem["node_mb"]:.0f} MB**, '
        f'offline budget **{mem["offline_mb"]:.0f} MB** per image')
    say()

    # --- tightness vs method / budget at the offline box ---------------------------------
    budgets = [int(b) for b in args.offline_budgets.split(',')]
    say(f'## Offline box α∈{list(OFFLINE_BOX.alpha)}, β∈{list(OFFLINE_BOX.beta)}')
    say()
    say('| method | sub-boxes | median tightness | p90 tightness | mean width px | '
        'mean empirical px | s / image |')
    say('|---|---|---|---|---|---|---|')
    emps = [empirical_range(det, img, OFFLINE_BOX, readout=readout) for img in images]
    runs = [('ibp', 1)] + [('forward', b) for b in budgets]
    for method, b in runs:
        rs, ws, ts = [], [], []
        for img, emp in zip(images, emps, strict=True):
            t0 = time.perf_counter()
            cert = certify_keypoints(det, img, OFFLINE_BOX, readout=readout, method=method,
                                     budget=Budget(b))
            ts.append(time.perf_counter() - t0)
            rs.append(ratios(cert.widths, emp.widths))
            ws.append(cert.widths.mean())
        r = np.concatenate(rs)
        say(f'| {method} | {b} | {np.median(r):.3g} | {np.quantile(r, 0.9):.3g} | '
            f'{np.mean(ws):.1f} | {np.mean([e.widths.mean() for e in emps]):.2f} | '
            f'{np.mean(ts):.2f} |')
    say()

    # --- where certificates become meaningful: box-size sweep ----------------------------
    say('## Box-size sweep (node box scaled about θ = (1, 0)), forward, 16 sub-boxes')
    say()
    say('| scale | α half-width | median tightness | mean width px | mean empirical px |')
    say('|---|---|---|---|---|')
    for f in (float(v) for v in args.scales.split(',')):
        box = NODE_BOX.scaled(f)
        rs, ws, es = [], [], []
        for img in images[:2]:
            emp = empirical_range(det, img, box, readout=readout, grid=9, rounds=2)
            cert = certify_keypoints(det, img, box, readout=readout, budget=Budget(16))
            rs.append(ratios(cert.widths, emp.widths))
            ws.append(cert.widths.mean())
            es.append(emp.widths.mean())
        say(f'| {f:g} | {0.05 * f:.2g} | {np.median(np.concatenate(rs)):.3g} | '
            f'{np.mean(ws):.3g} | {np.mean(es):.3g} |')
    say.write(args.out)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
