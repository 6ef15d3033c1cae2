"""The eval-bag report files: frames.csv, timings.csv, summary.json, report.md and plots.

``frames.csv`` holds only what the computation determines (no wall-clock column), one row per
frame and keypoint (one row for an undecodable frame), floats written exactly, so it is
byte-identical across runs of the same bag and options. Timings go to ``timings.csv``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from usn_perception.certify import CertStatus
from usn_perception.evaluation import (
    accuracy_summary,
    box_max_distance,
    box_widths,
    certified_accuracy,
    keypoint_errors,
)
from usn_perception.reports import markdown_table, plot_histograms, write_csv, write_json

FRAME_FIELDS = (
    'frame', 'stamp_ns', 'frame_id', 'kp_id', 'keypoint', 'x', 'y', 'score', 'status',
    'u_lo', 'u_hi', 'v_lo', 'v_hi', 'box_width', 'alpha_lo', 'alpha_hi', 'beta_lo', 'beta_hi',
    'interval_reliable', 'interval_frames', 'interval_residual', 'label_x', 'label_y',
    'label_visibility', 'error_px', 'box_max_dist_px', 'note')
TIMING_FIELDS = ('frame', 'stamp_ns', 'read_decode', 'infer', 'interval', 'certify', 'total',
                 'pipeline', 'write', 'frame_wall')
#: Every file eval-bag may write; stale ones from an earlier run in the same folder go.
OUTPUT_FILES = ('frames.csv', 'timings.csv', 'summary.json', 'report.md', 'keypoints.mcap',
                'PARTIAL', 'certified_over_time.png', 'theta_over_time.png',
                'latency_hist.png', 'error_vs_box.png')


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return {'p50': math.nan, 'p95': math.nan, 'mean': math.nan, 'max': math.nan}
    return {'p50': float(np.percentile(v, 50)), 'p95': float(np.percentile(v, 95)),
            'mean': float(v.mean()), 'max': float(v.max())}


def frame_rows(records: list, names: Sequence[str]) -> list[dict[str, Any]]:
    """The deterministic per-frame-and-keypoint rows of frames.csv."""
    rows: list[dict[str, Any]] = []
    for rec in records:
        base = {'frame': rec.index, 'stamp_ns': rec.stamp_ns, 'frame_id': rec.frame_id}
        res = rec.result
        if res is None:
            rows.append({**base, 'status': 'MALFORMED', 'note': rec.error or ''})
            continue
        est = res.interval
        widths = box_widths(res.boxes)
        label = rec.label
        for k in range(res.keypoints.shape[0]):
            row = {**base, 'kp_id': k, 'keypoint': names[k] if k < len(names) else '',
                   'x': float(res.keypoints[k, 0]), 'y': float(res.keypoints[k, 1]),
                   'score': float(res.scores[k]), 'status': CertStatus(int(res.status[k])).name,
                   'u_lo': float(res.boxes[k, 0]), 'u_hi': float(res.boxes[k, 1]),
                   'v_lo': float(res.boxes[k, 2]), 'v_hi': float(res.boxes[k, 3]),
                   'box_width': float(widths[k]), 'alpha_lo': est.alpha[0],
                   'alpha_hi': est.alpha[1], 'beta_lo': est.beta[0], 'beta_hi': est.beta[1],
                   'interval_reliable': int(est.reliable), 'interval_frames': est.frames,
                   'interval_residual': float(est.residual), 'note': rec.error or ''}
            if label is not None and label.visibility[k] > 0:
                truth = label.keypoints[k]
                row.update(label_x=float(truth[0]), label_y=float(truth[1]),
                           label_visibility=int(label.visibility[k]),
                           error_px=float(keypoint_errors(res.keypoints[k], truth)),
                           box_max_dist_px=float(box_max_distance(res.boxes[k], truth)))
            rows.append(row)
    return rows


def timing_rows(records: list) -> list[dict[str, Any]]:
    """Wall-clock rows of timings.csv (not deterministic, by nature)."""
    rows = []
    for rec in records:
        t = rec.timings_ms
        rows.append({'frame': rec.index, 'stamp_ns': rec.stamp_ns,
                     **{k: t.get(k, math.nan) for k in TIMING_FIELDS[2:-1]},
                     'frame_wall': t.get('frame', math.nan)})
    return rows


def _label_metrics(records: list, labels, tolerances: Sequence[float]) -> dict[str, Any]:
    done = [r for r in records if r.result is not None and r.label is not None]
    doc: dict[str, Any] = {'file': str(labels.path), 'pseudo_labels': labels.pseudo,
                           'description': labels.description, 'frames_labelled': len(done)}
    if not done:
        return doc
    pred = np.stack([r.result.keypoints for r in done])
    truth = np.stack([r.label.keypoints for r in done])
    mask = np.stack([r.label.visibility > 0 for r in done])
    boxes = np.stack([r.result.boxes for r in done])
    cert = np.stack([r.result.certified for r in done])
    doc.update(accuracy_summary(pred, truth, mask, tolerances))
    doc['certified_accuracy'] = {f'{t:g}': certified_accuracy(boxes, cert, truth, mask, t)
                                 for t in tolerances}
    return doc


def _theta_truth(records: list, window_s: float, max_frames: int) -> dict[str, Any] | None:
    """How often the measured Θ holds the true relative change of its window (synthetic)."""
    rows = [r for r in records if r.result is not None and r.label is not None
            and 'alpha' in r.label.extra and 'beta' in r.label.extra]
    if len(rows) != len([r for r in records if r.result is not None]) or not rows:
        return None
    covered = pairs = 0
    ranges = np.full((len(rows), 4), np.nan)
    for i, cur in enumerate(rows):
        a_c, b_c = float(cur.label.extra['alpha']), float(cur.label.extra['beta'])
        lo = max(0, i - max_frames + 1)
        window = [r for r in rows[lo:i + 1] if cur.stamp_ns - r.stamp_ns <= window_s * 1e9]
        rel = np.array([[float(r.label.extra['alpha']) / a_c,
                         float(r.label.extra['beta'])
                         - float(r.label.extra['alpha']) / a_c * b_c] for r in window])
        est = cur.result.interval
        inside = ((est.alpha[0] <= rel[:, 0]) & (rel[:, 0] <= est.alpha[1])
                  & (est.beta[0] <= rel[:, 1]) & (rel[:, 1] <= est.beta[1]))
        covered += int(inside.sum())
        pairs += len(rel)
        ranges[i] = [rel[:, 0].min(), rel[:, 0].max(), rel[:, 1].min(), rel[:, 1].max()]
    return {'pairs': pairs, 'covered_fraction': covered / pairs if pairs else math.nan,
            '_ranges': ranges}


def _plots(stage: Path, records: list, labels, tolerances: Sequence[float],
           truth: dict | None) -> list[tuple[str, str]]:
    from usn_perception.bag.plots import (
        plot_certified_over_time,
        plot_error_vs_box,
        plot_theta_over_time,
    )

    ok = [r for r in records if r.result is not None]
    t0 = records[0].stamp_ns
    t = np.array([(r.stamp_ns - t0) * 1e-9 for r in ok])
    widths = np.stack([np.where(r.result.certified, box_widths(r.result.boxes), np.nan)
                       for r in ok])
    with np.errstate(all='ignore'):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)
            med, mx = np.nanmedian(widths, axis=1), np.nanmax(widths, axis=1)
    out = []
    err = None
    if labels is not None and any(r.label is not None for r in ok):
        err = np.full(len(ok), np.nan)
        for i, r in enumerate(ok):
            if r.label is not None and (r.label.visibility > 0).any():
                e = keypoint_errors(r.result.keypoints, r.label.keypoints)
                err[i] = float(np.median(e[r.label.visibility > 0]))
    plot_certified_over_time(stage / 'certified_over_time.png', t,
                             np.array([r.result.certified_fraction for r in ok]), med, mx, err)
    out.append(('certified_over_time.png', 'Certified fraction, certified box width'
                + (' and error' if err is not None else '') + ' over time'))
    alpha = np.array([r.result.interval.alpha for r in ok])
    beta = np.array([r.result.interval.beta for r in ok])
    ranges = truth['_ranges'] if truth else None
    plot_theta_over_time(stage / 'theta_over_time.png', t, alpha, beta,
                         None if ranges is None else ranges[:, :2],
                         None if ranges is None else ranges[:, 2:])
    out.append(('theta_over_time.png', 'Measured θ interval over time'))
    series = {name: [r.timings_ms.get(key, math.nan) for r in ok]
              for name, key in (('pipeline total', 'total'), ('certify', 'certify'),
                                ('infer', 'infer'))}
    plot_histograms(stage / 'latency_hist.png', series, xlabel='ms per frame',
                    title='per-frame latency (this machine)')
    out.append(('latency_hist.png', 'Latency histogram'))
    lab = [r for r in ok if r.label is not None]
    if labels is not None and lab:
        mask = np.concatenate([r.label.visibility > 0 for r in lab])
        err = np.concatenate([keypoint_errors(r.result.keypoints, r.label.keypoints)
                              for r in lab])[mask]
        wid = np.concatenate([box_widths(r.result.boxes) for r in lab])[mask]
        cert = np.concatenate([r.result.certified for r in lab])[mask]
        plot_error_vs_box(stage / 'error_vs_box.png', wid, err, cert, tuple(tolerances))
        out.append(('error_vs_box.png', 'Error against certified box size'))
    return out


def build_summary(records: list, *, topic: str, bag, msgtype: str, frames_in_topic: int | None,
                  pipeline, labels, tolerances: Sequence[float], wall_s: float,
                  failure: str | None, window: dict, command: str | None,
                  ) -> tuple[dict[str, Any], dict | None]:
    """summary.json's document (and the θ-truth ranges for the plot, when known)."""
    ok = [r for r in records if r.result is not None]
    status = np.concatenate([r.result.status for r in ok]) if ok else np.zeros(0, np.uint8)
    widths = np.concatenate([box_widths(r.result.boxes)[r.result.certified] for r in ok]) \
        if ok else np.zeros(0)
    s = pipeline.settings
    truth = _theta_truth(records, s.interval.window_s, s.interval.max_frames)
    timings = {k: _stats([r.timings_ms.get(k, math.nan) for r in ok])
               for k in ('read_decode', 'infer', 'interval', 'certify', 'total', 'write',
                         'frame')}
    summary: dict[str, Any] = {
        'partial': failure is not None,
        'error': failure,
        'command': command,
        'bag': {'path': str(bag.path), 'storage': bag.storage, 'topic': topic,
                'msgtype': msgtype, 'messages_in_topic': frames_in_topic,
                'damaged': bag.damage, **{k: v for k, v in window.items() if v is not None}},
        'frames': len(records),
        'frames_processed': len(ok),
        'frames_malformed': len(records) - len(ok),
        'keypoints': int(status.size),
        'status_counts': {c.name: int((status == int(c)).sum()) for c in CertStatus},
        'certified_fraction': float((status == int(CertStatus.CERTIFIED)).mean())
        if status.size else math.nan,
        'certified_box_width_px': {
            'median': float(np.median(widths)) if widths.size else math.nan,
            'p95': float(np.percentile(widths, 95)) if widths.size else math.nan,
            'max': float(widths.max()) if widths.size else math.nan},
        'interval': {
            'alpha_width_median': float(np.median([r.result.interval.alpha[1]
                                                   - r.result.interval.alpha[0] for r in ok]))
            if ok else math.nan,
            'beta_width_median': float(np.median([r.result.interval.beta[1]
                                                  - r.result.interval.beta[0] for r in ok]))
            if ok else math.nan,
            'unreliable_frames': sum(not r.result.interval.reliable for r in ok)},
        'labels': _label_metrics(records, labels, tolerances) if labels is not None else None,
        'theta_truth': None if truth is None else {k: v for k, v in truth.items()
                                                   if not k.startswith('_')},
        'latency_ms': timings,
        'throughput_fps': len(records) / wall_s if wall_s > 0 else math.nan,
        'wall_s': wall_s,
        'settings': pipeline.describe(),
        'deterministic_files': ['frames.csv', 'keypoints.mcap'],
    }
    return summary, truth


