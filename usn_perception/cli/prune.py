"""Pruning commands: score (USN scores + plot), prune, prune-compare (the ablation).

``prune-compare`` is the measurement behind the claim that USN pruning pays: the same base
model pruned by every criterion at the same ratios and seeds, each result saved, reloaded
with ``load_detector`` and measured by the project's own ``evaluate_detector`` (clean PCK)
and ``certify_dataset`` (certified accuracy, box width, certification time) on one test set.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from usn_perception.cli.registry import command, floats, pair, progress
from usn_perception.errors import UsnPerceptionError

#: Ablation arms: PruneOptions overrides (None = the unpruned base model, measured as is).
METHODS: dict[str, dict | None] = {
    'unpruned': None,
    'finetuned': {'criterion': 'random', 'ratio': 0.0, 'rounds': 1, 'wasserstein': 0.0},
    'random': {'criterion': 'random', 'rounds': 1, 'wasserstein': 0.0},
    'l1': {'criterion': 'l1', 'rounds': 1, 'wasserstein': 0.0},
    'usn-oneshot': {'criterion': 'usn', 'rounds': 1, 'wasserstein': 0.0},
    'usn-progressive': {'criterion': 'usn'},  # rounds and λ from the command line
    'usn-oneshot-lw': {'criterion': 'usn', 'rounds': 1},  # L_W without progressive rounds
    'usn-progressive-nolw': {'criterion': 'usn', 'wasserstein': 0.0},
    'bound-oneshot': {'criterion': 'bound', 'rounds': 1, 'wasserstein': 0.0},
}
DEFAULT_METHODS = ('unpruned', 'random', 'l1', 'usn-oneshot', 'usn-progressive')


def _split_path(data: Path, split: str) -> Path:
    """A make-dataset folder → its split's COCO file; a file is used as is."""
    if data.is_dir():
        path = data / split / 'annotations.json'
        if not path.is_file():
            raise UsnPerceptionError(f'{data}: no {split}/annotations.json in this folder')
        return path
    return data


def _box_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--alpha', type=pair, default=(0.8, 1.2), help='contrast range LO,HI')
    p.add_argument('--beta', type=pair, default=(-0.1, 0.1), help='brightness range LO,HI')


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--score-images', type=int, default=128,
                   help='training images used for USN scores (seeded subset)')
    p.add_argument('--score-samples', type=int, default=8, help='θ samples per image')


def _load(model: Path | None):
    from usn_perception.model_io import default_model_path, load_model

    return load_model(model if model is not None else default_model_path())


# --------------------------------------------------------------------------- score


