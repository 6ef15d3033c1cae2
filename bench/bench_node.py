"""Stream synthetic camera frames into the node and measure what comes back.

Starts ``usn_perception.ros.node`` as a separate process with the package's parameter file,
publishes WxH mono8 frames at a fixed rate on loopback DDS, and reports: the fraction of frames
that got a ``~/keypoints`` message, the fraction of keypoints certified, the publish → receipt
latency (p50/p95), the node's CPU use and memory curve (PSS; its worker processes
included). Source ``env.sh`` first (loopback DDS); the script refuses to run otherwise.

    python bench/bench_node.py --model models/default --seconds 20 --rate 30 --size 640x480
    python bench/bench_node.py --frames 10000 --rss-csv rss.csv --rss-png rss.png   # memory run
    python bench/bench_node.py --cpu-hogs 1 --param num_threads:=2   # another busy process

Frames are renders of the 5-dot target (held-out test backgrounds) under a scripted
brightness/contrast swing α = 1 + a·sin(2πt/T), β = b·cos(2πt/T) (``--swing a,b,T``), so the
node detects and certifies real keypoints. The default is one scene (``--scene``) under a
slow swing (a camera's auto-exposure drift, about the node-sized box of issue 3 once the node
adds its margins); ``--scenes 3 --swing 0.1,0.05,1`` is the earlier stream, which cuts between
three scenes and swings ±10 % within every one-second window, so the measured Θ covers scene cuts
too. Besides the fraction of keypoints with status CERTIFIED, the summary gives the fraction
whose box is also at most ``--width-px`` wide on both axes (a vacuous box is CERTIFIED too
when ``certify.max_width_px`` is 0). The memory verdict compares the median memory of the
first and the last tenth of the run (after warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (the node's worker processes), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f'/proc/{p}/task').glob('*/children'):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return out


def _pss(pid: int) -> int | None:
    """Proportional set size (bytes): shared pages split between the processes mapping them."""
    try:
        for line in Path(f'/proc/{pid}/smaps_rollup').read_text().splitlines():
            if line.startswith('Pss:'):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _proc_sample(pid: int) -> tuple[float, int]:
    """(CPU seconds used, memory bytes) of a process and its descendants, from /proc.

    Memory is the PSS summed over the tree (the node's worker processes share torch's
    libraries: summed RSS would count those pages once per process), RSS where the kernel
    gives no PSS.
    """
    ticks = os.sysconf('SC_CLK_TCK')
    cpu, mem = 0.0, 0
    for p in _process_tree(pid):
        try:
            fields = Path(f'/proc/{p}/stat').read_text().rsplit(')', 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        cpu += (int(fields[11]) + int(fields[12])) / ticks
        pss = _pss(p)
        mem += pss if pss is not None else int(fields[21]) * os.sysconf('SC_PAGE_SIZE')
    return cpu, mem


def _frames(width: int, height: int, n: int = 30, *, scenes: int = 3, first: int = 0,
            swing: tuple[float, float] = (0.1, 0.05)) -> list[bytes]:
    """One period of ``n`` target renders under the swing, cutting between ``scenes`` scenes.

    Scenes ``first`` … ``first + scenes − 1`` (scene i: held-out test background i, the same
    render whatever ``first`` is); mono8 bytes, in loop order.
    """
    from usn_perception.data.synthetic import SPLIT_BACKGROUNDS, render_sample
    from usn_perception.preprocess import image_to_float, to_gray

    rng = np.random.default_rng(0)
    names = SPLIT_BACKGROUNDS['test']
    bases = [to_gray(image_to_float(render_sample(rng, names[i % len(names)],
                                                  (width, height)).image))
             for i in range(first + scenes)][first:]
    amp_a, amp_b = swing
    out = []
    for i in range(n):
        phase = 2 * np.pi * i / n
        alpha, beta = 1 + amp_a * np.sin(phase), amp_b * np.cos(phase)
        base = bases[i * len(bases) // n]
        out.append((np.clip(alpha * base + beta, 0, 1) * 255).round().astype(np.uint8).tobytes())
    return out


class MemorySampler(threading.Thread):
    """Samples the node tree's memory every ``period`` seconds, beside the receiving loop.

    Reading ``smaps_rollup`` walks every page table of the node and its workers (20-35 ms for
    the three processes): done in the loop that receives the node's outputs, it held back the
    frames arriving meanwhile (about one in thirty, +15 ms each). File reads release the
    interpreter lock, so on its own thread it delays nothing the bench measures.
    """

    def __init__(self, pid: int, period: float = 1.0) -> None:
        super().__init__(name='memory-sampler', daemon=True)
        self.pid, self.period = pid, period
        self.curve: list[tuple[float, int]] = []
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        """Sample until stopped (the first sample at once)."""
        while True:
            self.curve.append((time.monotonic() - self._t0, _proc_sample(self.pid)[1]))
            if self._done.wait(self.period):
                return

    def stop(self) -> list[tuple[float, int]]:
        """Stop sampling; the curve: (seconds since start, bytes)."""
        self._done.set()
        self.join()
        return self.curve


def stage_medians(windows: list[dict[str, float]]) -> dict[str, float]:
    """Each statistic's median over the /diagnostics windows that report it."""
    keys = sorted({k for w in windows for k in w})
    return {k: round(float(np.median([w[k] for w in windows if k in w])), 2) for k in keys}


