"""Structured channel pruning: USN / random / L1 criteria, progressive rounds, Wasserstein term.

A round picks the channels to remove (lowest importance, per layer or globally), optionally
fine-tunes with ``L_task + λ·L_W`` so that those channels' BatchNorm gates go to zero while
the network learns to do without them, removes them physically with torch-pruning (conv out
channels + BatchNorm + the next layer's in channels), then fine-tunes to recover. The input
channel and the heatmap head's K outputs never change. Pruned networks are the same
:class:`DetectorConfig` with other widths, so they save and load like any model.

``L_W`` (see ``docs/usn.md``): per layer l, gates ``g_j = (|γ_j| + max(β_j, 0)) / mean_j(·)``
(the scale and the positive shift of the channel's BatchNorm: with both at 0 the channel's
post-ReLU output is exactly 0); the target distribution puts mass ``r_l`` at 0 — on the
channels selected for removal — and keeps every other channel at its own (detached) value.
``L_W = Σ_l W_1(g_l, target_l)`` under the coupling fixed by the selection, which is the
optimal (sorted) coupling once the selected gates are the smallest; its gradient pulls only
the selected gates toward 0.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from tqdm import tqdm

from usn_perception.detector import Detector
from usn_perception.model_io import save_model
from usn_perception.network import (
    DetectorConfig,
    apply_constraints,
    count_macs,
    count_parameters,
    forward_with_gain,
    layer_widths,
)
from usn_perception.readout import read_keypoints
from usn_perception.train import TensorSet, TrainOptions, augment, keypoint_loss
from usn_perception.usn import UsnScores, bound_scores, check_network, choose_images, usn_scores

CRITERIA = ('usn', 'random', 'l1', 'bound')
SCOPES = ('layer', 'global')
Selection = list[np.ndarray]  # per prunable layer: channel indices to remove


@dataclass(frozen=True)
class PruneOptions:
    """How to prune and fine-tune; recorded in the pruned model's metadata."""

    ratio: float | tuple[float, ...] = 0.5  # fraction of each layer's channels (or per layer)
    criterion: str = 'usn'
    rounds: int = 3
    wasserstein: float = 0.0  # λ
    scope: str = 'layer'
    epochs: float = 4.0  # total fine-tuning epochs, shared by all phases
    lr: float = 1e-3
    batch_size: int = 32
    alpha: tuple[float, float] = (0.8, 1.2)  # θ box for the USN scores
    beta: tuple[float, float] = (-0.1, 0.1)
    score_images: int = 128
    score_samples: int = 8
    min_channels: int = 1
    lr_restarts: bool = True  # a fresh cosine per fine-tuning phase (else one over all)
    seed: int = 0
    gain_weight: float = 0.0  # certified training during fine-tuning (TrainOptions.gain_weight)

    def __post_init__(self) -> None:
        """Refuse options that cannot mean anything, naming the option."""
        ratios = self.ratio if isinstance(self.ratio, Sequence) else (self.ratio,)
        for r in ratios:
            if not (isinstance(r, (int, float)) and math.isfinite(r) and 0 <= r < 1):
                raise ValueError(f'pruning ratio must be in [0, 1), got {r!r}')
        if self.criterion not in CRITERIA:
            raise ValueError(f'criterion must be one of {CRITERIA}, got {self.criterion!r}')
        if self.scope not in SCOPES:
            raise ValueError(f'scope must be one of {SCOPES}, got {self.scope!r}')
        if isinstance(self.ratio, Sequence) and self.scope != 'layer':
            raise ValueError('per-layer ratios need scope="layer"')
        if int(self.rounds) != self.rounds or self.rounds < 1:
            raise ValueError(f'rounds must be an integer >= 1, got {self.rounds}')
        if not (self.wasserstein >= 0 and math.isfinite(self.wasserstein)):
            raise ValueError(f'wasserstein weight λ must be >= 0, got {self.wasserstein}')
        if not self.epochs >= 0 or not self.lr > 0 or self.batch_size < 1:
            raise ValueError('epochs must be >= 0, lr > 0 and batch_size >= 1')
        if self.min_channels < 1:
            raise ValueError(f'min_channels must be >= 1, got {self.min_channels}')


