"""The pruning ablation of docs/usn.md, run through the project's CLI.

Makes the default dataset when it is missing (``make-dataset --count 2000 --seed 0``), then
runs ``usn-perception prune-compare`` on the shipped default model: unpruned, random, L1,
USN one-shot and USN progressive + L_W at the given ratios over three seeds, measured on the
test split at τ = 3 px over α ∈ [0.8, 1.2], β ∈ [−0.1, 0.1]. Heavy (tens of minutes on CPU).

    python bench/bench_prune.py --work /tmp/usn_bench [--ratios 0.5] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> None:
    """Echo and run one CLI command; stop on failure."""
    print('$ ' + ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run dataset + ablation."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--work', type=Path, default=Path('/tmp/usn_bench'))
    p.add_argument('--model', type=Path, default=REPO / 'models' / 'default')
    p.add_argument('--ratios', default='0.5')
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--methods', default='unpruned,random,l1,usn-oneshot,usn-oneshot-lw,'
                   'usn-progressive-nolw,usn-progressive')
    p.add_argument('--epochs', default='6')
    p.add_argument('--rounds', default='3')
    p.add_argument('--wasserstein', default='3')
    p.add_argument('--cert-images', default='20')
    p.add_argument('--budget', default='16', help='θ sub-boxes per image, same for every model')
    args, extra = p.parse_known_args(argv)
    cli = [sys.executable, '-m', 'usn_perception.cli']
    data = args.work / 'data'
    if not (data / 'train' / 'annotations.json').is_file():
        run(cli + ['make-dataset', '--out', str(data), '--count', '2000', '--seed', '0'])
    run(cli + ['prune-compare', '--model', str(args.model), '--data', str(data),
               '--ratios', args.ratios, '--seeds', args.seeds, '--methods', args.methods,
               '--epochs', args.epochs, '--rounds', args.rounds,
               '--wasserstein', args.wasserstein, '--alpha', '0.8,1.2', '--beta=-0.1,0.1',
               '--tau', '3', '--cert-images', args.cert_images, '--budget', args.budget,
               '--out', str(args.work / 'ablation'), *extra])
    return 0


if __name__ == '__main__':
    sys.exit(main())
