"""Where bounds grow: per-layer widths and unstable ReLUs for one image and θ box.

A certificate is only as tight as its loosest layer; this walks the same forward-mode
propagation as :func:`certify_keypoints` and records, after every op, the mean width of the
θ-dependent part of the bound (exact: what θ really does) and of the relaxation radius (what
the bound adds), plus the unstable ReLUs per channel — the neurons a certification-aware
pruning or training step would target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from usn_perception.bounds.box import PhotometricBox
from usn_perception.bounds.forms import form_range, lower, upper
from usn_perception.bounds.inputs import ImageEncoding
from usn_perception.bounds.layers import AffineOp, LinearOp, compile_network
from usn_perception.bounds.propagate import _affine, _linear, relu_forms


@dataclass(frozen=True)
class LayerBound:
    """Bound statistics after one op (means over neurons)."""

    name: str
    kind: str
    theta_width: float
    radius_width: float
    bound_width: float
    unstable: int
    unstable_per_channel: np.ndarray | None


@torch.no_grad()
def layer_bounds(detector, image: np.ndarray, box: PhotometricBox, *,
                 relu: str = 'parallel') -> list[LayerBound]:
    """Per-op bound statistics of ``detector`` on ``image`` over the whole ``box``."""
    box = PhotometricBox.coerce(box)
    enc = ImageEncoding(image, detector.config.input_size, detector.device)
    net = compile_network(detector.net, enc.shape)
    boxes = box.as_row().to(enc.device)
    centre, radius = enc.forms(boxes)
    out = []
    for op in net.ops:
        per_channel = None
        n_unstable = 0
        if isinstance(op, LinearOp):
            centre, radius = _linear(op, centre, radius)
            kind = 'linear'
        elif isinstance(op, AffineOp):
            centre, radius = _affine(op, centre, radius)
            kind = 'affine'
        else:
            lo = form_range(lower(centre, radius), boxes)[0]
            up = form_range(upper(centre, radius), boxes)[1]
            mask = (lo < 0) & (up > 0)
            per_channel = mask[0].flatten(1).sum(1).cpu().numpy() if mask.ndim > 2 else None
            centre, radius, count = relu_forms(centre, radius, boxes, relu)
            n_unstable = int(count.sum())
            kind = 'relu'
        c_lo, c_hi = form_range(centre, boxes)
        r_lo, r_hi = form_range(radius, boxes)
        b_lo = form_range(lower(centre, radius), boxes)[0]
        b_hi = form_range(upper(centre, radius), boxes)[1]
        out.append(LayerBound(op.name, kind, float((c_hi - c_lo).mean()),
                              float(2.0 * r_hi.mean()), float((b_hi - b_lo).mean()),
                              n_unstable, per_channel))
    return out