# --------------------------------------------------------------------------- selection


def layer_ratios(ratio: float | Sequence[float], n_layers: int) -> list[float]:
    """Broadcast a global ratio, or check a per-layer list has one entry per layer."""
    if isinstance(ratio, Sequence):
        if len(ratio) != n_layers:
            raise ValueError(f'{len(ratio)} per-layer ratios for {n_layers} prunable layers')
        return [float(r) for r in ratio]
    return [float(ratio)] * n_layers


def channel_importance(
    net: nn.Sequential, criterion: str, *, scores: UsnScores | None = None, seed: int = 0
) -> list[np.ndarray]:
    """Per-layer importance (higher = keep): USN / bound score, filter L1 norm, or random."""
    layers = check_network(net)
    if criterion in ('usn', 'bound'):
        if scores is None:
            raise ValueError(f'criterion "{criterion}" needs USN scores')
        vecs = scores.vectors()
        if [len(v) for v in vecs] != [bn.num_features for _, _, bn in layers]:
            raise ValueError('USN scores do not match the network widths (stale scores?)')
        return [np.asarray(v, np.float64) for v in vecs]
    if criterion == 'l1':
        out = []
        for _, conv, _ in layers:
            w = conv.weight.detach().double()
            dim = (1, 2, 3) if isinstance(conv, nn.Conv2d) else (0, 2, 3)
            out.append(w.abs().sum(dim).numpy())
        return out
    if criterion == 'random':
        rng = np.random.default_rng(seed)
        return [rng.random(bn.num_features) for _, _, bn in layers]
    raise ValueError(f'criterion must be one of {CRITERIA}, got {criterion!r}')


def plan_selection(
    importance: Sequence[np.ndarray],
    original: Sequence[int],
    ratio: float | Sequence[float],
    scope: str = 'layer',
    min_channels: int = 1,
) -> Selection:
    """Channels to remove now so that ``ratio`` of the ``original`` widths is gone in total.

    ``layer``: each layer loses ``round(r_l · w_l)`` of its original channels (the lowest
    ones). ``global``: the lowest ``round(r · Σ w)`` channels over all layers, importance
    normalised by each layer's mean so that scales compare; no layer drops below
    ``min_channels``. Ties break on the channel index (deterministic).
    """
    current = [len(v) for v in importance]
    if len(original) != len(current):
        raise ValueError('importance and original widths disagree on the number of layers')
    if scope == 'layer':
        out = []
        for v, w0, w, r in zip(importance, original, current,
                               layer_ratios(ratio, len(current)), strict=True):
            target = int(round(r * w0))
            if w0 - target < min_channels:
                raise ValueError(f'ratio {r} would leave a layer of {w0} channels with '
                                 f'{w0 - target} (< min_channels={min_channels})')
            n_remove = max(0, target - (w0 - w))
            out.append(np.sort(np.argsort(v, kind='stable')[:n_remove]))
        return out
    if scope != 'global':
        raise ValueError(f'scope must be one of {SCOPES}, got {scope!r}')
    if isinstance(ratio, Sequence):
        raise ValueError('a global scope takes one ratio')
    n_remove = int(round(float(ratio) * sum(original))) - (sum(original) - sum(current))
    norm = [np.asarray(v, np.float64) / max(float(np.mean(np.abs(v))), 1e-30)
            for v in importance]
    flat = sorted((float(s), layer, j) for layer, v in enumerate(norm) for j, s in enumerate(v))
    left = list(current)
    chosen: list[list[int]] = [[] for _ in current]
    for _, layer, j in flat:
        if n_remove <= 0:
            break
        if left[layer] > min_channels:
            chosen[layer].append(j)
            left[layer] -= 1
            n_remove -= 1
    return [np.array(sorted(c), dtype=np.int64) for c in chosen]


