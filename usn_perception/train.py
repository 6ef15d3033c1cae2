"""Training the heatmap detector: integral regression of the readout plus a heatmap-shape term.

The loss is ``L1(readout, target) + λ·shape`` in heatmap cells. The L1 term trains the
certified readout directly (sub-cell precision). The shape term keeps each heatmap a single
sharp peak: for ``soft-argmax``/``argmax`` models the cross-entropy against a Gaussian, for
``centroid`` and ``local-centroid`` models the squared error against ``(1 + m)·G − m`` (a
Gaussian peak lifted above a slightly negative floor m), so that ``relu`` leaves only the peak
and the centroid is not pulled by background cells. Brightness/contrast augmentation makes the
detector itself robust to the perturbations we later certify. Deterministic for a seed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from usn_perception.detector import Detector
from usn_perception.evaluation import accuracy_summary
from usn_perception.model_io import save_model
from usn_perception.network import (
    DetectorConfig,
    apply_constraints,
    build_network,
    forward_with_gain,
    recalibrate_norms,
)
from usn_perception.preprocess import PixelMapping, image_to_float, resize_area, to_gray
from usn_perception.readout import cell_grid, centroid_train, read_keypoints, soft_argmax

#: Negative floor m of the centroid models' heatmap target (see the module docstring).
CENTROID_FLOOR = 0.1
#: Logit scale of the auxiliary soft-argmax term of centroid models (peaks are ~1 high).
CENTROID_SHARPNESS = 10.0

TOLERANCES = (2.0, 3.0, 4.0, 5.0)


@dataclass(frozen=True)
class TrainOptions:
    """Hyper-parameters; recorded in the model's metadata."""

    epochs: int = 12
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    heatmap_weight: float = 0.1
    heatmap_sigma: float = 1.0
    alpha_range: tuple[float, float] = (0.6, 1.4)
    beta_range: tuple[float, float] = (-0.2, 0.2)
    noise_max: float = 0.02
    seed: int = 0
    threads: int | None = None
    clip_grad: float | None = 5.0
    #: λ of the certified-training term λ·log(radius gain) (see network.forward_with_gain).
    gain_weight: float = 0.0


@dataclass
class TensorSet:
    """A dataset preprocessed to network inputs and heatmap-cell targets."""

    images: torch.Tensor  # N×1×H×W float32 in [0, 1]
    targets: torch.Tensor  # N×K×2 float32 heatmap cells
    labelled: torch.Tensor  # N×K bool
    image_keypoints: np.ndarray  # N×K×2 float64 image pixels
    mappings: list[PixelMapping]


def prepare(
    dataset, config: DetectorConfig, progress: bool = True, desc: str = 'load'
) -> TensorSet:
    """Decode, gray, area-resize every image once (the exact preprocessing of ``predict``)."""
    n, k = len(dataset), config.num_keypoints
    w, h = config.input_size
    images = torch.empty(n, 1, h, w, dtype=torch.float32)
    targets = torch.zeros(n, k, 2, dtype=torch.float32)
    labelled = torch.zeros(n, k, dtype=torch.bool)
    kps = np.zeros((n, k, 2))
    mappings = []
    for i in tqdm(range(n), desc=desc, disable=not progress, leave=False):
        sample = dataset.samples[i]
        img = dataset.load_image(i)
        images[i, 0] = resize_area(to_gray(image_to_float(img)), config.input_size).float()
        m = PixelMapping.for_image((img.shape[1], img.shape[0]), config.heatmap_size)
        mappings.append(m)
        kps[i] = sample.keypoints
        targets[i] = torch.from_numpy(m.to_heatmap(sample.keypoints)).float()
        labelled[i] = torch.from_numpy(np.asarray(sample.visibility) > 0)
    return TensorSet(images, targets, labelled, kps, mappings)


def keypoint_loss(
    heatmaps: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor,
    heatmap_weight: float, sigma: float, readout: str = 'soft-argmax',
) -> torch.Tensor:
    """Integral L1 + heatmap-shape term, averaged over labelled keypoints."""
    hh, ww = heatmaps.shape[-2:]
    gu, gv = cell_grid(hh, ww, heatmaps.dtype)
    d2 = (gu - targets[..., :1]) ** 2 + (gv - targets[..., 1:]) ** 2
    if readout in ('centroid', 'local-centroid'):
        # The readout's own L1, plus soft-argmax's (well conditioned from the first step,
        # when few cells are positive), plus the shape term.
        peak = (1.0 + CENTROID_FLOOR) * torch.exp(-d2 / (2 * sigma**2)) - CENTROID_FLOOR
        shape = (heatmaps.flatten(-2) - peak).pow(2).sum(-1)
        own = centroid_train(heatmaps, local=readout == 'local-centroid')
        l1 = ((own - targets).abs().sum(-1)
              + (soft_argmax(CENTROID_SHARPNESS * heatmaps) - targets).abs().sum(-1))
    else:
        target_p = torch.softmax(-d2 / (2 * sigma**2), dim=-1)
        logp = torch.log_softmax(heatmaps.flatten(-2), dim=-1)
        shape = -(target_p * logp).sum(-1)
        l1 = (soft_argmax(heatmaps) - targets).abs().sum(-1)
    per_kp = l1 + heatmap_weight * shape
    mask = labelled.to(per_kp.dtype)
    return (per_kp * mask).sum() / mask.sum().clamp(min=1)