def report_markdown(summary: dict[str, Any], figures: list[tuple[str, str]],
                    tolerances: Sequence[float]) -> str:
    """report.md's text."""
    s = summary
    lines = ['# Bag evaluation', '']
    if s['partial']:
        lines += [f'> **PARTIAL RUN** — the bag broke after {s["frames"]} frames: {s["error"]}. '
                  'Everything below covers only the frames read.', '']
    bag = s['bag']
    cert = s['settings']['certify']
    lines += [
        f'- bag: `{bag["path"]}` ({bag["storage"]}), topic `{bag["topic"]}` ({bag["msgtype"]})',
        f'- model: `{s["settings"]["model_source"]}` (sha256 '
        f'`{str(s["settings"]["model_sha256"])[:12]}`), readout {s["settings"]["readout"]}',
        f'- certification: {cert["method"]}, {cert["max_subboxes"]} θ sub-boxes per frame, '
        f'budget_ms {cert["budget_ms"]}; interval {s["settings"]["interval"]["mode"]}',
        '',
        markdown_table(['frames', 'processed', 'malformed', 'keypoints', 'certified fraction',
                        'median certified box (px)', 'p95 certified box (px)'],
                       [[s['frames'], s['frames_processed'], s['frames_malformed'],
                         s['keypoints'], s['certified_fraction'],
                         s['certified_box_width_px']['median'],
                         s['certified_box_width_px']['p95']]]),
        '',
        'Status counts: ' + ', '.join(f'{k} {v}' for k, v in s['status_counts'].items()),
        '']
    lab = s['labels']
    if lab is not None:
        kind = 'pseudo-labels' if lab['pseudo_labels'] else 'labels'
        lines += [f'## Accuracy against {kind}', '',
                  f'{lab["frames_labelled"]} labelled frames from `{lab["file"]}`'
                  + (f' ({lab["description"]})' if lab['description'] else '') + '.', '']
        if lab.get('pck'):
            lines += [markdown_table(
                ['τ (px)', 'PCK@τ', 'certified accuracy@τ'],
                [[f'{t:g}', lab['pck'][f'{t:g}'], lab['certified_accuracy'][f'{t:g}']]
                 for t in tolerances]), '',
                f'Mean error {lab["mean_error_px"]:.3f} px, median {lab["median_error_px"]:.3f}'
                ' px. Certified accuracy@τ: the keypoint is certified and its whole box lies '
                'within τ of the label.', '']
    if s['theta_truth'] is not None:
        lines += [f'True θ(t) known: the measured Θ holds the true relative change of '
                  f'{s["theta_truth"]["covered_fraction"]:.3f} of '
                  f'{s["theta_truth"]["pairs"]} (frame, window frame) pairs.', '']
    lat = s['latency_ms']
    lines += ['## Timing (this machine; not part of the deterministic outputs)', '',
              markdown_table(['stage', 'p50 ms', 'p95 ms', 'mean ms'],
                             [[k, v['p50'], v['p95'], v['mean']] for k, v in lat.items()]),
              '', f'Throughput {s["throughput_fps"]:.2f} frames/s over {s["wall_s"]:.1f} s.', '']
    lines += ['## Plots', ''] + [f'![{title}]({name})' for name, title in figures] + ['']
    lines += ['## Files', '',
              '- `frames.csv`: one row per frame and keypoint; byte-identical across runs of '
              'the same bag and options (no timing columns).',
              '- `timings.csv`: per-frame wall-clock timings (ms).',
              '- `keypoints.mcap`: the node\'s output topics at the input stamps (PointCloud2 '
              'keypoints, PolygonStamped Θ, info JSON); open it next to the bag in Foxglove.',
              '- `summary.json`: the numbers above and the settings.', '']
    return '\n'.join(lines)