# --------------------------------------------------------------------------- surgery


def prune_channels(net: nn.Sequential, selection: Selection) -> nn.Sequential:
    """Remove the selected output channels of every prunable layer, in place (torch-pruning).

    torch-pruning removes the conv's output channels, the BatchNorm entries and the next
    layer's input channels together; the heatmap head's outputs are never touched.
    """
    layers = check_network(net)
    if len(selection) != len(layers):
        raise ValueError(f'selection has {len(selection)} entries for {len(layers)} layers')
    for idxs, (_, _, bn) in zip(selection, layers, strict=True):
        idxs = np.asarray(idxs, np.int64)
        if idxs.size and (idxs.min() < 0 or idxs.max() >= bn.num_features
                          or len(set(idxs.tolist())) != idxs.size):
            raise ValueError(f'invalid channel indices {idxs.tolist()} for a layer of '
                             f'{bn.num_features}')
        if idxs.size >= bn.num_features:
            raise ValueError('pruning would remove every channel of a layer')
    p = next(net.parameters())
    example = torch.zeros(1, 1, 16, 16, dtype=p.dtype, device=p.device)
    head_out = net[-1].out_channels
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=example, verbose=False)
    for idxs, (_, conv, _) in zip(selection, layers, strict=True):
        if len(idxs):
            group = graph.get_pruning_group(conv, tp.prune_conv_out_channels,
                                            idxs=[int(i) for i in idxs])
            group.prune()
    if net[-1].out_channels != head_out or net[1].in_channels != 1:
        raise RuntimeError('pruning changed the input channel or the heatmap head')
    apply_constraints(net)
    return net


@torch.no_grad()
def zero_channels(net: nn.Sequential, selection: Selection) -> nn.Sequential:
    """Silence the selected channels in place (BN scale and shift 0 → post-ReLU output 0).

    The reference for pruning: in eval mode the pruned network computes exactly what this
    masked one does, since a silenced channel feeds only zeros to the next layer.
    """
    for idxs, (_, _, bn) in zip(selection, check_network(net), strict=True):
        idx = torch.as_tensor(np.asarray(idxs, np.int64))
        bn.weight[idx] = 0.0
        bn.bias[idx] = 0.0
    return net


# --------------------------------------------------------------------------- Wasserstein


def channel_gates(bn: nn.BatchNorm2d) -> torch.Tensor:
    """``|γ| + max(β, 0)``: bounds how much a channel can pass; 0 means it is silent."""
    return bn.weight.abs() + torch.relu(bn.bias)


def wasserstein_gate_loss(net: nn.Sequential, selection: Selection) -> torch.Tensor:
    """``L_W``: sum over layers of W_1(normalised gates, target with mass r_l at 0).

    The target keeps unselected gates at their own (detached) value and sends the selected
    ones to 0, so the gradient moves only the selected gates, toward zero.
    """
    layers = check_network(net)
    total = next(net.parameters()).new_zeros(())
    for idxs, (_, _, bn) in zip(selection, layers, strict=True):
        if not len(idxs):
            continue
        g = channel_gates(bn)
        g = g / g.detach().mean().clamp(min=1e-12)
        mask = torch.zeros_like(g, dtype=torch.bool)
        mask[torch.as_tensor(np.asarray(idxs, np.int64))] = True
        target = torch.where(mask, torch.zeros_like(g), g.detach())
        total = total + (g - target).abs().mean()
    return total


