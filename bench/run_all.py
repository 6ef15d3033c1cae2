"""Run the headline benchmarks (``make bench``), each with the command docs/benchmarks.md gives.

Every benchmark is its own script and process (one torch thread, as documented), so one that
fails does not stop the others; the summary at the end names each, its exit status, its time
and where its results went, and the exit status is non-zero when any failed. The ones that need
data beyond the shipped models run only when it is given: ``--data`` (a COCO keypoints JSON,
e.g. ``W/data/test/annotations.json`` from ``usn-perception make-dataset``) for the
pruned-vs-unpruned certification time. The bag benchmark records its own bag from the ViSP
cache (fetching the frames when missing), so it runs only with ``--bag``.

    python bench/run_all.py --list
    python bench/run_all.py                      # certify + node + tightness (~25 minutes)
    python bench/run_all.py --only node-scene0 --only cert-time --data W/data/test/annotations.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / 'bench'


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its script, its arguments, what it needs and where its results go."""

    name: str
    argv: tuple[str, ...]
    results: str
    needs: str = ''  # '' | 'data' | 'bag'
    ros: bool = False
    stdout_to: str = ''  # write the script's stdout here (scripts that only print)


def benchmarks(data: str | None) -> list[Benchmark]:
    """The benchmarks, in the order they run; ``data`` fills in the dataset argument."""
    default, unpruned = 'models/default', 'models/unpruned'  # the scripts run in the repo root
    out = [
        Benchmark('certify', ('bench_certify.py', '--model', default, '--images', '4',
                              '--threads', '1', '--offline-budgets', '1,8,32,96,192',
                              '--out', 'bench/results_certify_default.md'),
                  'bench/results_certify_default.md'),
    ]
    for scene in (0, 1):
        out.append(Benchmark(f'node-scene{scene}',
                             ('bench_node.py', '--model', default, '--seconds', '15',
                              '--rate', '30', '--size', '640x480', '--scene', str(scene)),
                             f'bench/results_node_scene{scene}.json', ros=True,
                             stdout_to=f'bench/results_node_scene{scene}.json'))
    out.append(Benchmark('node-tightness', ('bench_node_tightness.py', '--model', default,
                                            '--scenes', '0,1', '--frames', '4', '--budgets',
                                            '4,8,12,16,24', '--works',
                                            '16,19,22,25,28,31', '--backward-works',
                                            '7,10,13,16', '--out',
                                            'bench/results_node_tightness.md'),
                         'bench/results_node_tightness.md'))
    out.append(Benchmark('level-radius', ('bench_level_radius.py', '--model', default,
                                          '--scenes', '0,1', '--frames', '2', '--out',
                                          'bench/results_level_radius.md'),
                         'bench/results_level_radius.md'))
    out.append(Benchmark('cert-time', ('bench_cert_time.py', '--model', default, '--model',
                                       unpruned, '--data', data or '<--data>', '--first', '20',
                                       '--count', '10', '--exact-values', '12', '--precision',
                                       'auto,float64', '--out', 'bench/results_cert_time.md'),
                         'bench/results_cert_time.md', needs='data'))
    out.append(Benchmark('bag', ('bench_bag.py', '--model', default, '--markdown',
                                 'bench/results_bag.md'), 'bench/results_bag.md', needs='bag'))
    return out


def _loopback_ready() -> bool:
    return os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE') == 'LOCALHOST'


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and print a summary table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--list', action='store_true', help='list the benchmarks and exit')
    ap.add_argument('--only', action='append', default=[], help='run only this one (repeatable)')
    ap.add_argument('--data', default=None, help='COCO keypoints JSON for the data benchmarks')
    ap.add_argument('--bag', action='store_true', help='also run the bag benchmark')
    args = ap.parse_args(argv)
    todo = benchmarks(args.data)
    names = {b.name for b in todo}
    unknown = [n for n in args.only if n not in names]
    if unknown:
        print(f'unknown benchmark(s) {unknown}; choose from {sorted(names)}', file=sys.stderr)
        return 2
    if args.list:
        for b in todo:
            need = {'data': ' (needs --data)', 'bag': ' (needs --bag)'}.get(b.needs, '')
            print(f'{b.name:12s} python bench/{" ".join(b.argv)}{need}')
        return 0
    if args.data is not None and not Path(args.data).is_file():
        print(f'--data {args.data}: no such file', file=sys.stderr)
        return 2
    rows = []
    for b in todo:
        if args.only and b.name not in args.only:
            continue
        skip = ('no --data' if b.needs == 'data' and args.data is None else
                'no --bag' if b.needs == 'bag' and not args.bag else
                'source env.sh first (loopback DDS)' if b.ros and not _loopback_ready() else '')
        if skip:
            rows.append((b.name, 'skipped', 0.0, skip))
            continue
        print(f'--- {b.name}: python bench/{" ".join(b.argv)}', flush=True)
        env = {**os.environ, 'OMP_NUM_THREADS': '1'}
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, str(BENCH / b.argv[0]), *b.argv[1:]], cwd=REPO,
                              env=env, text=True,
                              stdout=subprocess.PIPE if b.stdout_to else None)
        elapsed = time.monotonic() - t0
        if b.stdout_to and proc.returncode == 0:
            doc = json.loads(proc.stdout[proc.stdout.index('{'):])
            doc['command'] = f'python bench/{" ".join(b.argv)}'
            (REPO / b.stdout_to).write_text(json.dumps(doc, indent=2) + '\n')
        status = 'ok' if proc.returncode == 0 else f'failed (exit {proc.returncode})'
        rows.append((b.name, status, elapsed, b.results))
    print('\n| benchmark | status | minutes | results |\n|---|---|---|---|')
    for name, status, elapsed, where in rows:
        print(f'| {name} | {status} | {elapsed / 60:.1f} | {where} |')
    return 1 if any(r[1].startswith('failed') for r in rows) else 0


if __name__ == '__main__':
    raise SystemExit(main())
