"""USN (Unbiased and Smooth Neuron) scores: how stable each channel is under lighting change.

For every prunable channel j (the BatchNorm output, i.e. the ReLU's pre-activation z_j) we
compare the clean image x with perturbed images ``x'(θ) = clip(α·x + β, 0, 1)`` for θ drawn
uniformly from a box Θ, at every spatial position p of every scoring image n:

* ``bias_j``     = mean over n, p, θ of z_j(x'(θ)) − z_j(x)          (signed mean shift)
* ``bias_sq_j``  = mean over n, p of (E_θ z_j(x'(θ)) − z_j(x))²        ("unbiased" ⇔ small)
* ``variance_j`` = mean over n, p of Var_θ z_j(x'(θ))                  ("smooth" ⇔ small)
* ``spread_j``   = standard deviation of the clean z_j(x) over n, p    (the channel's signal)
* ``USN_j = 1 / (1 + (bias_sq_j + variance_j) / spread_j²)``           in (0, 1]

``bias_sq + variance`` is E[(z(x') − z(x))²], the squared 2-Wasserstein distance between the
channel's perturbed responses and its clean response, so USN reads "signal power over
perturbation power". Low USN = unstable under brightness/contrast = pruned first. A channel
with no clean signal (zero spread, or a ReLU output that is zero on every scoring position)
gets USN 0 and goes first too. Scores are deterministic for a seed.

The optional bound-based score (:func:`bound_scores`) uses the certification engine instead of
samples: 1 − the fraction of the channel's neurons whose ReLU is unstable over Θ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from usn_perception.errors import UnsupportedLayerError
from usn_perception.network import InputNormalization, prunable_layers

FORMAT = 'usn_perception.usn/1'
METHODS = ('usn', 'bound')
STATS = ('bias', 'bias_sq', 'variance', 'spread', 'active', 'score')
#: Layers a prunable chain may hold; anything else is refused by name.
SUPPORTED = (InputNormalization, nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU)


@dataclass
class LayerScores:
    """Per-channel statistics of one prunable layer (all arrays have ``width`` entries)."""

    index: int  # position of the conv in the nn.Sequential
    kind: str  # Conv2d or ConvTranspose2d
    bias: np.ndarray
    bias_sq: np.ndarray
    variance: np.ndarray
    spread: np.ndarray
    active: np.ndarray  # fraction of clean positions where the ReLU passes (z > 0)
    score: np.ndarray

    @property
    def width(self) -> int:
        """Number of channels."""
        return int(self.score.shape[0])

    def to_json(self) -> dict:
        """JSON form (lists of floats)."""
        d = {'index': self.index, 'kind': self.kind, 'width': self.width}
        d.update({k: [float(v) for v in getattr(self, k)] for k in STATS})
        return d

    @classmethod
    def from_json(cls, d: dict) -> LayerScores:
        """Inverse of :meth:`to_json`."""
        return cls(int(d['index']), str(d['kind']),
                   **{k: np.asarray(d[k], np.float64) for k in STATS})


@dataclass
class UsnScores:
    """Scores of every prunable layer, with how they were computed."""

    layers: list[LayerScores]
    method: str = 'usn'
    settings: dict = field(default_factory=dict)

    def vectors(self) -> list[np.ndarray]:
        """The score vector of each prunable layer, in network order."""
        return [layer.score for layer in self.layers]

    def to_json(self) -> dict:
        """JSON document (``format`` tagged)."""
        return {'format': FORMAT, 'method': self.method, 'settings': self.settings,
                'layers': [layer.to_json() for layer in self.layers]}

    @classmethod
    def from_json(cls, doc: dict) -> UsnScores:
        """Inverse of :meth:`to_json`; refuses other documents."""
        if not isinstance(doc, dict) or doc.get('format') != FORMAT:
            raise ValueError(f'not a USN score document (format must be {FORMAT!r})')
        return cls([LayerScores.from_json(d) for d in doc['layers']], doc.get('method', 'usn'),
                   dict(doc.get('settings') or {}))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON document."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + '\n')
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> UsnScores:
        """Read a document written by :meth:`save`."""
        return cls.from_json(json.loads(Path(path).read_text()))

    def summary(self) -> list[dict]:
        """Per-layer min / median / max score, for printing."""
        return [{'index': s.index, 'width': s.width, 'min': float(s.score.min()),
                 'median': float(np.median(s.score)), 'max': float(s.score.max()),
                 'no_signal': int((s.score == 0).sum())} for s in self.layers]


def check_network(net: nn.Module) -> list[tuple[int, nn.Module, nn.BatchNorm2d]]:
    """Return the prunable (index, conv, bn) triples; refuse chains we cannot score or prune.

    The chain must be an ``nn.Sequential`` of the project's layers, every hidden conv followed
    by its BatchNorm, ungrouped, ending in a conv (the heatmap head, never pruned).
    """
    if not isinstance(net, nn.Sequential):
        raise UnsupportedLayerError(
            f'expected the detector nn.Sequential chain, got {type(net).__name__}')
    for i, m in enumerate(net):
        if not isinstance(m, SUPPORTED):
            raise UnsupportedLayerError(
                f'layer {i} ({type(m).__name__}) is not supported for USN scoring / pruning; '
                f'supported: {", ".join(t.__name__ for t in SUPPORTED)}')
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.groups != 1:
            raise UnsupportedLayerError(f'layer {i} ({m}) is a grouped convolution')
    if not len(net) or not isinstance(net[-1], nn.Conv2d):
        raise UnsupportedLayerError('the chain must end in the heatmap Conv2d head')
    layers = prunable_layers(net)
    if not layers:
        raise UnsupportedLayerError('the network has no prunable conv + BatchNorm layer')
    return layers


def sample_thetas(n: int, k: int, alpha: Sequence[float], beta: Sequence[float],
                  gen: torch.Generator) -> torch.Tensor:
    """(n, k, 2) θ = (α, β) drawn uniformly in the box, from ``gen`` (deterministic)."""
    u = torch.rand(n, k, 2, generator=gen, dtype=torch.float64)
    lo = torch.tensor([alpha[0], beta[0]], dtype=torch.float64)
    hi = torch.tensor([alpha[1], beta[1]], dtype=torch.float64)
    return lo + u * (hi - lo)


def perturb(images: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """(n,1,H,W) images × (n,k,2) θ → (n,1+k,1,H,W) [clean, x'(θ_1), …, x'(θ_k)]."""
    a = thetas[..., 0, None, None, None].to(images.dtype)
    b = thetas[..., 1, None, None, None].to(images.dtype)
    pert = (a * images[:, None] + b).clamp(0, 1)
    return torch.cat([images[:, None], pert], dim=1)


def _check_inputs(images: torch.Tensor, alpha: Sequence[float], beta: Sequence[float],
                  samples: int) -> None:
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f'images must be N×1×H×W, got shape {tuple(images.shape)}')
    if images.shape[0] == 0:
        raise ValueError('no scoring images: the dataset is empty')
    if samples < 2:
        raise ValueError(f'samples (θ per image) must be >= 2 for a variance, got {samples}')
    if not (len(alpha) == 2 and len(beta) == 2 and alpha[0] <= alpha[1] and beta[0] <= beta[1]
            and alpha[0] > 0):
        raise ValueError(f'invalid θ box alpha={tuple(alpha)}, beta={tuple(beta)}')


def choose_images(n: int, limit: int | None, seed: int) -> torch.Tensor:
    """Indices of the scoring images: all, or a seeded random subset of ``limit``."""
    if limit is None or limit >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed + 7919)
    return torch.randperm(n, generator=gen)[:limit].sort().values


class _Accumulator:
    """Running per-channel sums for one layer (float64, so long runs do not drift)."""

    def __init__(self, width: int) -> None:
        self.sums = torch.zeros(6, width, dtype=torch.float64)
        self.count = 0

    def add(self, z: torch.Tensor) -> None:
        """Fold in pre-activations ``z`` of shape (n, 1+k, C, H, W); slot 0 is clean."""
        z = z.double()
        z0, zt = z[:, 0], z[:, 1:]
        mean_t = zt.mean(1)
        shift = mean_t - z0
        dims = (0, 2, 3)
        self.sums[0] += shift.sum(dims)
        self.sums[1] += (shift**2).sum(dims)
        self.sums[2] += zt.var(1, unbiased=False).sum(dims)
        self.sums[3] += z0.sum(dims)
        self.sums[4] += (z0**2).sum(dims)
        self.sums[5] += (z0 > 0).double().sum(dims)
        self.count += z0.numel() // z0.shape[1]

    def result(self, index: int, kind: str) -> LayerScores:
        """Turn the sums into :class:`LayerScores`."""
        m = (self.sums / max(self.count, 1)).numpy()
        bias, bias_sq, variance, mean0, sq0, active = m
        spread2 = np.maximum(sq0 - mean0**2, 0.0)
        score = usn_score(bias_sq, variance, spread2, active)
        return LayerScores(index, kind, bias, bias_sq, variance, np.sqrt(spread2), active, score)


def usn_score(bias_sq: np.ndarray, variance: np.ndarray, spread2: np.ndarray,
              active: np.ndarray) -> np.ndarray:
    """``1 / (1 + (bias² + var) / spread²)``; 0 where the channel carries no clean signal."""
    scale = float(np.max(spread2)) if spread2.size else 0.0
    no_signal = (spread2 <= 1e-12 * max(scale, 1e-30)) | (active <= 0)
    with np.errstate(divide='ignore', invalid='ignore'):
        score = 1.0 / (1.0 + (bias_sq + variance) / spread2)
    return np.where(no_signal, 0.0, score)


@torch.no_grad()
def usn_scores(
    net: nn.Module,
    images: torch.Tensor,
    alpha: Sequence[float] = (0.8, 1.2),
    beta: Sequence[float] = (-0.1, 0.1),
    *,
    samples: int = 8,
    max_images: int | None = 128,
    batch: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> UsnScores:
    """USN statistics of every prunable channel of ``net`` (see the module docstring).

    ``images`` are network inputs (N×1×H×W in [0, 1], e.g. ``prepare(...).images``); at most
    ``max_images`` of them (a seeded subset) each get ``samples`` θ drawn uniformly from
    ``alpha × beta``; ``batch`` images (× (1 + samples) inputs) go through the net at once.
    The network is evaluated in eval mode on a copy; ``net`` itself is not touched.
    """
    layers = check_network(net)
    _check_inputs(images, alpha, beta, samples)
    if batch < 1:
        raise ValueError(f'batch must be >= 1, got {batch}')
    was_training = net.training
    net.eval()
    idx = choose_images(images.shape[0], max_images, seed)
    # All θ up front: the draws do not depend on the batch size.
    thetas_all = sample_thetas(len(idx), samples, alpha, beta,
                               torch.Generator().manual_seed(seed))
    accs = [_Accumulator(bn.num_features) for _, _, bn in layers]
    captured: dict[int, torch.Tensor] = {}
    hooks = [bn.register_forward_hook(lambda m, i, o, pos=pos: captured.__setitem__(pos, o))
             for pos, (_, _, bn) in enumerate(layers)]
    dtype = next(net.parameters()).dtype
    try:
        for start in tqdm(range(0, len(idx), batch), desc='USN scores', disable=not progress,
                          leave=False):
            x = images[idx[start:start + batch]].to(dtype)
            inputs = perturb(x, thetas_all[start:start + batch])
            net(inputs.flatten(0, 1))
            for pos, acc in enumerate(accs):
                z = captured[pos]
                acc.add(z.view(x.shape[0], samples + 1, *z.shape[1:]))
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    settings = {'alpha': list(map(float, alpha)), 'beta': list(map(float, beta)),
                'samples': samples, 'images': len(idx), 'seed': seed}
    return UsnScores([acc.result(i, type(conv).__name__)
                      for acc, (i, conv, _) in zip(accs, layers, strict=True)], 'usn', settings)


def layer_bounds(detector, image: np.ndarray, alpha: Sequence[float],
                 beta: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Engine bounds [l, u] over the whole θ box at every ReLU input, then at the output.

    Forward linear bounds in θ (the certification engine's default), one pass, no splitting;
    each entry is a pair of (C, H, W) tensors.
    """
    from usn_perception.bounds.forms import form_range
    from usn_perception.bounds.inputs import ImageEncoding
    from usn_perception.bounds.layers import CompiledNetwork, ReluOp, compile_network
    from usn_perception.bounds.propagate import propagate

    enc = ImageEncoding(image, detector.config.input_size, detector.device)
    net = compile_network(detector.net, enc.shape)
    box = torch.tensor([[alpha[0], alpha[1], beta[0], beta[1]]], dtype=torch.float64,
                       device=enc.device)
    centre, radius = enc.forms(box)
    cuts = [i for i, op in enumerate(net.ops) if isinstance(op, ReluOp)] + [len(net.ops)]
    out, start = [], 0
    with torch.no_grad():
        for cut in cuts:
            part = CompiledNetwork(net.ops[start:cut], net.input_shape, net.output_shape,
                                   net.max_numel)
            centre, radius, _ = propagate(part, centre, radius, box)
            if radius.shape[1] == 1:
                lo, hi = form_range(centre, box)
                lo, hi = lo - radius[:, 0], hi + radius[:, 0]
            else:
                lo = form_range(centre - radius, box)[0]
                hi = form_range(centre + radius, box)[1]
            out.append((lo[0], hi[0]))
            start = cut
    return out