def wasserstein_step(net: nn.Sequential, selection: Selection, eta: float) -> float:
    """One decoupled step on ``L_W``; returns ``L_W`` before the step.

    Each BatchNorm parameter moves by ``−η · n_l · ḡ_l² · ∂L_W/∂p`` (n_l channels, ḡ_l the
    mean gate): the per-layer preconditioner that makes every selected gate shrink by
    ``η · ḡ_l`` per step whatever the layer's width and scale — so ``η = λ / steps`` takes a
    typical gate to 0 in ``1/λ`` of the phase. Only the selected gates have a non-zero
    gradient; a gate that reaches 0 stays there (the step never crosses 0: a proximal step).
    """
    layers = check_network(net)
    # A frozen shift (ScaleNorm2d's bias, fixed at 0) is not a gate parameter.
    params = [p for idxs, (_, _, bn) in zip(selection, layers, strict=True) if len(idxs)
              for p in (bn.weight, bn.bias) if p.requires_grad]
    if not params:
        return 0.0
    loss = wasserstein_gate_loss(net, selection)
    grads = iter(torch.autograd.grad(loss, params))
    with torch.no_grad():
        for idxs, (_, _, bn) in zip(selection, layers, strict=True):
            if not len(idxs):
                continue
            gates = channel_gates(bn)
            scale = eta * gates.numel() * float(gates.mean()) ** 2
            for p in (bn.weight, bn.bias):
                if not p.requires_grad:
                    continue
                g = next(grads)
                new = p - scale * g
                crossed = (new * p < 0) | ((p == 0) & (g != 0))
                p.copy_(torch.where(crossed, torch.zeros_like(p), new))
    return float(loss.detach())


def sorted_w1(net: nn.Sequential, selection: Selection) -> float:
    """Diagnostic: the true 1-D W_1 (sorted matching) between gates and target, summed.

    Equals :func:`wasserstein_gate_loss` once the selected gates are the smallest of their layer.
    """
    vals = []
    with torch.no_grad():
        for idxs, (_, _, bn) in zip(selection, check_network(net), strict=True):
            g = channel_gates(bn).double()
            g = g / g.mean().clamp(min=1e-12)
            t = g.clone()
            t[torch.as_tensor(np.asarray(idxs, np.int64))] = 0.0
            vals.append(float((g.sort().values - t.sort().values).abs().mean()))
    return float(np.sum(vals))


def selected_gate_mass(net: nn.Sequential, selection: Selection) -> float:
    """Mean normalised gate of the selected channels (1 = typical channel, 0 = silent)."""
    vals = []
    with torch.no_grad():
        for idxs, (_, _, bn) in zip(selection, check_network(net), strict=True):
            if len(idxs):
                g = channel_gates(bn)
                vals.append(float((g[torch.as_tensor(np.asarray(idxs, np.int64))]
                                   / g.mean().clamp(min=1e-12)).mean()))
    return float(np.mean(vals)) if vals else 0.0


# --------------------------------------------------------------------------- fine-tuning


@dataclass
class _Schedule:
    """Cosine learning rate, per phase (restarts, default) or over all phases.

    Optimisers are rebuilt per phase (pruning replaces the parameters). With one curve over
    all phases the last recovery phase of a progressive run trains at the tail of the curve
    (~5% of ``lr``) and cannot recover from the last removal; restarts give every phase the
    full curve. One-shot runs (one phase) are the same either way.
    """

    lr: float
    total: int
    step: int = 0

    def next_lr(self) -> float:
        t = min(self.step / max(self.total, 1), 1.0)
        self.step += 1
        return self.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def fine_tune(
    net: nn.Sequential,
    data: TensorSet,
    steps: int,
    *,
    options: PruneOptions,
    schedule: _Schedule,
    gen: torch.Generator,
    selection: Selection | None = None,
    progress: bool = False,
    desc: str = 'fine-tune',
    readout: str = 'soft-argmax',
) -> dict:
    """Minimise ``L_task (+ λ·L_W on selection)`` for ``steps`` steps, training augmentation.

    ``L_task`` takes AdamW steps. ``λ·L_W`` takes decoupled gradient steps (the way AdamW
    decouples weight decay; see :func:`wasserstein_step`): Adam normalises every gradient to a
    step of about ``lr``, which would make λ meaningless and move a gate of size ~1 by only
    ``steps · lr`` — far too little to silence a channel within one phase.
    """
    if steps <= 0:
        return {'steps': 0}
    if options.lr_restarts:
        schedule.step = 0
    aug = TrainOptions(seed=options.seed)
    lam = options.wasserstein if selection is not None else 0.0
    optim = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=options.lr,
                              weight_decay=aug.weight_decay)
    n = data.images.shape[0]
    perm = torch.randperm(n, generator=gen)
    pos, task_losses, w_losses = 0, [], []
    net.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        if pos + options.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + options.batch_size]
        pos += options.batch_size
        x = augment(data.images[idx], aug, gen)
        heatmaps, gain = forward_with_gain(net, x)
        task = keypoint_loss(heatmaps, data.targets[idx], data.labelled[idx],
                             aug.heatmap_weight, aug.heatmap_sigma, readout)
        if options.gain_weight:
            task = task + options.gain_weight * torch.log(gain)
        for group in optim.param_groups:
            group['lr'] = schedule.next_lr()
        optim.zero_grad(set_to_none=True)
        task.backward()
        optim.step()
        apply_constraints(net)
        if lam > 0:
            w_losses.append(wasserstein_step(net, selection, lam / steps))
        task_losses.append(float(task.detach()))
        bar.set_postfix(loss=f'{np.mean(task_losses[-20:]):.3f}')
    net.eval()
    out = {'steps': steps, 'task_loss': float(np.mean(task_losses[-50:]))}
    if w_losses:
        out.update(w_loss_first=w_losses[0], w_loss_last=float(np.mean(w_losses[-10:])))
    return out


