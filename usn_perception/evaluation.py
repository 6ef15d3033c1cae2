"""Clean keypoint accuracy: mean pixel error and PCK@τ in input-image pixels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def keypoint_errors(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Euclidean error per keypoint, (..., K, 2) × (..., K, 2) → (..., K)."""
    return np.linalg.norm(np.asarray(pred, np.float64) - np.asarray(truth, np.float64), axis=-1)


def pck(errors: np.ndarray, labelled: np.ndarray, tolerance: float) -> float:
    """Fraction of labelled keypoints whose error is ≤ ``tolerance`` pixels."""
    mask = np.asarray(labelled, bool)
    if not mask.any():
        return float('nan')
    return float((np.asarray(errors)[mask] <= tolerance).mean())


def accuracy_summary(
    pred: np.ndarray, truth: np.ndarray, labelled: np.ndarray, tolerances: Sequence[float]
) -> dict:
    """Mean/median error and PCK per tolerance over all labelled keypoints."""
    err = keypoint_errors(pred, truth)
    mask = np.asarray(labelled, bool)
    valid = err[mask]
    return {
        'keypoints': int(mask.sum()),
        'mean_error_px': float(valid.mean()) if valid.size else float('nan'),
        'median_error_px': float(np.median(valid)) if valid.size else float('nan'),
        'pck': {f'{t:g}': pck(err, mask, t) for t in tolerances},
    }


def box_max_distance(boxes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Distance from each ground-truth point to the farthest point of its box, (..., K).

    ``boxes`` (..., K, 4) = [u_lo, u_hi, v_lo, v_hi]; NaN boxes give NaN. A keypoint is
    *certified correct at τ* when this is ≤ τ: every location the detector can output under
    the perturbation set is within τ pixels of the truth.
    """
    b = np.asarray(boxes, np.float64)
    t = np.asarray(truth, np.float64)
    du = np.maximum(np.abs(b[..., 0] - t[..., 0]), np.abs(b[..., 1] - t[..., 0]))
    dv = np.maximum(np.abs(b[..., 2] - t[..., 1]), np.abs(b[..., 3] - t[..., 1]))
    return np.hypot(du, dv)


def certified_accuracy(
    boxes: np.ndarray, certified: np.ndarray, truth: np.ndarray, labelled: np.ndarray,
    tolerance: float,
) -> float:
    """Fraction of labelled keypoints that are certified and whose whole box is within τ."""
    mask = np.asarray(labelled, bool)
    if not mask.any():
        return float('nan')
    dist = box_max_distance(boxes, truth)
    ok = np.asarray(certified, bool) & np.isfinite(dist) & (dist <= tolerance)
    return float(ok[mask].mean())


def box_widths(boxes: np.ndarray) -> np.ndarray:
    """Larger side of each box, (..., K): the number reported as "box width"."""
    b = np.asarray(boxes, np.float64)
    return np.maximum(b[..., 1] - b[..., 0], b[..., 3] - b[..., 2])