def augment(x: torch.Tensor, opts: TrainOptions, gen: torch.Generator) -> torch.Tensor:
    """Random global brightness/contrast, then noise, clipped to [0, 1]."""
    n = x.shape[0]
    a = torch.empty(n, 1, 1, 1).uniform_(*opts.alpha_range, generator=gen)
    b = torch.empty(n, 1, 1, 1).uniform_(*opts.beta_range, generator=gen)
    s = torch.empty(n, 1, 1, 1).uniform_(0, opts.noise_max, generator=gen)
    noise = torch.randn(x.shape, generator=gen) * s
    return (a * x + b + noise).clamp(0, 1)


@torch.no_grad()
def predict_tensors(net: nn.Module, data: TensorSet, batch: int = 64,
                    readout: str = 'soft-argmax') -> np.ndarray:
    """(N, K, 2) predictions in image pixels (float32 network, for validation speed)."""
    net.eval()
    out = []
    for i in range(0, len(data.images), batch):
        hm = net(data.images[i:i + batch]).double()
        out.append(read_keypoints(hm, readout).numpy())
    uv = np.concatenate(out)
    return np.stack([m.to_image(p) for m, p in zip(data.mappings, uv, strict=True)])


def train_detector(
    train_set,
    val_set,
    out: str | Path,
    *,
    config: DetectorConfig | None = None,
    options: TrainOptions | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    data_summary: dict | None = None,
) -> dict:
    """Train, validate each epoch, save the best model (by val mean error) and metrics JSON."""
    config = config or DetectorConfig()
    opts = options or TrainOptions()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    tr = prepare(train_set, config, progress, 'load train')
    va = prepare(val_set, config, progress, 'load val')
    if len(tr.images) == 0:
        raise ValueError('the training set is empty')
    net = build_network(config)
    optim = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=opts.lr,
                              weight_decay=opts.weight_decay)
    steps_per_epoch = math.ceil(len(tr.images) / opts.batch_size)
    total = max(1, opts.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=opts.lr, total_steps=total,
                                                pct_start=0.15)
    history, best, best_state = [], math.inf, None
    t0 = time.perf_counter()
    for epoch in range(opts.epochs):
        net.train()
        perm = torch.randperm(len(tr.images), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f'epoch {epoch + 1}/{opts.epochs}',
                   disable=not progress, leave=False)
        losses, gains = [], []
        for step in bar:
            idx = perm[step * opts.batch_size:(step + 1) * opts.batch_size]
            x = augment(tr.images[idx], opts, gen)
            heatmaps, gain = forward_with_gain(net, x)
            loss = keypoint_loss(heatmaps, tr.targets[idx], tr.labelled[idx],
                                 opts.heatmap_weight, opts.heatmap_sigma, config.readout)
            gains.append(float(gain.detach()))
            if opts.gain_weight:
                loss = loss + opts.gain_weight * torch.log(gain)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if opts.clip_grad:
                nn.utils.clip_grad_norm_(net.parameters(), opts.clip_grad)
            optim.step()
            apply_constraints(net)
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f'{np.mean(losses[-20:]):.3f}')
        recalibrate_norms(net, augment(tr.images[perm[:512]], opts, gen))
        pred = predict_tensors(net, va, readout=config.readout)
        acc = accuracy_summary(pred, va.image_keypoints, va.labelled.numpy(), TOLERANCES)
        history.append({'epoch': epoch + 1, 'train_loss': float(np.mean(losses)), **acc,
                        'log10_gain': float(np.log10(np.median(gains))),
                        'seconds': time.perf_counter() - t0})
        log(f'epoch {epoch + 1}/{opts.epochs}: loss {np.mean(losses):.4f}, val mean error '
            f'{acc["mean_error_px"]:.2f} px, PCK@4 {acc["pck"]["4"]:.3f}, radius gain '
            f'1e{history[-1]["log10_gain"]:.1f}')
        if acc['mean_error_px'] < best or best_state is None:
            best = acc['mean_error_px']
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    net.eval()
    metrics = {
        'val': min(history, key=lambda h: h['mean_error_px']),
        'history': history,
        'train_seconds': time.perf_counter() - t0,
        'options': asdict(opts),
        'train_images': len(tr.images),
        'val_images': len(va.images),
    }
    metadata = {'training': {'options': asdict(opts), 'data': data_summary or {},
                             'seconds': metrics['train_seconds']},
                'metrics': {'val': metrics['val']}}
    json_path = save_model(net, config, _model_json(out), metadata)
    (json_path.parent / 'metrics.json').write_text(json.dumps(metrics, indent=2) + '\n')
    metrics['model'] = str(json_path)
    return metrics


def _model_json(out: str | Path) -> Path:
    out = Path(out)
    return out if out.suffix == '.json' else out / 'model.json'


def evaluate_detector(
    detector: Detector, dataset, tolerances: Sequence[float] = TOLERANCES,
    progress: bool = True,
) -> dict:
    """Clean accuracy of ``detector.predict`` (float64, the certified path) on a dataset."""
    preds, truth, labelled = [], [], []
    t0 = time.perf_counter()
    for i in tqdm(range(len(dataset)), desc='evaluate', disable=not progress, leave=False):
        preds.append(detector.predict(dataset.load_image(i)))
        truth.append(dataset.samples[i].keypoints)
        labelled.append(np.asarray(dataset.samples[i].visibility) > 0)
    summary = accuracy_summary(np.array(preds), np.array(truth), np.array(labelled), tolerances)
    summary['images'] = len(dataset)
    summary['seconds_per_image'] = (time.perf_counter() - t0) / max(1, len(dataset))
    return summary
