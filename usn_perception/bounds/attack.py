"""Empirical keypoint ranges over Θ: a dense θ grid plus a zooming pattern-search attack.

This is the falsifier that tests and benchmarks set against certificates: every θ it tries is a
concrete perturbed image, so its range is an inner estimate of the true one (a certificate
must contain it), and the ratio certified width / empirical width measures tightness. The
search runs, for each keypoint, axis and side, a batched local grid around the best θ so far,
shrinking the window each round; it needs no gradients, so it works for argmax as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from usn_perception.bounds.box import PhotometricBox
from usn_perception.bounds.inputs import ImageEncoding
from usn_perception.readout import read_keypoints


@dataclass(frozen=True)
class EmpiricalRange:
    """Per keypoint (K, 2) lowest / highest (x, y) seen, and the θ (K, 2, 2) that gave them."""

    lo: np.ndarray
    hi: np.ndarray
    theta_lo: np.ndarray
    theta_hi: np.ndarray
    evaluations: int

    @property
    def widths(self) -> np.ndarray:
        """Empirical extent along x and y in pixels, shape (K, 2)."""
        return self.hi - self.lo


def grid_thetas(box: PhotometricBox, n: int) -> np.ndarray:
    """(n·n, 2) θ on a regular grid including the corners and edges of ``box``."""
    a = np.linspace(box.alpha[0], box.alpha[1], n)
    b = np.linspace(box.beta[0], box.beta[1], n)
    return np.stack(np.meshgrid(a, b, indexing='ij'), -1).reshape(-1, 2)


class BatchedPredictor:
    """``predict`` for many θ at once (same preprocessing, batched network calls)."""

    def __init__(self, detector, image: np.ndarray, readout: str | None = None,
                 batch: int = 64) -> None:
        self.detector = detector
        self.readout = readout or detector.readout
        self.enc = ImageEncoding(image, detector.config.input_size, detector.device)
        self.mapping = detector.mapping(image.shape)
        self.batch = batch

    @torch.no_grad()
    def __call__(self, thetas: np.ndarray) -> np.ndarray:
        """(M, 2) θ → (M, K, 2) keypoints in image pixels."""
        out = []
        t = torch.as_tensor(np.asarray(thetas, dtype=np.float64), device=self.enc.device)
        for part in t.split(self.batch):
            hm = self.detector.net(self.enc.evaluate(part))
            out.append(read_keypoints(hm, self.readout).cpu().numpy())
        return self.mapping.to_image(np.concatenate(out)) if out else np.zeros((0, 0, 2))


def empirical_range(detector, image: np.ndarray, box: PhotometricBox, *,
                    readout: str | None = None, grid: int = 17, rounds: int = 4,
                    local: int = 5, random: int = 32, seed: int = 0) -> EmpiricalRange:
    """Grid + random samples + zooming search for the extreme keypoint coordinates."""
    predict = BatchedPredictor(detector, image, readout)
    rng = np.random.default_rng(seed)
    lo_t = np.array([box.alpha[0], box.beta[0]])
    hi_t = np.array([box.alpha[1], box.beta[1]])
    thetas = np.concatenate([grid_thetas(box, grid),
                             lo_t + (hi_t - lo_t) * rng.random((random, 2))])
    pts = predict(thetas)
    k = pts.shape[1]
    # Track 4 objectives per keypoint: (axis, side) = min x, max x, min y, max y.
    sign = np.array([-1.0, 1.0, -1.0, 1.0])
    axis = np.array([0, 0, 1, 1])
    score = pts[:, :, axis] * sign  # (M, K, 4), larger is "more extreme"
    best = score.max(0)
    best_t = thetas[score.argmax(0)]  # (K, 4, 2)
    evaluations = len(thetas)
    half = (hi_t - lo_t) / max(grid - 1, 1)
    offsets = np.stack(np.meshgrid(np.linspace(-1, 1, local), np.linspace(-1, 1, local),
                                   indexing='ij'), -1).reshape(-1, 2)
    for _ in range(rounds):
        cand = np.clip(best_t[:, :, None, :] + offsets * half, lo_t, hi_t)  # (K, 4, L, 2)
        flat = cand.reshape(-1, 2)
        p = predict(flat).reshape(k, 4, len(offsets), k, 2)
        evaluations += len(flat)
        idx = np.arange(k)
        own = p[idx, :, :, idx, :]  # (K, 4, L, 2): keypoint j's own searches
        s = np.stack([own[:, o, :, axis[o]] * sign[o] for o in range(4)], 1)  # (K, 4, L)
        j = s.argmax(2)
        gain = s.max(2)
        better = gain > best
        best = np.where(better, gain, best)
        best_t = np.where(better[..., None], np.take_along_axis(
            cand, j[:, :, None, None].repeat(2, 3), 2)[:, :, 0], best_t)
        half = half / 2.0
    lo = np.stack([-best[:, 0], -best[:, 2]], -1)
    hi = np.stack([best[:, 1], best[:, 3]], -1)
    return EmpiricalRange(lo, hi, best_t[:, [0, 2]], best_t[:, [1, 3]], evaluations)
