"""``usn-perception demo``: the main job on the shipped default, end to end, with pictures.

Renders a fresh synthetic test set (backgrounds never seen in training), runs the shipped
default detector on it, and writes a summary table, ``summary.json`` and annotated images
into one output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from usn_perception.data.coco import load_coco
from usn_perception.data.synthetic import make_dataset
from usn_perception.detector import load_detector
from usn_perception.evaluation import accuracy_summary
from usn_perception.visualize import draw_keypoints, tile

TOLERANCES = (2.0, 3.0, 4.0, 5.0)


def run_demo(
    out: str | Path,
    *,
    model: str | Path | None = None,
    count: int = 300,
    seed: int = 2026,
    progress: bool = True,
    log=print,
) -> dict:
    """Run the demo into ``out`` (created; an existing demo folder is replaced part by part)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data_dir = out / 'data'
    if data_dir.exists():
        import shutil

        shutil.rmtree(data_dir)
    log(f'[1/3] rendering a fresh synthetic set ({count} images, seed {seed})')
    paths = make_dataset(data_dir, count, seed, progress=progress)
    test = load_coco(paths['test'])

    det = load_detector(model)
    log(f'[2/3] running {det!r} on {len(test)} held-out test images')
    preds, truth, labelled, images = [], [], [], []
    for i in tqdm(range(len(test)), desc='predict', disable=not progress, leave=False):
        img = test.load_image(i)
        preds.append(det.predict(img))
        truth.append(test.samples[i].keypoints)
        labelled.append(test.samples[i].visibility > 0)
        if i < 6:
            images.append(draw_keypoints(img, preds[-1], truth=truth[-1]))
    summary = accuracy_summary(np.array(preds), np.array(truth), np.array(labelled), TOLERANCES)
    summary.update(images=len(test), model=det.source, model_sha256=det.sha256,
                   seconds=time.perf_counter() - t0)

    log('[3/3] writing the report')
    (out / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
    cv2.imwrite(str(out / 'predictions.png'), tile(images))
    table = _table(summary)
    (out / 'report.md').write_text(
        '# usn_perception demo\n\n' + table + '\n\n![predictions](predictions.png)\n\n'
        'Green dots: predicted keypoints; yellow crosses: ground truth.\n')
    log(table)
    log(f'outputs in {out.resolve()}')
    return summary


def _table(summary: dict) -> str:
    pcks = ' | '.join(f'{v:.3f}' for v in summary['pck'].values())
    heads = ' | '.join(f'PCK@{t}px' for t in summary['pck'])
    return (f'| images | mean error (px) | {heads} |\n'
            f'|---|---|{"---|" * len(summary["pck"])}\n'
            f'| {summary["images"]} | {summary["mean_error_px"]:.2f} | {pcks} |')