def write_report(stage: Path, records: list, *, topic: str, bag, msgtype: str,
                 frames_in_topic: int | None, pipeline, labels, tolerances: Sequence[float],
                 wall_s: float, failure: str | None, plots: bool, window: dict,
                 command: str | None) -> dict[str, Any]:
    """Write every report file of an evaluation into ``stage``; return the summary."""
    names = pipeline.keypoint_names
    write_csv(stage / 'frames.csv', frame_rows(records, names), FRAME_FIELDS)
    write_csv(stage / 'timings.csv', timing_rows(records), TIMING_FIELDS)
    summary, truth = build_summary(
        records, topic=topic, bag=bag, msgtype=msgtype, frames_in_topic=frames_in_topic,
        pipeline=pipeline, labels=labels, tolerances=tolerances, wall_s=wall_s,
        failure=failure, window=window, command=command)
    figures = _plots(stage, records, labels, tolerances, truth) if plots and any(
        r.result is not None for r in records) else []
    write_json(stage / 'summary.json', summary)
    (stage / 'report.md').write_text(report_markdown(summary, figures, tolerances))
    if failure is not None:
        (stage / 'PARTIAL').write_text(f'partial evaluation: {failure}\n'
                                       f'frames processed: {len(records)}\n')
    return summary


def remove_stale(out: Path, written: Sequence[str]) -> None:
    """Delete eval-bag files of an earlier run in ``out`` that this run did not write."""
    for name in OUTPUT_FILES:
        if name not in written and (out / name).is_file():
            (out / name).unlink()