# --------------------------------------------------------------------------- the pipeline


@dataclass
class PruneResult:
    """The pruned network, its config, and what each round did."""

    net: nn.Sequential
    config: DetectorConfig
    options: PruneOptions
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def metadata(self, source: dict | None = None) -> dict:
        """What goes into the pruned model's JSON metadata."""
        opts = asdict(self.options)
        return {'pruning': {
            'criterion': self.options.criterion, 'ratio': self.options.ratio,
            'rounds': self.options.rounds, 'wasserstein': self.options.wasserstein,
            'scope': self.options.scope, 'options': opts, 'history': self.history,
            'seconds': self.seconds, 'widths': list(self.config.widths),
            'source': source or {},
        }}


def prune_network(
    net: nn.Sequential,
    config: DetectorConfig,
    train: TensorSet,
    options: PruneOptions | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> PruneResult:
    """Prune a copy of ``net`` in ``options.rounds`` rounds up to ``options.ratio``.

    Round k (of R) raises the removed fraction to ``ratio · k / R``: score the current network
    and select. With λ = 0: remove the selection, then fine-tune with ``L_task``. With λ > 0:
    fine-tune with ``L_task + λ·L_W`` (the network learns to do without the selected
    channels while their gates go to 0), then remove them — nearly free by then, so the
    recovery fine-tuning happens once, after the last round. The fine-tuning steps
    (``epochs`` over the training set) are shared equally by all phases, so every criterion
    and schedule gets the same training budget. Deterministic for ``options.seed``.
    """
    opts = options or PruneOptions()
    t0 = time.perf_counter()
    net = copy.deepcopy(net).float()
    layers = check_network(net)
    if train.images.shape[0] == 0:
        raise ValueError('the training set is empty: nothing to score or fine-tune on')
    original = layer_widths(net)
    if tuple(original) != tuple(config.widths):
        raise ValueError(f'network widths {original} do not match the config {config.widths}')
    layer_ratios(opts.ratio, len(layers))  # fail early on a bad per-layer list
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    steps_total = int(round(opts.epochs * math.ceil(train.images.shape[0] / opts.batch_size)))
    regularised = opts.wasserstein > 0
    phases = opts.rounds + 1 if regularised else opts.rounds
    per_phase = steps_total // phases
    schedule = _Schedule(opts.lr, per_phase if opts.lr_restarts else per_phase * phases)
    probe = train.images[:16]
    history: list[dict] = []
    for k in range(1, opts.rounds + 1):
        rt = time.perf_counter()
        r_k = _scale_ratio(opts.ratio, k / opts.rounds)
        scores = _scores(net, config, train, opts, k, progress)
        imp = channel_importance(net, opts.criterion, scores=scores, seed=opts.seed * 1000 + k)
        selection = plan_selection(imp, original, r_k, opts.scope, opts.min_channels)
        entry: dict = {'round': k, 'ratio': r_k, 'removed': [int(len(s)) for s in selection]}
        if regularised:
            entry['gate_mass_before'] = selected_gate_mass(net, selection)
            entry['regularised'] = fine_tune(net, train, per_phase, options=opts,
                                             schedule=schedule, gen=gen, selection=selection,
                                             progress=progress, desc=f'round {k} L_W',
                                             readout=config.readout)
            entry['gate_mass_after'] = selected_gate_mass(net, selection)
            entry['sorted_w1'] = sorted_w1(net, selection)
        before = _readout(net, probe, config.readout)
        prune_channels(net, selection)
        shift = (_readout(net, probe, config.readout) - before).norm(dim=-1).mean()
        entry['prune_shift_cells'] = float(shift)
        last = k == opts.rounds
        if not regularised or last:
            entry['recovery'] = fine_tune(net, train, per_phase, options=opts,
                                          schedule=schedule, gen=gen, progress=progress,
                                          desc=f'round {k} recover', readout=config.readout)
        widths = layer_widths(net)
        entry.update(widths=list(widths), parameters=count_parameters(net),
                     macs=count_macs(net, config.input_size),
                     seconds=time.perf_counter() - rt)
        history.append(entry)
        log(f'round {k}/{opts.rounds}: ratio {_fmt_ratio(r_k)}, widths {list(widths)}, '
            f'prediction shift from removal {entry["prune_shift_cells"]:.3f} cells')
    net.eval()
    return PruneResult(net, config.with_widths(layer_widths(net)), opts, history,
                       time.perf_counter() - t0)


@torch.no_grad()
def _readout(net: nn.Sequential, images: torch.Tensor, readout: str) -> torch.Tensor:
    """Keypoints (heatmap cells) of a probe batch, eval mode."""
    net.eval()
    return read_keypoints(net(images).double(), readout)


def _scores(net: nn.Sequential, config: DetectorConfig, train: TensorSet, opts: PruneOptions,
            k: int, progress: bool) -> UsnScores | None:
    """The round's USN (sampled) or bound-based scores; None for criteria that need none."""
    if opts.criterion == 'usn':
        return usn_scores(net, train.images, opts.alpha, opts.beta, samples=opts.score_samples,
                          max_images=opts.score_images, seed=opts.seed + k, progress=progress)
    if opts.criterion == 'bound':
        idx = choose_images(train.images.shape[0], opts.score_images, opts.seed + k)
        images = [train.images[int(i), 0].double().numpy() for i in idx]
        return bound_scores(Detector(net, config.with_widths(layer_widths(net))), images,
                            opts.alpha, opts.beta, progress=progress)
    return None


def _scale_ratio(ratio: float | Sequence[float], f: float) -> float | tuple[float, ...]:
    if isinstance(ratio, Sequence):
        return tuple(float(r) * f for r in ratio)
    return float(ratio) * f


def _fmt_ratio(r: float | Sequence[float]) -> str:
    return ','.join(f'{v:.3g}' for v in r) if isinstance(r, Sequence) else f'{r:.3g}'


def save_pruned(result: PruneResult, out: str | Path, source: dict | None = None,
                extra: dict | None = None) -> Path:
    """Save in the project's model format (widths in the JSON); ``load_detector`` reads it."""
    meta = result.metadata(source)
    meta.update(extra or {})
    out = Path(out)
    return save_model(result.net, result.config, out if out.suffix == '.json' else
                      out / 'model.json', meta)


def with_options(base: PruneOptions, **changes) -> PruneOptions:
    """``dataclasses.replace`` that re-validates (used by the CLI and the ablation)."""
    return replace(base, **changes)
