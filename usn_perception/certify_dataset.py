"""Certify a detector over a labelled dataset: per-keypoint rows and one summary.

This is what the ``certify`` command, the pruning ablation and the model card report:
certified accuracy at τ (the whole certified box within τ px of the truth), clean PCK@τ, box
widths, and time per image for certification and for plain prediction, measured in one run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from usn_perception.certify import (
    EXACT_VALUES,
    LEVEL_NODES,
    Budget,
    CertStatus,
    PhotometricBox,
    certify_keypoints,
)
from usn_perception.evaluation import (
    box_max_distance,
    box_widths,
    certified_accuracy,
    keypoint_errors,
    pck,
)

ROW_FIELDS = ('image', 'keypoint', 'pred_x', 'pred_y', 'u_lo', 'u_hi', 'v_lo', 'v_hi',
              'status', 'box_width_px', 'gt_x', 'gt_y', 'labelled', 'error_px',
              'box_max_distance_px')


@dataclass
class CertifiedRun:
    """Raw arrays of one run plus the derived summary."""

    boxes: np.ndarray  # (N, K, 4)
    nominal: np.ndarray  # (N, K, 2)
    status: np.ndarray  # (N, K)
    truth: np.ndarray  # (N, K, 2)
    labelled: np.ndarray  # (N, K)
    file_names: list[str]
    keypoint_names: tuple[str, ...]
    certify_seconds: np.ndarray  # (N,)
    predict_seconds: np.ndarray  # (N,)
    subboxes: np.ndarray  # (N,)

    def rows(self) -> list[dict]:
        """One dict per (image, keypoint), fields :data:`ROW_FIELDS`."""
        err = keypoint_errors(self.nominal, self.truth)
        dist = box_max_distance(self.boxes, self.truth)
        widths = box_widths(self.boxes)
        out = []
        for i, name in enumerate(self.file_names):
            for k, kp in enumerate(self.keypoint_names):
                b = self.boxes[i, k]
                out.append({
                    'image': name, 'keypoint': kp,
                    'pred_x': self.nominal[i, k, 0], 'pred_y': self.nominal[i, k, 1],
                    'u_lo': b[0], 'u_hi': b[1], 'v_lo': b[2], 'v_hi': b[3],
                    'status': CertStatus(int(self.status[i, k])).name.lower(),
                    'box_width_px': widths[i, k],
                    'gt_x': self.truth[i, k, 0], 'gt_y': self.truth[i, k, 1],
                    'labelled': bool(self.labelled[i, k]), 'error_px': err[i, k],
                    'box_max_distance_px': dist[i, k],
                })
        return out

    def summary(self, tolerances: Sequence[float]) -> dict:
        """Certified accuracy and clean PCK per tolerance, widths and timings."""
        certified = self.status == int(CertStatus.CERTIFIED)
        err = keypoint_errors(self.nominal, self.truth)
        widths = box_widths(self.boxes)[certified]
        return {
            'images': len(self.file_names),
            'keypoints': int(self.labelled.sum()),
            'certified_accuracy': {f'{t:g}': certified_accuracy(
                self.boxes, certified, self.truth, self.labelled, t) for t in tolerances},
            'clean_pck': {f'{t:g}': pck(err, self.labelled, t) for t in tolerances},
            'certified_fraction': float(certified.mean()) if certified.size else float('nan'),
            'median_box_width_px': float(np.median(widths)) if widths.size else float('nan'),
            'p90_box_width_px': float(np.percentile(widths, 90)) if widths.size else float('nan'),
            'mean_error_px': float(err[self.labelled].mean()) if self.labelled.any()
            else float('nan'),
            'seconds_per_image': float(self.certify_seconds.mean()),
            'predict_seconds_per_image': float(self.predict_seconds.mean()),
            'mean_subboxes': float(self.subboxes.mean()),
        }


def certify_dataset(
    detector,
    dataset,
    box: PhotometricBox,
    *,
    method: str = 'forward',
    budget: Budget | None = None,
    readout: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    desc: str = 'certify',
    exact_values: int = EXACT_VALUES,
    precision: str = 'auto',
    level_nodes: int = LEVEL_NODES,
) -> CertifiedRun:
    """Predict and certify every image (up to ``limit``) of a labelled dataset."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError(f'{getattr(dataset, "path", "dataset")}: no images to certify')
    k = len(detector.keypoint_names)
    boxes = np.full((n, k, 4), np.nan)
    nominal = np.zeros((n, k, 2))
    status = np.zeros((n, k), np.int64)
    truth = np.zeros((n, k, 2))
    labelled = np.zeros((n, k), bool)
    t_cert, t_pred, subboxes = np.zeros(n), np.zeros(n), np.zeros(n)
    names = []
    for i in tqdm(range(n), desc=desc, disable=not progress, leave=False):
        sample = dataset.samples[i]
        image = dataset.load_image(i)
        t0 = time.perf_counter()
        detector.predict(image, readout=readout)
        t_pred[i] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cert = certify_keypoints(detector, image, box, readout=readout, method=method,
                                 budget=budget, exact_values=exact_values,
                                 precision=precision, level_nodes=level_nodes)
        t_cert[i] = time.perf_counter() - t0
        boxes[i], nominal[i], status[i] = cert.boxes, cert.nominal, cert.status
        subboxes[i] = cert.stats.get('subboxes', 0)
        truth[i] = sample.keypoints
        labelled[i] = np.asarray(sample.visibility) > 0
        names.append(sample.file_name)
    return CertifiedRun(boxes, nominal, status, truth, labelled, names,
                        tuple(detector.keypoint_names), t_cert, t_pred, subboxes)


def time_interleaved(detectors: Sequence, images: Iterable[np.ndarray], box: PhotometricBox,
                     budget: Budget | None = None, *, warm: np.ndarray | None = None,
                     **options) -> tuple[np.ndarray, list[list]]:
    """Certification seconds per detector, every image certified by every detector in turn.

    On a shared machine, timing models one after the other measures the load as much as the
    models; round-robin per image exposes them to the same conditions, so their ratios are
    what can be compared. ``warm`` (an image) is certified once per detector first, untimed.
    ``options`` go to :func:`certify_keypoints`. Returns total seconds (D,) and the
    certificates, per detector and image.
    """
    if warm is not None:
        for det in detectors:
            certify_keypoints(det, warm, box, budget=budget, **options)
    seconds = np.zeros(len(detectors))
    certs: list[list] = [[] for _ in detectors]
    for image in images:
        for j, det in enumerate(detectors):
            t0 = time.perf_counter()
            certs[j].append(certify_keypoints(det, image, box, budget=budget, **options))
            seconds[j] += time.perf_counter() - t0
    return seconds, certs
