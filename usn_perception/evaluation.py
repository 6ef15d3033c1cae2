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
