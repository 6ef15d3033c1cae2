"""Stream synthetic camera frames into the node and measure what comes back (skeleton).

Starts ``usn_perception.ros.node`` as a separate process with the package's parameter file,
publishes WxH mono8 frames at a fixed rate on loopback DDS, and reports: the fraction of frames
that got a ``~/keypoints`` message, the fraction of keypoints certified, the publish → receipt
latency (p50/p95), the node's CPU use, and its RSS curve. Source ``env.sh`` first (loopback
DDS); the script refuses to run otherwise.

    python bench/bench_node.py --model models/default --seconds 20 --rate 30 --size 640x480

Not yet done here: the issue-5 targets, the 10,000-frame memory run and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _proc_sample(pid: int) -> tuple[float, int]:
    """(CPU seconds used, RSS bytes) of a process, from /proc."""
    fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    ticks = os.sysconf('SC_CLK_TCK')
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf('SC_PAGE_SIZE')
    return cpu, rss


def _frames(width: int, height: int, n: int = 30) -> list[bytes]:
    """A short loop of textured frames with a slow brightness/contrast swing."""
    rng = np.random.default_rng(0)
    base = rng.random((height, width)) * 0.6 + 0.2
    out = []
    for i in range(n):
        alpha, beta = 1 + 0.1 * np.sin(2 * np.pi * i / n), 0.05 * np.cos(2 * np.pi * i / n)
        out.append((np.clip(alpha * base + beta, 0, 1) * 255).astype(np.uint8).tobytes())
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark and print a JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--model', default='', help='model .json/directory ("" = shipped default)')
    ap.add_argument('--seconds', type=float, default=10.0)
    ap.add_argument('--rate', type=float, default=30.0)
    ap.add_argument('--size', default='640x480')
    ap.add_argument('--param', action='append', default=[], help='extra -p name:=value')
    ap.add_argument('--rss-csv', type=Path, help='write the RSS curve here')
    args = ap.parse_args(argv)
    if os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE') != 'LOCALHOST':
        print('source env.sh first (DDS must stay on loopback)', file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.split('x'))

    import rclpy
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, PointCloud2

    from usn_perception.ros.pointcloud import decode_keypoints

    cmd = [sys.executable, '-m', 'usn_perception.ros.node', '--ros-args', '--params-file',
           str(REPO / 'config' / 'usn_perception.yaml'), '-r', 'image:=/bench/image',
           '-p', f'model_path:={args.model}']
    for p in args.param:
        cmd += ['-p', p]
    node_proc = subprocess.Popen(cmd, cwd=REPO)
    rclpy.init()
    probe = Node('usn_bench')
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    pub = probe.create_publisher(Image, '/bench/image', qos)
    latencies: list[float] = []
    certified: list[float] = []
    received: set[int] = set()

    def on_keypoints(msg: PointCloud2) -> None:
        now = probe.get_clock().now().nanoseconds
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        latencies.append((now - stamp) * 1e-6)
        received.add(stamp)
        certified.append(float(decode_keypoints(msg).certified.mean()))

    probe.create_subscription(PointCloud2, '/usn_perception/keypoints', on_keypoints, qos)
    frames = _frames(width, height)
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
    sent[0] = 0
    received.clear()
    latencies.clear()
    certified.clear()
    probe.create_timer(1.0 / args.rate, publish)
    cpu0, _ = _proc_sample(node_proc.pid)
    t0 = time.monotonic()
    rss_curve: list[tuple[float, int]] = []
    next_sample = t0
    while time.monotonic() - t0 < args.seconds and node_proc.poll() is None:
        rclpy.spin_once(probe, timeout_sec=0.01)
        if time.monotonic() >= next_sample:
            rss_curve.append((time.monotonic() - t0, _proc_sample(node_proc.pid)[1]))
            next_sample += 1.0
    for _ in range(20):  # collect late outputs
        rclpy.spin_once(probe, timeout_sec=0.05)
    elapsed = time.monotonic() - t0
    cpu1, rss = _proc_sample(node_proc.pid)
    node_proc.terminate()
    node_proc.wait(timeout=20)
    probe.destroy_node()
    rclpy.shutdown()

    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    summary = {
        'frames_sent': sent[0], 'frames_answered': len(received),
        'answered_fraction': len(received) / max(1, sent[0]),
        'certified_fraction': float(np.mean(certified)) if certified else 0.0,
        'latency_p50_ms': float(np.nanpercentile(lat, 50)),
        'latency_p95_ms': float(np.nanpercentile(lat, 95)),
        'node_cpu_percent': 100.0 * (cpu1 - cpu0) / elapsed,
        'rss_mb_first_last': [rss_curve[0][1] / 2**20 if rss_curve else None, rss / 2**20],
        'size': [width, height], 'rate_hz': args.rate, 'seconds': elapsed,
    }
    if args.rss_csv:
        rows = ''.join(f'{t:.1f},{r}\n' for t, r in rss_curve)
        args.rss_csv.write_text('t_s,rss_bytes\n' + rows)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
