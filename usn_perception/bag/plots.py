"""The eval-bag plots that need more than a line per series (bands, twin panels, scatter).

Simple lines and histograms come from :mod:`usn_perception.reports`; this module adds only
the time-series panels and the error/box scatter. Plots show metrics, never frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from usn_perception.reports import plt  # the Agg-configured pyplot


def plot_certified_over_time(path: Path, t: np.ndarray, fraction: np.ndarray,
                             width_median: np.ndarray, width_max: np.ndarray,
                             error_median: np.ndarray | None = None) -> None:
    """Panels over time: certified fraction; certified box width; error vs label if known."""
    rows = 2 if error_median is None else 3
    fig, axes = plt.subplots(rows, 1, figsize=(7, 2.5 * rows), dpi=110, sharex=True)
    a, b = axes[0], axes[1]
    a.step(t, fraction, where='mid', lw=1)
    a.set_ylim(-0.05, 1.05)
    a.set_ylabel('certified fraction')
    a.set_title('certified keypoints and certified box width per frame')
    a.grid(alpha=0.3)
    b.plot(t, width_median, lw=1, label='median over keypoints')
    b.plot(t, width_max, lw=0.8, alpha=0.6, label='max over keypoints')
    b.set_ylabel('box width (px)')
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    if error_median is not None:
        c = axes[2]
        c.plot(t, error_median, lw=1, color='tab:purple')
        c.set_ylabel('error vs label (px)\nmedian over keypoints')
        c.grid(alpha=0.3)
    axes[-1].set_xlabel('time since first frame (s)')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_theta_over_time(path: Path, t: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                         truth_alpha: np.ndarray | None = None,
                         truth_beta: np.ndarray | None = None) -> None:
    """The measured Θ per frame as bands (α top, β bottom), with the true range if known.

    ``alpha``/``beta`` are (N, 2) [lo, hi]; ``truth_*`` (N, 2) the range of the true relative
    change of the frames in each window (synthetic bags only).
    """
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), dpi=110, sharex=True)
    for ax, band, truth, name, ident in ((axes[0], alpha, truth_alpha, 'α (contrast)', 1.0),
                                         (axes[1], beta, truth_beta, 'β (brightness)', 0.0)):
        ax.fill_between(t, band[:, 0], band[:, 1], step='mid', alpha=0.35,
                        label='measured Θ (certified over)')
        ax.axhline(ident, color='k', lw=0.6, ls=':')
        if truth is not None:
            ax.plot(t, truth[:, 0], 'r--', lw=0.8, drawstyle='steps-mid',
                    label='true relative change (window)')
            ax.plot(t, truth[:, 1], 'r--', lw=0.8, drawstyle='steps-mid')
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc='upper right')
    axes[0].set_title('photometric interval Θ per frame')
    axes[1].set_xlabel('time since first frame (s)')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_error_vs_box(path: Path, width: np.ndarray, error: np.ndarray,
                      certified: np.ndarray, tolerances: tuple[float, ...]) -> None:
    """Error against the label vs certified box width, one dot per labelled keypoint."""
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    ok = np.isfinite(width) & np.isfinite(error)
    for mask, name, colour in ((ok & certified, 'certified', 'tab:green'),
                               (ok & ~certified, 'not certified', 'tab:red')):
        if mask.any():
            ax.scatter(width[mask], error[mask], s=8, alpha=0.6, c=colour, label=name)
    for tol in tolerances:
        ax.axhline(tol, color='k', lw=0.5, ls=':')
    ax.set_xlabel('certified box width (px, larger side)')
    ax.set_ylabel('error vs label (px)')
    ax.set_title('keypoint error against certified box size')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