def output_bound_width(detector, image: np.ndarray, alpha: Sequence[float] = (0.8, 1.2),
                       beta: Sequence[float] = (-0.1, 0.1)) -> float:
    """Median width u − l of the heatmap-logit bounds over the whole box (one pass).

    A continuous looseness measure that still compares models when every certificate at the
    box is vacuous (box = whole image).
    """
    lo, hi = layer_bounds(detector, image, alpha, beta)[-1]
    return float((hi - lo).median())


@torch.no_grad()
def bound_scores(
    detector,
    images: Sequence[np.ndarray],
    alpha: Sequence[float] = (0.8, 1.2),
    beta: Sequence[float] = (-0.1, 0.1),
    *,
    progress: bool = False,
) -> UsnScores:
    """Bound-based ablation score: 1 − the fraction of a channel's ReLUs unstable over Θ.

    Runs the certification engine's forward linear bounds (whole box, no splitting) on raw
    ``images`` and reads every prunable layer's pre-activation bounds [l, u]; a ReLU with
    l < 0 < u is relaxed, which is what loosens certificates. ``variance`` holds the mean
    squared bound width (u − l)², ``active`` the fraction of provably active ReLUs (l ≥ 0).
    """
    layers = check_network(detector.net)
    if len(images) == 0:
        raise ValueError('no scoring images: the dataset is empty')
    if not (alpha[0] <= alpha[1] and beta[0] <= beta[1] and alpha[0] > 0):
        raise ValueError(f'invalid θ box alpha={tuple(alpha)}, beta={tuple(beta)}')
    sums = [torch.zeros(3, bn.num_features, dtype=torch.float64) for _, _, bn in layers]
    for image in tqdm(images, desc='bound scores', disable=not progress, leave=False):
        bounds = layer_bounds(detector, image, alpha, beta)[:-1]
        if len(bounds) != len(layers):
            raise UnsupportedLayerError(f'{len(bounds)} ReLUs for {len(layers)} prunable layers')
        for pos, (lo, hi) in enumerate(bounds):
            sums[pos][0] += ((lo < 0) & (hi > 0)).double().mean((1, 2)).cpu()
            sums[pos][1] += ((hi - lo) ** 2).double().mean((1, 2)).cpu()
            sums[pos][2] += (lo >= 0).double().mean((1, 2)).cpu()
    out = []
    for pos, (i, conv, _) in enumerate(layers):
        unstable, width2, active = (sums[pos] / len(images)).numpy()
        zero = np.zeros_like(unstable)
        out.append(LayerScores(i, type(conv).__name__, zero, zero, width2, zero, active,
                               1.0 - unstable))
    settings = {'alpha': list(map(float, alpha)), 'beta': list(map(float, beta)),
                'images': len(images)}
    return UsnScores(out, 'bound', settings)