def rss_growth(curve: list[tuple[float, int]]) -> dict:
    """Median RSS (MB) of the first and last tenth of the samples, and their difference."""
    rss = np.asarray([r for _, r in curve], dtype=np.float64) / 2**20
    if rss.size < 10:
        return {'first_mb': None, 'last_mb': None, 'growth_mb': None}
    k = max(1, rss.size // 10)
    first, last = float(np.median(rss[:k])), float(np.median(rss[-k:]))
    return {'first_mb': first, 'last_mb': last, 'growth_mb': last - first,
            'min_mb': float(rss.min()), 'max_mb': float(rss.max())}


def plot_rss(curve: list[tuple[float, int]], path: Path, title: str) -> None:
    """The RSS curve as a PNG."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    t = [c[0] for c in curve]
    rss = [c[1] / 2**20 for c in curve]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(t, rss, lw=1)
    ax.set_xlabel('time since warm-up (s)')
    ax.set_ylabel('node memory, PSS with workers (MB)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark and print a JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--model', default='', help='model .json/directory ("" = shipped default)')
    ap.add_argument('--seconds', type=float, default=10.0)
    ap.add_argument('--rate', type=float, default=30.0)
    ap.add_argument('--size', default='640x480')
    ap.add_argument('--param', action='append', default=[], help='extra -p name:=value')
    ap.add_argument('--frames', type=int, default=0,
                    help='stop after this many frames instead of --seconds')
    ap.add_argument('--scenes', type=int, default=1, help='scenes the stream cuts between')
    ap.add_argument('--scene', type=int, default=0, help='first scene (0, 1, 2, …)')
    ap.add_argument('--swing', default='0.03,0.01,10',
                    help='a,b,T: α = 1 + a·sin(2πt/T), β = b·cos(2πt/T), T in seconds')
    ap.add_argument('--width-px', type=float, default=10.0,
                    help='a certified box counts as "within" when no wider than this')
    ap.add_argument('--cpu-hogs', type=int, default=0,
                    help='busy-loop processes running during the measurement (other load '
                         'on the machine, e.g. 1 on two cores)')
    ap.add_argument('--mem-every', type=float, default=1.0,
                    help='seconds between memory samples (each walks the page tables of the '
                         'node and its workers)')
    ap.add_argument('--rss-csv', type=Path, help='write the RSS curve here')
    ap.add_argument('--rss-png', type=Path, help='plot the RSS curve here')
    args = ap.parse_args(argv)
    if not args.mem_every > 0:
        ap.error(f'--mem-every must be positive, got {args.mem_every}')
    if os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE') != 'LOCALHOST':
        print('source env.sh first (DDS must stay on loopback)', file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.split('x'))
    amp_a, amp_b, period = (float(v) for v in args.swing.split(','))

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, PointCloud2

    from usn_perception.ros.diagnostics import status_values
    from usn_perception.ros.pointcloud import decode_keypoints

    cmd = [sys.executable, '-m', 'usn_perception.ros.node', '--ros-args', '--params-file',
           str(REPO / 'config' / 'usn_perception.yaml'), '-r', 'image:=/bench/image']
    if args.model:  # rcl cannot parse an empty override; the YAML's default is the shipped one
        cmd += ['-p', f'model_path:={args.model}']
    for p in args.param:
        cmd += ['-p', p]
    node_proc = subprocess.Popen(cmd, cwd=REPO)
    rclpy.init()
    probe = Node('usn_bench')
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    pub = probe.create_publisher(Image, '/bench/image', qos)
    latencies: list[float] = []
    certified: list[float] = []
    within: list[float] = []
    widths: list[float] = []
    received: set[int] = set()

    def on_keypoints(msg: PointCloud2) -> None:
        now = probe.get_clock().now().nanoseconds
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        latencies.append((now - stamp) * 1e-6)
        received.add(stamp)
        kps = decode_keypoints(msg)
        ok = kps.certified
        wide = np.maximum(kps.boxes[:, 1] - kps.boxes[:, 0], kps.boxes[:, 3] - kps.boxes[:, 2])
        certified.append(float(ok.mean()))
        within.append(float((ok & (wide <= args.width_px)).mean()))
        widths.extend(wide[ok].tolist())

    probe.create_subscription(PointCloud2, '/usn_perception/keypoints', on_keypoints, qos)
    # The node's own per-stage latencies, one dict per /diagnostics period (1 s).
    stage_windows: list[dict[str, float]] = []

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith('usn_perception'):
                window = {k[len('latency_'):]: float(v)
                          for k, v in status_values(status).items()
                          if k.startswith('latency_')}
                if window:
                    stage_windows.append(window)

    probe.create_subscription(DiagnosticArray, '/diagnostics', on_diagnostics, 10)
    frames = _frames(width, height, max(1, round(period * args.rate)), scenes=args.scenes,
                     first=args.scene, swing=(amp_a, amp_b))
    sent = [0]
    template = Image(height=height, width=width, encoding='mono8', step=width)
    template.header.frame_id = 'bench'

    def publish() -> None:
        msg = template
        msg.data = frames[sent[0] % len(frames)]
        msg.header.stamp = probe.get_clock().now().to_msg()
        pub.publish(msg)
        sent[0] += 1

    # Wait for the node to come up (its first output), then measure.
    warm_deadline = time.monotonic() + 120.0
    while not received and time.monotonic() < warm_deadline and node_proc.poll() is None:
        publish()
        rclpy.spin_once(probe, timeout_sec=0.2)
    if node_proc.poll() is not None or not received:
        node_proc.kill()
        print(f'the node did not come up (exit code {node_proc.poll()})', file=sys.stderr)
        return 1
    sent[0] = 0
    received.clear()
    stage_windows.clear()
    latencies.clear()
    certified.clear()
    within.clear()
    widths.clear()
    hogs = [subprocess.Popen([sys.executable, '-c', 'while True: pass'])
            for _ in range(max(0, args.cpu_hogs))]
    try:
        probe.create_timer(1.0 / args.rate, publish)
        cpu0, _ = _proc_sample(node_proc.pid)
        t0 = time.monotonic()
        sampler = MemorySampler(node_proc.pid, args.mem_every)
        sampler.start()

        def running() -> bool:
            if args.frames:
                return sent[0] < args.frames
            return time.monotonic() - t0 < args.seconds

        while running() and node_proc.poll() is None:
            rclpy.spin_once(probe, timeout_sec=0.01)
        rss_curve = sampler.stop()
        for _ in range(20):  # collect late outputs
            rclpy.spin_once(probe, timeout_sec=0.05)
        elapsed = time.monotonic() - t0
    except BaseException:  # never leave the node behind either
        node_proc.kill()
        raise
    finally:  # never leave a busy loop behind
        for hog in hogs:
            hog.kill()
            hog.wait()
    cpu1, rss = _proc_sample(node_proc.pid)
    alive = node_proc.poll() is None
    node_proc.terminate()
    node_proc.wait(timeout=20)
    probe.destroy_node()
    rclpy.shutdown()

    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    summary = {
        'frames_sent': sent[0], 'frames_answered': len(received),
        'answered_fraction': len(received) / max(1, sent[0]),
        'certified_fraction': float(np.mean(certified)) if certified else 0.0,
        f'certified_within_{args.width_px:g}px_fraction':
            float(np.mean(within)) if within else 0.0,
        'certified_width_px_p50': float(np.median(widths)) if widths else None,
        'stream': {'scenes': args.scenes, 'first_scene': args.scene, 'swing_alpha': amp_a,
                   'swing_beta': amp_b, 'period_s': period},
        'latency_p50_ms': float(np.nanpercentile(lat, 50)),
        'latency_p95_ms': float(np.nanpercentile(lat, 95)),
        'node_cpu_percent': 100.0 * (cpu1 - cpu0) / elapsed,
        'rss_mb_first_last': [rss_curve[0][1] / 2**20 if rss_curve else None, rss / 2**20],
        'rss': rss_growth(rss_curve),
        'memory_metric': 'PSS of the node process and its workers (the "rss" keys keep their '
                         'names from before the workers)',
        'node_alive_at_end': alive,
        'size': [width, height], 'rate_hz': args.rate, 'seconds': elapsed,
        'cpu_hogs': max(0, args.cpu_hogs), 'params': list(args.param),
        'node_stage_ms': stage_medians(stage_windows),
        'node_stage_ms_is': 'per statistic, the median over the run of the node\'s 1-s '
                            '/diagnostics windows (each window: p50 / p95 of its frames)',
    }
    if args.rss_csv:
        rows = ''.join(f'{t:.1f},{r}\n' for t, r in rss_curve)
        args.rss_csv.write_text('t_s,rss_bytes\n' + rows)
    if args.rss_png and rss_curve:
        plot_rss(rss_curve, args.rss_png, f'{sent[0]} frames {width}x{height} at '
                 f'{args.rate:g} Hz')
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
