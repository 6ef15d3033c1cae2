"""The public inference object: image in, keypoints in input-image pixels out.

``Detector`` runs the network in **float64** on the CPU (or a chosen device), so the
coordinates it returns are computed with the same arithmetic the bound engine reasons about.
The pipeline is: image → float [0, 1] → gray (convex channel mix) → area resize to the
network input → network → heatmaps → readout → :class:`PixelMapping` to image pixels.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from usn_perception.bounds.layers import module_outputs
from usn_perception.model_io import default_model_path, load_model
from usn_perception.network import READOUTS, DetectorConfig, apply_constraints, count_parameters
from usn_perception.preprocess import PixelMapping, image_to_float, resize_area, to_gray
from usn_perception.readout import peak_scores, read_keypoints


@dataclass(frozen=True)
class Prediction:
    """Keypoints (K, 2) in image pixels, per-keypoint scores (K,), and the heatmap logits.

    ``trace``, when asked for, holds every module's output (``heatmaps`` is the last one's),
    which the certifier's level nodes reuse instead of running the network again.
    """

    keypoints: np.ndarray
    scores: np.ndarray
    heatmaps: torch.Tensor
    trace: tuple[torch.Tensor, ...] | None = None


class Detector:
    """A keypoint detector with a fixed readout and an exact, shared preprocessing."""

    def __init__(
        self,
        net: nn.Sequential,
        config: DetectorConfig,
        *,
        sha256: str | None = None,
        source: str | None = None,
        metadata: dict | None = None,
        device: str | torch.device = 'cpu',
    ) -> None:
        self.config = config
        self.readout = config.readout
        self.sha256 = sha256
        self.source = source
        self.metadata = metadata or {}
        self.device = torch.device(device)
        self.net = copy.deepcopy(net).to(self.device, torch.float64).eval()
        # Re-impose the architecture's exact constraints in float64 (weights are stored in
        # float32, where a zero-mean filter is only zero-mean to ~1e-7).
        apply_constraints(self.net)
        for p in self.net.parameters():
            p.requires_grad_(False)

    @property
    def keypoint_names(self) -> tuple[str, ...]:
        """Names of the K keypoints, in heatmap order."""
        return self.config.keypoint_names

    @property
    def num_parameters(self) -> int:
        """Learnable parameters of the network."""
        return count_parameters(self.net)

    def network_input(self, image: np.ndarray) -> torch.Tensor:
        """Preprocess one image to the 1×1×H×W float64 network input."""
        gray = to_gray(image_to_float(image))
        x = resize_area(gray, self.config.input_size)
        return x[None, None].to(self.device)

    def mapping(self, image_shape: tuple[int, ...]) -> PixelMapping:
        """Heatmap-cell → image-pixel mapping for an image of ``image_shape`` (H, W[, C])."""
        return PixelMapping.for_image((image_shape[1], image_shape[0]), self.config.heatmap_size)

    @torch.inference_mode()
    def heatmaps(self, image: np.ndarray) -> torch.Tensor:
        """(K, Hh, Wh) float64 heatmap logits for one image."""
        return self.net(self.network_input(image))[0]

    @torch.inference_mode()
    def run(self, image: np.ndarray, *, readout: str | None = None,
            trace: bool = False) -> Prediction:
        """Keypoints, scores and heatmaps for one image (``trace``: keep every module's output).

        The trace changes nothing else: the network runs the same way either way.
        """
        readout = self._check_readout(readout)
        x = self.network_input(image)
        outputs = tuple(module_outputs(self.net, x)) if trace else None
        hm = (self.net(x) if outputs is None else outputs[-1])[0]
        uv = read_keypoints(hm, readout).cpu().numpy()
        kps = self.mapping(image.shape).to_image(uv)
        return Prediction(kps, peak_scores(hm).cpu().numpy(), hm, outputs)

    def predict(self, image: np.ndarray, *, readout: str | None = None) -> np.ndarray:
        """(K, 2) float64 keypoints (x, y) in input-image pixels.

        ``image`` is HxW or HxWx3, uint8 (scaled by 1/255), uint16, or float in [0, 1] (used
        as is). The centre of the top-left pixel is (0, 0), x right, y down.
        """
        return self.run(image, readout=readout).keypoints

    def certify(self, image: np.ndarray, box, *, readout: str | None = None, **options):
        """Certified keypoint boxes over a :class:`PhotometricBox`; see ``certify_keypoints``."""
        from usn_perception.certify import certify_keypoints

        return certify_keypoints(self, image, box, readout=self._check_readout(readout),
                                 **options)

    def _check_readout(self, readout: str | None) -> str:
        readout = readout or self.readout
        if readout not in READOUTS:
            raise ValueError(f'unknown readout {readout!r}; choose one of {READOUTS}')
        return readout

    def __repr__(self) -> str:
        """Short summary: widths, parameters, weights hash."""
        sha = (self.sha256 or 'unsaved')[:12]
        return (f'Detector(widths={list(self.config.widths)}, '
                f'params={self.num_parameters}, readout={self.readout!r}, sha256={sha})')


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda if available else cpu; ``cuda`` fails loudly when absent."""
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise RuntimeError(f'device {device!r} requested but CUDA is not available')
    if device not in ('cpu',) and not device.startswith('cuda'):
        raise ValueError(f'device must be auto, cpu or cuda[:N], got {device!r}')
    return torch.device(device)


def load_detector(
    path: str | os.PathLike | None = None, *, device: str = 'cpu', readout: str | None = None
) -> Detector:
    """Load a model (directory, ``.json`` or ``.pt``); ``None`` loads the shipped default."""
    json_path = Path(path) if path is not None else default_model_path()
    net, config, doc = load_model(json_path)
    if readout is not None:
        if readout not in READOUTS:
            raise ValueError(f'unknown readout {readout!r}; choose one of {READOUTS}')
        config = DetectorConfig.from_json({**config.to_json(), 'readout': readout})
    return Detector(net, config, sha256=doc['weights_sha256'], source=doc['_json_path'],
                    metadata=doc.get('metadata', {}), device=resolve_device(device))