def plot_scores(scores: UsnScores, path: str | os.PathLike, title: str | None = None) -> Path:
    """Per-layer score distributions as a PNG: the score, and the instability it encodes.

    Top: the score (box plot + every channel as a dot). Bottom (USN): the relative
    perturbation power ``(bias² + var) / spread² = 1/USN − 1`` on a log axis, which separates
    channels that all score close to 1.
    """
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [s.score for s in scores.layers]
    labels = [f'{k + 1}\n{s.kind[:5]}\n{s.width}ch' for k, s in enumerate(scores.layers)]
    panels = [(data, 'USN score' if scores.method == 'usn' else 'bound-stability score',
               False)]
    if scores.method == 'usn':
        power = [np.where(d > 0, 1.0 / np.maximum(d, 1e-300) - 1.0, np.nan) for d in data]
        panels.append((power, '(bias² + var) / spread²  (log)', True))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.9 * len(data) + 2),
                                                      3.4 * len(panels) + 0.6), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (values, ylabel, log) in zip(axes[:, 0], panels, strict=True):
        finite = [v[np.isfinite(v) & ((v > 0) if log else True)] for v in values]
        ax.boxplot([f if f.size else [np.nan] for f in finite], showfliers=False)
        for k, v in enumerate(finite):
            ax.scatter(k + 1 + rng.uniform(-0.18, 0.18, len(v)), v, s=7, alpha=0.55)
        if log:
            ax.set_yscale('log')
        ax.set_xticks(range(1, len(data) + 1), labels, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis='y', alpha=0.3)
    axes[-1, 0].set_xlabel('prunable layer (kind, width)')
    no_signal = sum(int((d == 0).sum()) for d in data)
    axes[0, 0].set_title(title or f'{scores.method} scores per layer (low = unstable, pruned '
                         f'first); {no_signal} channels without clean signal score 0')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
