"""The ``certify`` report: summary.json, keypoints.csv, report.md and plots in one folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2

from usn_perception.bounds.rounding import resolve_precision
from usn_perception.certify import (
    EXACT_VALUES,
    LEVEL_NODES,
    Budget,
    CertStatus,
    PhotometricBox,
    certify_keypoints,
)
from usn_perception.certify_dataset import ROW_FIELDS, certify_dataset
from usn_perception.evaluation import box_widths
from usn_perception.model_io import model_name
from usn_perception.reports import (
    markdown_table,
    plot_histograms,
    plot_lines,
    staged_output,
    write_csv,
    write_json,
)
from usn_perception.visualize import draw_keypoints, tile


def model_labels(detectors: Sequence) -> list[str]:
    """One label per model: its name, with ``#i`` only where another model has the same name."""
    names = [model_name(d.source) for d in detectors]
    return [n if names.count(n) == 1 or names.index(n) == i else f'{n}#{i}'
            for i, n in enumerate(names)]


def write_certify_report(
    out: str | Path,
    detectors: Sequence,
    dataset,
    box: PhotometricBox,
    *,
    tolerances: Sequence[float],
    method: str = 'forward',
    budget: Budget | None = None,
    limit: int | None = None,
    sweep: Sequence[float] | None = None,
    sweep_limit: int = 20,
    progress: bool = True,
    data_path: str | Path | None = None,
    exact_values: int = EXACT_VALUES,
    precision: str = 'auto',
    level_nodes: int = LEVEL_NODES,
) -> dict:
    """Certify each detector on ``dataset`` and write the report into ``out`` atomically."""
    per_model, runs = [], []
    labels = model_labels(detectors)
    for det, label in zip(detectors, labels, strict=True):
        run = certify_dataset(det, dataset, box, method=method, budget=budget, limit=limit,
                              progress=progress, desc=f'certify {label}',
                              exact_values=exact_values, precision=precision,
                              level_nodes=level_nodes)
        s = run.summary(tolerances)
        s.update(model=label, model_path=det.source, model_sha256=det.sha256,
                 parameters=det.num_parameters, readout=det.readout)
        per_model.append(s)
        runs.append(run)

    sweep_rows = {}
    if sweep:
        for det, label in zip(detectors, labels, strict=True):
            points = []
            for f in sorted(sweep):
                r = certify_dataset(det, dataset, box.scaled(f), method=method, budget=budget,
                                    limit=min(sweep_limit, limit or sweep_limit),
                                    progress=progress, desc=f'sweep {label} x{f:g}',
                                    exact_values=exact_values, precision=precision,
                                    level_nodes=level_nodes)
                points.append((f, r.summary(tolerances)['certified_accuracy']))
            sweep_rows[label] = points

    summary = {
        **per_model[0],
        'box': box.to_json(),
        'method': method,
        'exact_values': exact_values,
        'level_nodes': level_nodes,
        'precision': resolve_precision(precision, detectors[0].device),
        'budget': None if budget is None else {'max_subboxes': budget.max_subboxes,
                                               'max_ms': budget.max_ms},
        'data': str(data_path) if data_path else None,
        'tolerances': list(tolerances),
        'models': per_model,
        'sweep': {k: [{'scale': f, 'certified_accuracy': acc} for f, acc in v]
                  for k, v in sweep_rows.items()},
    }
    with staged_output(out) as stage:
        rows = []
        for label, run in zip(labels, runs, strict=True):
            rows += [{'model': label, **r} for r in run.rows()]
        write_csv(stage / 'keypoints.csv', rows, ('model', *ROW_FIELDS))
        plot_histograms(
            stage / 'box_width_hist.png',
            {lab: box_widths(run.boxes)[run.status == int(CertStatus.CERTIFIED)].ravel()
             for lab, run in zip(labels, runs, strict=True)},
            xlabel='certified box width (px, larger side)',
            title=f'box widths, α∈{list(box.alpha)}, β∈{list(box.beta)}')
        if sweep_rows:
            series = {}
            for label, points in sweep_rows.items():
                for t in tolerances:
                    series[f'{label} τ={t:g}px'] = (
                        [f for f, _ in points], [acc[f'{t:g}'] for _, acc in points])
            plot_lines(stage / 'certified_accuracy_vs_size.png', series,
                       xlabel='box scale about θ=(1,0) (1 = the requested box)',
                       ylabel='certified accuracy', title='certified accuracy vs perturbation',
                       ylim=(0, 1.02))
        _examples(stage / 'examples.png', detectors[0], dataset, box, method, budget,
                  exact_values, precision, level_nodes)
        (stage / 'report.md').write_text(_markdown(summary, tolerances, bool(sweep_rows)))
        write_json(stage / 'summary.json', summary)
    return summary


def _examples(path: Path, det, dataset, box, method, budget, exact_values: int,
              precision: str = 'auto', level_nodes: int = LEVEL_NODES, count: int = 3) -> None:
    tiles = []
    for i in range(min(count, len(dataset))):
        img = dataset.load_image(i)
        cert = certify_keypoints(det, img, box, method=method, budget=budget,
                                 exact_values=exact_values, precision=precision,
                                 level_nodes=level_nodes)
        tiles.append(draw_keypoints(img, cert.nominal, boxes=cert.boxes,
                                    certified=cert.certified, truth=dataset.samples[i].keypoints,
                                    scale=2))
    if tiles:
        cv2.imwrite(str(path), tile(tiles, columns=min(3, len(tiles))))


def _markdown(summary: dict, tolerances: Sequence[float], has_sweep: bool) -> str:
    heads = ['model', 'params'] + [f'cert acc @{t:g}px' for t in tolerances] + [
        f'clean PCK @{t:g}px' for t in tolerances] + [
        'median box width (px)', 'certify s/img', 'predict s/img']
    rows = []
    for m in summary['models']:
        rows.append([m['model'], m['parameters']]
                    + [m['certified_accuracy'][f'{t:g}'] for t in tolerances]
                    + [m['clean_pck'][f'{t:g}'] for t in tolerances]
                    + [m['median_box_width_px'], m['seconds_per_image'],
                       m['predict_seconds_per_image']])
    box = summary['box']
    text = [
        '# Certification report', '',
        f'Perturbation set: α ∈ {box["alpha"]}, β ∈ {box["beta"]} '
        f'(x\' = clip(α·x + β, 0, 1)); method `{summary["method"]}`, budget '
        f'{summary["budget"] or "offline default"}, exact first-stage values '
        f'{summary["exact_values"]}, level nodes {summary["level_nodes"]}, '
        f'precision {summary["precision"]}; '
        f'data `{summary["data"]}`, '
        f'{summary["images"]} images, {summary["keypoints"]} labelled keypoints.', '',
        'A keypoint is *certified correct at τ* when its whole certified box lies within τ '
        'pixels of the ground truth, for every (α, β) in the set.', '',
        markdown_table(heads, rows), '',
        '![box widths](box_width_hist.png)', '',
    ]
    if has_sweep:
        text += ['![certified accuracy vs perturbation size](certified_accuracy_vs_size.png)',
                 '']
    text += ['![examples: green boxes certified, yellow crosses ground truth](examples.png)', '']
    return '\n'.join(text)