def _cfg_score(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', type=Path, default=None, help='model (default: shipped)')
    p.add_argument('--data', required=True, type=Path,
                   help='COCO keypoints file, or a make-dataset folder (uses train/)')
    _box_args(p)
    _score_args(p)
    p.add_argument('--method', choices=('usn', 'bound'), default='usn',
                   help='usn: sampled θ statistics; bound: ReLU instability from the engine')
    p.add_argument('--batch', type=int, default=16, help='images per forward batch')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', required=True, type=Path, help='scores JSON to write')
    p.add_argument('--plot', type=Path, default=None,
                   help='per-layer distribution PNG (default: next to --out)')


@command('score', 'USN scores of every prunable channel (stability under brightness/contrast)',
         'usn-perception score --data data/synth --out reports/usn_scores.json', _cfg_score)
def cmd_score(args: argparse.Namespace) -> int:
    """Score channels on training images with θ sampled in the box; write JSON and a plot.

    USN_j = 1 / (1 + (bias_j² + var_j) / spread_j²): low = unstable = pruned first.
    """
    from usn_perception.data.coco import load_coco
    from usn_perception.train import prepare
    from usn_perception.usn import bound_scores, plot_scores, usn_scores

    net, config, doc = _load(args.model)
    dataset = load_coco(_split_path(args.data, 'train'))
    if len(dataset) == 0:
        raise UsnPerceptionError(f'{args.data}: the dataset is empty')
    idx = _subset(len(dataset), args.score_images, args.seed)
    dataset.samples = [dataset.samples[i] for i in idx]
    try:
        if args.method == 'bound':
            from usn_perception.detector import Detector

            images = [dataset.load_image(i) for i in range(len(dataset))]
            scores = bound_scores(Detector(net, config), images, args.alpha, args.beta,
                                  progress=progress(args))
        else:
            data = prepare(dataset, config, progress(args), 'load')
            scores = usn_scores(net, data.images, args.alpha, args.beta,
                                samples=args.score_samples, max_images=None,
                                batch=args.batch, seed=args.seed, progress=progress(args))
    except ValueError as e:
        raise UsnPerceptionError(str(e)) from e
    scores.settings.update(model_sha256=doc['weights_sha256'], data=str(args.data))
    out = scores.save(args.out)
    png = plot_scores(scores, args.plot or out.with_suffix('.png'))
    for row in scores.summary():
        print(f'layer @{row["index"]:>2} ({row["width"]:>3} ch): USN min {row["min"]:.3f} '
              f'median {row["median"]:.3f} max {row["max"]:.3f}, no signal {row["no_signal"]}')
    print(f'scores: {out}\nplot: {png}')
    return 0


def _subset(n: int, limit: int | None, seed: int) -> list[int]:
    from usn_perception.usn import choose_images

    return [int(i) for i in choose_images(n, limit, seed)]


# --------------------------------------------------------------------------- prune


def _ratio(text: str) -> float | tuple[float, ...]:
    values = floats(text)
    return values[0] if len(values) == 1 else values


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', type=Path, default=None, help='model (default: shipped)')
    p.add_argument('--data', required=True, type=Path,
                   help='training COCO file, or a make-dataset folder (uses train/)')
    p.add_argument('--rounds', type=int, default=3, help='progressive rounds (1 = one-shot)')
    p.add_argument('--wasserstein', type=float, default=3.0,
                   help='λ of the Wasserstein gate regulariser (0 = off)')
    p.add_argument('--gain-weight', type=float, default=0.0,
                   help='certified training while fine-tuning: weight of log(radius gain)')
    p.add_argument('--scope', choices=('layer', 'global'), default='layer',
                   help='ratio per layer, or lowest scores over the whole network')
    p.add_argument('--epochs', type=float, default=4.0, help='total fine-tuning epochs')
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--limit', type=int, default=None, help='use only the first N train images')
    _box_args(p)
    _score_args(p)


def _cfg_prune(p: argparse.ArgumentParser) -> None:
    _prune_args(p)
    p.add_argument('--ratio', type=_ratio, required=True,
                   help='fraction of channels to remove: one value, or one per layer (9)')
    p.add_argument('--criterion', choices=('usn', 'random', 'l1', 'bound'), default='usn',
                   help='usn (default), random, l1 (filter norm), bound (ReLU instability)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', required=True, type=Path, help='model folder to write')


def _options(args: argparse.Namespace, **changes):
    from usn_perception.prune import PruneOptions

    kw = dict(ratio=getattr(args, 'ratio', 0.5), criterion=getattr(args, 'criterion', 'usn'),
              rounds=args.rounds, wasserstein=args.wasserstein, scope=args.scope,
              epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
              alpha=tuple(args.alpha), beta=tuple(args.beta), score_images=args.score_images,
              score_samples=args.score_samples, seed=getattr(args, 'seed', 0),
              gain_weight=getattr(args, 'gain_weight', 0.0))
    kw.update(changes)
    try:
        return PruneOptions(**kw)
    except ValueError as e:
        raise UsnPerceptionError(f'invalid pruning options: {e}') from e


def _train_tensors(args: argparse.Namespace, config):
    from usn_perception.data.coco import load_coco
    from usn_perception.train import prepare

    path = _split_path(args.data, 'train')
    dataset = load_coco(path)
    if args.limit:
        dataset.samples = dataset.samples[:args.limit]
    if len(dataset) == 0:
        raise UsnPerceptionError(f'{path}: the training set is empty')
    return prepare(dataset, config, progress(args), 'load train'), path


@command('prune', 'prune channels (USN / random / L1), progressively, with fine-tuning',
         'usn-perception prune --data data/synth --ratio 0.5 --rounds 3 --wasserstein 0.5 '
         '--out models/pruned', _cfg_prune)
def cmd_prune(args: argparse.Namespace) -> int:
    """Prune the model and save it (per-layer widths in the JSON); load_detector reads it.

    Each round scores the current network, selects the lowest channels, fine-tunes with
    L_task + λ·L_W (pulling the selected BatchNorm gates to 0), removes them physically
    and fine-tunes again.
    """
    from usn_perception.network import count_macs, count_parameters
    from usn_perception.prune import prune_network, save_pruned

    net, config, doc = _load(args.model)
    opts = _options(args)
    data, path = _train_tensors(args, config)
    before = count_parameters(net), count_macs(net, config.input_size)
    try:
        result = prune_network(net, config, data, opts, progress=progress(args), log=print)
    except ValueError as e:
        raise UsnPerceptionError(str(e)) from e
    source = {'model': doc['_json_path'], 'sha256': doc['weights_sha256'], 'data': str(path)}
    out = save_pruned(result, args.out, source)
    after = count_parameters(result.net), count_macs(result.net, config.input_size)
    print(f'model: {out}\nwidths {list(config.widths)} -> {list(result.config.widths)}\n'
          f'parameters {before[0]} -> {after[0]} ({after[0] / before[0]:.1%}), '
          f'MACs {before[1]} -> {after[1]} ({after[1] / before[1]:.1%}), '
          f'{result.seconds:.0f} s')
    return 0


# --------------------------------------------------------------------------- ablation


def _cfg_compare(p: argparse.ArgumentParser) -> None:
    _prune_args(p)
    p.add_argument('--test', type=Path, default=None,
                   help='test COCO file (default: DATA/test/annotations.json)')
    p.add_argument('--ratios', type=floats, default=(0.5,), help='pruning ratios R1,R2,…')
    p.add_argument('--seeds', type=floats, default=(0, 1, 2), help='seeds S1,S2,…')
    p.add_argument('--methods', default=','.join(DEFAULT_METHODS),
                   help=f'comma-separated arms out of {", ".join(METHODS)}')
    p.add_argument('--tau', type=float, default=3.0, help='certified-accuracy tolerance (px)')
    p.add_argument('--cert-images', type=int, default=40, help='test images to certify')
    p.add_argument('--budget', type=int, default=None,
                   help='θ sub-boxes per image (default: the offline budget)')
    p.add_argument('--out', required=True, type=Path, help='ablation folder to write')


@command('prune-compare', 'ablation: unpruned vs random vs L1 vs USN one-shot vs USN+L_W',
         'usn-perception prune-compare --data data/synth --ratios 0.5 --seeds 0,1,2 '
         '--out reports/prune', _cfg_compare)
def cmd_prune_compare(args: argparse.Namespace) -> int:
    """Prune with every arm at every ratio and seed, then measure each model the same way.

    Writes rows.csv / results.json (one row per model), table.md (mean ± std over seeds),
    and tradeoff.png (certified accuracy and certification time against ratio).
    """
    from usn_perception.certify import Budget, PhotometricBox

    methods = [m.strip() for m in args.methods.split(',') if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsnPerceptionError(f'unknown --methods {unknown}; choose from {list(METHODS)}')
    try:
        box = PhotometricBox(tuple(args.alpha), tuple(args.beta))
        budget = Budget(max_subboxes=args.budget) if args.budget else None
        for r in args.ratios:
            _options(args, ratio=r)
    except ValueError as e:
        raise UsnPerceptionError(f'invalid box, budget or ratio: {e}') from e
    if args.cert_images < 1:
        raise UsnPerceptionError('--cert-images must be >= 1')
    rows = run_ablation(args, methods, box, budget, log=print)
    out = write_ablation(rows, args.out, args.tau, vars(args))
    print(f'table: {out / "table.md"}\n' + (out / 'table.md').read_text())
    return 0


def run_ablation(args: argparse.Namespace, methods: Sequence[str], box, budget,
                 log: Callable[[str], None] = print) -> list[dict]:
    """Every (method, ratio, seed) model, pruned, saved, reloaded and measured; one row each."""
    from usn_perception.data.coco import load_coco
    from usn_perception.prune import prune_network, save_pruned

    net, config, doc = _load(args.model)
    data, train_path = _train_tensors(args, config)
    test_path = args.test or _split_path(args.data, 'test')
    test_set = load_coco(test_path)
    if len(test_set) == 0:
        raise UsnPerceptionError(f'{test_path}: the test set is empty')
    source = {'model': doc['_json_path'], 'sha256': doc['weights_sha256'],
              'data': str(train_path)}
    models = Path(args.out) / 'models'
    models.mkdir(parents=True, exist_ok=True)
    partial = Path(args.out) / 'rows.jsonl'  # survives an interrupted run
    partial.write_text('')
    rows: list[dict] = []

    def done(row: dict) -> None:
        rows.append(row)
        with open(partial, 'a') as f:
            f.write(json.dumps(row, default=str) + '\n')
        log(_row_line(row, args.tau))

    if 'unpruned' in methods:
        done(measure_model(doc['_json_path'], test_set, box, budget, args,
                           {'method': 'unpruned', 'ratio': 0.0, 'seed': -1,
                            'prune_seconds': 0.0}))
    for ratio in args.ratios:
        for seed in (int(s) for s in args.seeds):
            for method in methods:
                overrides = METHODS[method]
                if overrides is None or (method == 'finetuned' and ratio != args.ratios[0]):
                    continue
                opts = _options(args, ratio=ratio, seed=seed, **overrides)
                result = prune_network(net, config, data, opts, progress=progress(args))
                tag = f'{method}-r{opts.ratio:g}-s{seed}'
                path = save_pruned(result, models / tag, source)
                done(measure_model(path, test_set, box, budget, args, {
                    'method': method, 'ratio': float(opts.ratio), 'seed': seed,
                    'prune_seconds': result.seconds}))
    log('timing every model on the same images, interleaved …')
    retime(rows, test_set, box, budget, args.cert_images)
    return rows


def retime(rows: list[dict], dataset, box, budget, n_images: int) -> None:
    """Replace ``cert_ms_per_image`` by a timing of all models interleaved image by image.

    Models are built one after the other while the load of a shared machine changes; timing
    them round-robin on the same images (after one warm-up image) exposes every model to the
    same conditions, so the ratios between models are what the table compares.
    """
    from usn_perception.certify_dataset import time_interleaved
    from usn_perception.detector import load_detector

    dets = [load_detector(r['model']) for r in rows]
    n = min(n_images, len(dataset))
    total, _ = time_interleaved(dets, (dataset.load_image(i) for i in range(n)), box, budget,
                                warm=dataset.load_image(0))
    for r, t in zip(rows, total, strict=True):
        r['cert_ms_per_image'], r['cert_ms_first_pass'] = 1000.0 * t / n, r['cert_ms_per_image']


def measure_model(path, test_set, box, budget, args: argparse.Namespace, row: dict) -> dict:
    """Load with ``load_detector`` and measure clean PCK, certified accuracy, width, time."""
    from usn_perception.certify_dataset import certify_dataset
    from usn_perception.detector import load_detector
    from usn_perception.network import count_macs, count_parameters
    from usn_perception.train import evaluate_detector
    from usn_perception.usn import output_bound_width

    det = load_detector(path)
    box_pair = (tuple(box.alpha), tuple(box.beta))
    clean = evaluate_detector(det, test_set, (args.tau, 4.0), progress=progress(args))
    run = certify_dataset(det, test_set, box, budget=budget, limit=args.cert_images,
                          progress=progress(args), desc=f'certify {row["method"]}')
    cert = run.summary((args.tau,))
    n_cert = min(args.cert_images, len(test_set))
    logit_width = float(np.median([output_bound_width(det, test_set.load_image(i), *box_pair)
                                   for i in range(n_cert)]))
    return {**row, 'model': str(path), 'widths': list(det.config.widths),
            'parameters': count_parameters(det.net),
            'macs': count_macs(det.net, det.config.input_size),
            'clean_pck4': clean['pck']['4'], 'clean_mean_error_px': clean['mean_error_px'],
            'test_images': clean['images'],
            'certified_accuracy': cert['certified_accuracy'][f'{args.tau:g}'],
            'certified_fraction': cert['certified_fraction'],
            'median_box_width_px': cert['median_box_width_px'],
            'cert_ms_per_image': 1000.0 * cert['seconds_per_image'],
            'mean_subboxes': cert['mean_subboxes'], 'cert_images': cert['images'],
            'logit_bound_width': logit_width}


def _row_line(r: dict, tau: float) -> str:
    return (f'{r["method"]:<16} r={r["ratio"]:.2f} seed={r["seed"]:>2}: params {r["parameters"]}'
            f', PCK@4 {r["clean_pck4"]:.3f}, cert@{tau:g} {r["certified_accuracy"]:.3f}, '
            f'width {r["median_box_width_px"]:.2f} px, {r["cert_ms_per_image"]:.0f} ms/img, '
            f'logit bound width {r["logit_bound_width"]:.3g}, '
            f'prune {r["prune_seconds"]:.0f} s')


TABLE_COLUMNS = (
    ('parameters', 'params', '{:.0f}'), ('macs', 'MACs (M)', '{:.1f}'),
    ('clean_pck4', 'clean PCK@4', '{:.3f}'), ('certified_accuracy', 'cert. acc. @τ', '{:.3f}'),
    ('median_box_width_px', 'median box width (px)', '{:.2f}'),
    ('cert_ms_per_image', 'cert. ms/image', '{:.0f}'),
    ('logit_bound_width', 'logit bound width', '{:.3g}'),
    ('prune_seconds', 'prune+FT s', '{:.0f}'),
)


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """Mean and std (over seeds) of every table column, per (method, ratio)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r['method'], r['ratio']), []).append(r)
    out = []
    for (method, ratio), rs in groups.items():
        agg = {'method': method, 'ratio': ratio, 'n': len(rs)}
        for key, _, _ in TABLE_COLUMNS:
            v = np.array([r[key] for r in rs], np.float64)
            if key == 'macs':
                v = v / 1e6
            agg[key] = float(np.mean(v))
            agg[key + '_std'] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        out.append(agg)
    return out


def write_ablation(rows: Sequence[dict], out: Path, tau: float, settings: dict) -> Path:
    """rows.csv, results.json, table.md and tradeoff.png under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(rows)
    keys = [k for k in rows[0] if k != 'widths'] + ['widths']
    with open(out / 'rows.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({**r, 'widths': ' '.join(map(str, r['widths']))})
    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()
             if k not in ('func',)}
    (out / 'results.json').write_text(json.dumps(
        {'settings': clean, 'rows': rows, 'aggregate': agg}, indent=1, default=str) + '\n')
    head = ['method', 'ratio', 'n'] + [t.replace('τ', f'τ={tau:g}') for _, t, _ in TABLE_COLUMNS]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for a in agg:
        cells = [a['method'], f'{a["ratio"]:g}', str(a['n'])]
        for key, _, fmt in TABLE_COLUMNS:
            cell = fmt.format(a[key])
            if a['n'] > 1:
                cell += ' ± ' + fmt.format(a[key + '_std'])
            cells.append(cell)
        lines.append('| ' + ' | '.join(cells) + ' |')
    (out / 'table.md').write_text('\n'.join(lines) + '\n')
    plot_tradeoffs(agg, out / 'tradeoff.png', tau)
    return out


def plot_tradeoffs(agg: Sequence[dict], path: Path, tau: float) -> Path:
    """Certified accuracy, certification time, bound width and clean PCK against the ratio."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    panels = (('certified_accuracy', f'certified accuracy @ τ={tau:g} px', False),
              ('cert_ms_per_image', 'certification ms / image', False),
              ('logit_bound_width', 'heatmap-logit bound width over Θ (log)', True),
              ('clean_pck4', 'clean PCK@4 px', False))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    base = [a for a in agg if a['method'] == 'unpruned']
    for ax, (key, label, log) in zip(axes.flat, panels, strict=True):
        for method in dict.fromkeys(a['method'] for a in agg if a['method'] != 'unpruned'):
            pts = sorted((a for a in agg if a['method'] == method), key=lambda a: a['ratio'])
            ax.errorbar([p['ratio'] for p in pts], [p[key] for p in pts],
                        yerr=[p[key + '_std'] for p in pts], marker='o', capsize=3,
                        label=method, alpha=0.85)
        for b in base:
            ax.axhline(b[key], color='k', ls='--', label='unpruned')
        if log:
            ax.set_yscale('log')
        ax.set(xlabel='pruning ratio (fraction of channels removed per layer)', ylabel=label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
