"""``usn-perception demo``: the main job, end to end, into one output folder.

Every step reuses the code behind one CLI command, so the demo shows what the tools do:

1. render a fresh synthetic set (``make-dataset``; its test split uses background photos the
   training split never saw);
2. clean accuracy of the shipped models on the whole test split, and certification of the
   models side by side on its first ``images`` images over the offline box (``certify`` with
   several ``--model``);
3. a bag: the first ``frames`` frames of the real ViSP ``mire-2`` sequence (pseudo-labelled)
   when apt can fetch it, else a synthetic sequence under a scripted lighting change
   (``make-bag``); evaluated offline (``eval-bag``) and replayed in lockstep through a
   spawned ``usn_perception_node`` (``replay``), the two compared frame by frame;
4. a summary table on stdout, ``summary.json``, ``report.md``, plots and debug images.

Layout of the output folder::

    OUT/summary.json  report.md  predictions.png  debug_frames.png
    OUT/data/        the rendered synthetic set (COCO keypoints)
    OUT/certify/     the certify report (models side by side)
    OUT/bag/         the bag and its label sidecar
    OUT/bag_eval/    the eval-bag report
    OUT/bag_replay/  the node's outputs (keypoints.mcap), node.log, comparison.json
    OUT/debug/       the node's outputs drawn on single bag frames
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from usn_perception.errors import UsnPerceptionError

BAG_SOURCES = ('auto', 'visp', 'synthetic')
#: Smaller sizes for ``--fast`` (about a minute with the shipped models).
FAST = {'count': 100, 'images': 3, 'frames': 30}
#: Marks a folder the demo wrote, so a rerun may replace its parts (and nothing else).
MARKER = '.usn_perception_demo'
#: What a rerun replaces.
PARTS = ('data', 'certify', 'bag', 'bag_eval', 'bag_replay', 'debug', 'summary.json',
         'report.md', 'predictions.png', 'debug_frames.png')
TOPIC = '/camera/image_raw'
SYNTHETIC_SIZE = (320, 240)

Log = Callable[[str], None]


class DemoError(UsnPerceptionError):
    """The demo cannot run as asked (bad option, output folder, missing environment)."""


@dataclass(frozen=True)
class DemoOptions:
    """How much the demo does; validated on construction (:class:`DemoError`)."""

    count: int = 300  #: synthetic images rendered over train/val/test (test = 10 %)
    images: int = 10  #: test images certified per model
    frames: int = 120  #: bag frames evaluated and replayed
    bag_source: str = 'auto'  #: auto (ViSP when apt can, else synthetic), visp, synthetic
    replay: bool = True  #: replay the bag through a spawned usn_perception_node
    seed: int = 2026
    alpha: tuple[float, float] = (0.8, 1.2)
    beta: tuple[float, float] = (-0.1, 0.1)
    tolerances: tuple[float, ...] = (2.0, 3.0, 5.0)
    max_subboxes: int = 5  #: θ sub-boxes per bag frame (the node's default)
    debug_images: int = 4
    visp_cache: Path | None = None
    fetch_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        """Refuse sizes that cannot make a demo, naming the option."""
        if self.count < 10:
            raise DemoError(f'--count must be at least 10 (one test image per 10), '
                            f'got {self.count}')
        for name in ('images', 'frames', 'max_subboxes'):
            if getattr(self, name) < 1:
                raise DemoError(f'--{name.replace("_", "-")} must be at least 1, '
                                f'got {getattr(self, name)}')
        if self.debug_images < 0:
            raise DemoError(f'debug_images must be >= 0, got {self.debug_images}')
        if self.bag_source not in BAG_SOURCES:
            raise DemoError(f'--bag-source must be one of {BAG_SOURCES}, '
                            f'got {self.bag_source!r}')
        if not self.tolerances or min(self.tolerances) <= 0:
            raise DemoError(f'tolerances must be positive, got {self.tolerances}')


def run_demo(
    out: str | Path,
    options: DemoOptions | None = None,
    *,
    models: Sequence[str | Path] | None = None,
    progress: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """Run the demo into ``out`` and return its summary (also ``out/summary.json``).

    ``models`` default to the shipped default and its unpruned source (:func:`_load_models`).
    A folder the demo wrote before is replaced part by part; any other non-empty folder is
    refused. ``summary['ok']`` is False when the replayed node disagreed with the offline
    evaluation.
    """
    import torch

    from usn_perception.certify import PhotometricBox

    opts = options or DemoOptions()
    t_start = time.perf_counter()
    if opts.replay:
        _check_ros()
    try:
        box = PhotometricBox(opts.alpha, opts.beta)
    except ValueError as e:
        raise DemoError(f'invalid perturbation box: {e}') from e
    detectors = _load_models(models)
    out = _prepare_out(Path(out))
    # One thread: the offline evaluation then computes exactly what the node (num_threads 1)
    # publishes, and the demo does not oversubscribe a small machine.
    torch.set_num_threads(1)
    timings: dict[str, float] = {}
    steps = 5 if opts.replay else 4

    t0 = time.perf_counter()
    log(f'[1/{steps}] rendering a fresh synthetic set ({opts.count} images, seed {opts.seed})')
    test = _render(out / 'data', opts, progress)
    timings['render'] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_cert = min(opts.images, len(test))
    log(f'[2/{steps}] {len(detectors)} model(s): clean accuracy on {len(test)} test images, '
        f'certification on {n_cert} over α∈{list(box.alpha)}, β∈{list(box.beta)}')
    model_rows = _models_step(out, detectors, test, box, opts, progress)
    timings['models'] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f'[3/{steps}] recording a bag ({opts.frames} frames, source {opts.bag_source})')
    bag = _bag_step(out / 'bag', opts, progress, log)
    log(f'  {bag["source"]}: {bag["frames"]} frames, {bag["labelled"]} labelled')
    timings['bag'] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f'[4/{steps}] evaluating the bag offline with {_name(detectors[0])} (eval-bag)')
    bag.update(_eval_step(out, bag, detectors[0], opts, progress))
    timings['eval_bag'] = time.perf_counter() - t0

    replay = None
    if opts.replay:
        t0 = time.perf_counter()
        log(f'[5/{steps}] replaying the bag in lockstep through usn_perception_node')
        replay = _replay_step(out, bag, detectors[0], opts, progress)
        timings['replay'] = time.perf_counter() - t0
    bag['replay'] = replay

    outputs = out / ('bag_replay' if replay else 'bag_eval') / 'keypoints.mcap'
    debug = _debug_images(out, Path(bag['path']), outputs, opts.debug_images)
    timings['total'] = time.perf_counter() - t_start
    summary = {
        'out': str(out), 'ok': replay is None or bool(replay['equal']),
        'options': _jsonable(asdict(opts)), 'box': box.to_json(),
        'tolerances': list(opts.tolerances),
        'data': {'test': str(out / 'data' / 'test' / 'annotations.json'),
                 'test_images': len(test), 'certified_images': n_cert},
        'models': model_rows, 'bag': bag, 'debug_images': debug, 'seconds': timings,
    }
    _write_summary(out, summary)
    log(summary_table(summary))
    if not summary['ok']:
        log('WARNING: the replayed node differs from the offline evaluation: see '
            f'{out / "bag_replay" / "comparison.json"}')
    log(f'outputs in {out}')
    return summary


# ----------------------------------------------------------------------------- set-up
def _prepare_out(out: Path) -> Path:
    """Create ``out``, or clear the parts of an earlier demo run there; refuse anything else."""
    out = out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise DemoError(f'{out}: exists and is not a folder')
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoError(f'{out}: not empty and not a demo output folder; choose a new '
                            '--out (the demo only replaces folders it wrote)')
        for name in PARTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text('written by usn-perception demo; a rerun replaces its parts\n')
    return out


def _check_ros() -> None:
    """Fail before any long step when the replay cannot run here."""
    import importlib.util

    if importlib.util.find_spec('rclpy') is None:
        raise DemoError('the replay needs rclpy (the ROS 2 wheels): run `make setup`, or pass '
                        '--no-replay')
    if os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE') != 'LOCALHOST' or not os.environ.get(
            'FASTDDS_DEFAULT_PROFILES_FILE'):
        raise DemoError('the replay talks over DDS, which must stay on loopback: '
                        '`source env.sh` first (or pass --no-replay)')


def _load_models(models: Sequence[str | Path] | None) -> list:
    """The detectors to compare: ``models``, or the shipped default and its unpruned source.

    Without ``models``: ``default`` plus every found model whose sha256 is the one the
    default's pruning metadata names as its source; every found model (``default`` first)
    when the default is not a pruned model.
    """
    from usn_perception.detector import load_detector
    from usn_perception.model_io import find_models, model_name

    paths = list(models) if models else sorted(
        find_models(), key=lambda p: (model_name(p) != 'default', model_name(p)))
    if not paths:
        raise DemoError('no models found (usn-perception models lists none); pass --model')
    try:
        detectors = [load_detector(p) for p in paths]
    except ValueError as e:
        if isinstance(e, UsnPerceptionError):
            raise
        raise DemoError(str(e)) from e
    if models:
        return detectors
    source = (detectors[0].metadata.get('pruning') or {}).get('source', {}).get('sha256')
    if model_name(paths[0]) != 'default' or source is None:
        return detectors
    return [detectors[0]] + [d for d in detectors[1:] if d.sha256 == source]


def _name(detector) -> str:
    from usn_perception.model_io import model_name

    return model_name(detector.source)


# ----------------------------------------------------------------------------- models
def _render(folder: Path, opts: DemoOptions, progress: bool):
    from usn_perception.data.coco import load_coco
    from usn_perception.data.synthetic import make_dataset

    paths = make_dataset(folder, opts.count, opts.seed, progress=progress)
    return load_coco(paths['test'])


def _models_step(out: Path, detectors: Sequence, test, box, opts: DemoOptions,
                 progress: bool) -> list[dict[str, Any]]:
    """Clean accuracy on the whole test split, then the side-by-side certify report."""
    import cv2
    from tqdm import tqdm

    from usn_perception.certify_report import model_labels, write_certify_report
    from usn_perception.evaluation import accuracy_summary
    from usn_perception.visualize import draw_keypoints, tile

    truth = np.array([s.keypoints for s in test.samples])
    labelled = np.array([np.asarray(s.visibility) > 0 for s in test.samples])
    images = [test.load_image(i) for i in range(len(test))]
    clean = []
    for j, det in enumerate(detectors):
        preds = np.array([det.predict(img) for img in tqdm(
            images, desc=f'predict {_name(det)}', disable=not progress, leave=False)])
        clean.append(accuracy_summary(preds, truth, labelled, opts.tolerances))
        if j == 0:
            pics = [draw_keypoints(images[i], preds[i], truth=truth[i])
                    for i in range(min(6, len(images)))]
            cv2.imwrite(str(out / 'predictions.png'), tile(pics))
    report = write_certify_report(
        out / 'certify', detectors, test, box, tolerances=opts.tolerances,
        limit=opts.images, progress=progress, data_path=out / 'data' / 'test' / 'annotations.json')
    rows = []
    for name, det, acc, cert in zip(model_labels(detectors), detectors, clean,
                                    report['models'], strict=True):
        rows.append({
            'name': name, 'report_label': cert['model'], 'path': det.source,
            'sha256': det.sha256,
            'parameters': det.num_parameters, 'widths': list(det.config.widths),
            'clean': acc, 'certified_images': cert['images'],
            'certified_accuracy': cert['certified_accuracy'],
            'certified_fraction': cert['certified_fraction'],
            'median_box_width_px': cert['median_box_width_px'],
            'certify_ms_per_image': 1e3 * cert['seconds_per_image'],
            'predict_ms_per_image': 1e3 * cert['predict_seconds_per_image'],
        })
    return rows


# ----------------------------------------------------------------------------- bag
def _bag_step(folder: Path, opts: DemoOptions, progress: bool, log: Log) -> dict[str, Any]:
    """Write the bag from ViSP mire-2 (when it can be had) or a synthetic sequence."""
    from usn_perception.bag import sources
    from usn_perception.bag.write import BagSpec, write_image_bag

    visp = None
    if opts.bag_source in ('auto', 'visp'):
        visp = _fetch_visp(opts, log)
        if visp is None and opts.bag_source == 'visp':
            raise DemoError('ViSP mire-2 is not available here (see the message above); use '
                            '--bag-source synthetic or auto')
    if visp is not None:
        src = sources.visp_source('mire-2', visp.parent, pseudo_label=True)
        kind, what = 'ViSP mire-2', 'real frames, pseudo-labels (classical blob detector)'
    else:
        src = sources.synthetic_source(opts.frames, SYNTHETIC_SIZE, opts.seed, 'sine', 0.3, 0.1)
        kind, what = 'synthetic', ('one rendered pose, exact labels, scripted lighting: '
                                   'α = 1 ± 0.3, β = ±0.1 (sine over the run)')
    n = min(opts.frames, src.count)
    done = write_image_bag(folder, itertools.islice(src.frames, n), BagSpec(topic=TOPIC),
                           keypoint_names=src.keypoint_names,
                           info={**src.info, 'command': 'usn-perception demo'},
                           progress=progress, total=n)
    return {'source': kind, 'description': what, 'path': str(done['bag']), 'topic': TOPIC,
            'frames': done['frames'], 'labelled': done['labelled'],
            'labels': str(done['labels']) if done['labels'] else None}


def _fetch_visp(opts: DemoOptions, log: Log) -> Path | None:
    """The cached mire-2 folder, fetched when missing; None (with a note) when it cannot be.

    The fetch runs as ``usn-perception fetch-visp`` in a child process group with a time
    limit, so a stalled download cannot hold the demo past ``fetch_timeout_s``.
    """
    from usn_perception.data.visp import cached_sequence, default_cache_dir

    cache = opts.visp_cache or default_cache_dir()
    found = cached_sequence(cache, 'mire-2')
    if found is not None:
        return found
    log(f'  fetching ViSP mire-2 (apt-get download visp-images-data) into {cache} …')
    cmd = [sys.executable, '-m', 'usn_perception.cli', '--quiet', 'fetch-visp', '--cache',
           str(cache)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=opts.fetch_timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        log(f'  ViSP fetch gave no result within {opts.fetch_timeout_s:g} s')
        return None
    if proc.returncode != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        log(f'  ViSP mire-2 unavailable: {lines[-1] if lines else proc.returncode}')
        return None
    return cached_sequence(cache, 'mire-2')


def _pipeline_settings(opts: DemoOptions):
    from usn_perception.pipeline import PipelineSettings

    # The node's defaults without its wall-clock budget: deterministic, so replay == offline.
    return PipelineSettings(max_subboxes=opts.max_subboxes, budget_ms=None)


def _eval_step(out: Path, bag: dict, detector, opts: DemoOptions,
               progress: bool) -> dict[str, Any]:
    from usn_perception.bag.evaluate import evaluate_bag

    ev = evaluate_bag(bag['path'], out / 'bag_eval', topic=bag['topic'], detector=detector,
                      settings=_pipeline_settings(opts), labels=bag['labels'],
                      tolerances=opts.tolerances, progress=progress,
                      command='usn-perception demo')
    s = ev.summary
    labels = s.get('labels') or {}
    return {'model': _name(detector), 'evaluated_frames': s['frames'],
            'certified_fraction': s['certified_fraction'],
            'median_box_width_px': s['certified_box_width_px']['median'],
            'pck': labels.get('pck'), 'certified_accuracy': labels.get('certified_accuracy'),
            'pseudo_labels': labels.get('pseudo_labels'),
            'ms_per_frame': s['latency_ms']['total']['mean'],
            'throughput_fps': s['throughput_fps']}


def _replay_step(out: Path, bag: dict, detector, opts: DemoOptions,
                 progress: bool) -> dict[str, Any]:
    """Spawn the node, replay in lockstep, stop it, compare with the offline outputs."""
    import tempfile

    from usn_perception.bag import replay
    from usn_perception.bag.outputs import compare_outputs, read_outputs
    from usn_perception.reports import write_json

    folder = out / 'bag_replay'
    name = f'usn_perception_demo_{os.getpid()}'  # no other node answers in its place
    publish = f'/{name}/image_raw'
    params = replay.node_parameters(_pipeline_settings(opts), detector.source)
    log_fd, log_name = tempfile.mkstemp(prefix='usn_demo_node_', suffix='.log')
    os.close(log_fd)
    log_path = Path(log_name)
    proc = replay.spawn_node(params, publish, publish, name, log_path)
    try:
        res = replay.replay_bag(bag['path'], folder, topic=bag['topic'], ns=f'/{name}',
                                publish_topic=publish, timeout_s=120.0, connect_timeout_s=120.0,
                                progress=progress, alive=replay.check_alive(proc, log_path),
                                command='usn-perception demo')
    finally:
        replay.stop_node(proc)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(log_path, folder / 'node.log')
    cmp = compare_outputs(read_outputs(out / 'bag_eval' / 'keypoints.mcap'),
                          read_outputs(folder / 'keypoints.mcap'))
    write_json(folder / 'comparison.json', cmp)
    s = res.summary
    return {'frames_sent': s['frames_sent'], 'outputs_recorded': s['outputs_recorded'],
            'missing': len(s['missing']), 'frames_per_s': s['frames_per_s'],
            'identical': cmp['identical'], 'frames_expected': cmp['frames_expected'],
            'equal': cmp['equal'], 'complete': res.complete}


# ----------------------------------------------------------------------------- pictures
def debug_picture(frame: np.ndarray, out_frame, *, scale: int = 1) -> np.ndarray:
    """The node's ``~/debug_image`` drawing of one recorded output frame (BGR uint8).

    The same drawing as :meth:`usn_perception.ros.node.UsnPerceptionNode.debug_image`
    (:func:`usn_perception.visualize.draw_certificate`), from what the node published.
    """
    from usn_perception.certify import CertStatus
    from usn_perception.visualize import draw_certificate

    certified = np.asarray(out_frame.status) == int(CertStatus.CERTIFIED)
    return draw_certificate(frame, out_frame.keypoints, out_frame.boxes, certified,
                            out_frame.alpha, out_frame.beta, scale=scale)


def _debug_images(out: Path, bag: Path, outputs: Path, count: int) -> list[str]:
    """Draw ``count`` evenly spaced frames of the run recorded in ``outputs``."""
    import cv2

    from usn_perception.bag.outputs import read_outputs
    from usn_perception.bag.read import BagReader, iter_frames
    from usn_perception.visualize import tile

    if count == 0:
        return []
    recorded = {f.stamp_ns: f for f in read_outputs(outputs).frames
                if f.keypoints is not None and f.alpha is not None}
    stamps = sorted(recorded)
    if not stamps:
        return []
    wanted = {stamps[round(i)] for i in np.linspace(0, len(stamps) - 1, min(count, len(stamps)))}
    folder = out / 'debug'
    folder.mkdir(parents=True, exist_ok=True)
    written, pictures = [], []
    with BagReader(bag) as reader:
        for frame in iter_frames(reader, TOPIC):
            if frame.stamp_ns not in wanted or frame.image is None:
                continue
            img = frame.image
            scale = max(1, math.ceil(640 / img.shape[1]))  # room for the Θ text
            pic = debug_picture(img, recorded[frame.stamp_ns], scale=scale)
            path = folder / f'frame_{frame.index:06d}.png'
            cv2.imwrite(str(path), pic)
            written.append(str(path.relative_to(out)))
            pictures.append(pic)
    if pictures:
        cv2.imwrite(str(out / 'debug_frames.png'), tile(pictures, columns=min(2, len(pictures))))
    return written


# ----------------------------------------------------------------------------- report
def _ratios(values: dict | None, tolerances: Sequence[float]) -> str:
    if not values:
        return '–'
    return '/'.join(_num(values.get(f'{t:g}'), 3) for t in tolerances)


def _num(v: object, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return '–'
    return f'{v:.{digits}f}' if isinstance(v, float) else str(v)


def summary_table(summary: dict[str, Any]) -> str:
    """The two Markdown tables the demo prints: models side by side, then the bag."""
    from usn_perception.reports import markdown_table

    taus = summary['tolerances']
    t = '/'.join(f'{v:g}' for v in taus)
    n = summary['data']
    heads = ['model', 'params', f'clean PCK @{t} px ({n["test_images"]} img)',
             f'certified acc. @{t} px ({n["certified_images"]} img)',
             'median box width (px)', 'certify ms/img', 'predict ms/img']
    rows = [[m['name'], m['parameters'], _ratios(m['clean']['pck'], taus),
             _ratios(m['certified_accuracy'], taus), _num(m['median_box_width_px'], 1),
             _num(m['certify_ms_per_image'], 0), _num(m['predict_ms_per_image'], 1)]
            for m in summary['models']]
    b = summary['bag']
    r = b.get('replay')
    kind = 'pseudo-labels' if b.get('pseudo_labels') else 'labels'
    bag_heads = ['bag', 'frames', 'certified fraction', 'median box width (px)',
                 f'PCK @{t} px vs {kind}', 'eval ms/frame', 'replay: identical to offline']
    replay = '–' if r is None else (f'{r["identical"]}/{r["frames_expected"]}'
                                    + (' ✔' if r['equal'] else ' ✘ MISMATCH'))
    bag_rows = [[b['source'], b['frames'], _num(b['certified_fraction'], 3),
                 _num(b['median_box_width_px'], 1), _ratios(b['pck'], taus),
                 _num(b['ms_per_frame'], 0), replay]]
    return (markdown_table(heads, rows) + '\n\n' + markdown_table(bag_heads, bag_rows)
            + f'\n\nbox α∈{summary["box"]["alpha"]}, β∈{summary["box"]["beta"]}; '
            f'bag model {b.get("model")}, measured Θ per frame; '
            f'{summary["seconds"]["total"]:.0f} s in all')


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    from usn_perception.reports import write_json

    write_json(out / 'summary.json', summary)
    figures = [('predictions.png', 'clean predictions of the first model (green dots; yellow '
                'crosses: ground truth)'),
               ('certify/examples.png', 'certified boxes (green: certified, red: not)'),
               ('certify/box_width_hist.png', 'certified box widths'),
               ('bag_eval/certified_over_time.png', 'bag: certified fraction over time'),
               ('bag_eval/theta_over_time.png', 'bag: measured θ interval over time'),
               ('debug_frames.png', "bag: the node's outputs drawn on frames (debug image)")]
    lines = ['# usn_perception demo', '', summary_table(summary), '',
             '- certification report (models side by side): [certify/report.md]'
             '(certify/report.md)',
             '- bag evaluation report: [bag_eval/report.md](bag_eval/report.md)']
    if summary['bag'].get('replay'):
        lines.append('- lockstep replay through the node: `bag_replay/keypoints.mcap`, '
                     '[comparison](bag_replay/comparison.json), `bag_replay/node.log`')
    lines += ['', 'A keypoint is *certified correct at τ* when its whole certified box lies '
              'within τ pixels of the ground truth for every (α, β) in the box.', '']
    for name, title in figures:
        if (out / name).is_file():
            lines += [f'## {title[0].upper()}{title[1:]}', '', f'![{title}]({name})', '']
    (out / 'report.md').write_text('\n'.join(lines))


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v
