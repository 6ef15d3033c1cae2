"""The heatmap keypoint CNN: a plain chain of layers the bound engine can walk.

The network is an ``nn.Sequential`` of Conv2d / BatchNorm2d / ReLU blocks (strided convs
down, ConvTranspose2d up) ending in a 1x1 conv with one heatmap per keypoint. No skip
connections and no per-image normalisation: a fixed :class:`InputNormalization` is the only
input transform, so brightness and contrast reach the network unchanged and every layer is
one the bound engine supports. Widths are per layer so pruning can change them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

#: Layer plan: (kind, stride). 'c' = 3x3 conv, 't' = 4x4 stride-2 transposed conv.
LAYER_PLAN: tuple[tuple[str, int], ...] = (
    ('c', 1), ('c', 2), ('c', 1), ('c', 2), ('c', 1), ('c', 2), ('c', 1), ('t', 2), ('t', 2),
)
DEFAULT_WIDTHS: tuple[int, ...] = (16, 32, 32, 48, 48, 64, 64, 32, 32)
DEFAULT_KEYPOINTS: tuple[str, ...] = (
    'top_left', 'top_right', 'bottom_right', 'bottom_left', 'centre',
)
#: Heatmap cell size in network-input pixels (3 stride-2 convs down, 2 transposed convs up).
HEATMAP_STRIDE = 2


@dataclass(frozen=True)
class DetectorConfig:
    """Everything needed to rebuild the network; stored in the model's JSON sidecar."""

    input_size: tuple[int, int] = (128, 96)  # network input (W, H)
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    keypoint_names: tuple[str, ...] = DEFAULT_KEYPOINTS
    norm_mean: float = 0.5
    norm_std: float = 0.25
    readout: str = 'soft-argmax'
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        """Validate so that a bad JSON sidecar fails with a reason, not deep inside torch."""
        if len(self.widths) != len(LAYER_PLAN):
            raise ValueError(f'widths must have {len(LAYER_PLAN)} entries, got {len(self.widths)}')
        if any(int(w) < 1 for w in self.widths):
            raise ValueError(f'every width must be >= 1, got {list(self.widths)}')
        w, h = self.input_size
        if w % 8 or h % 8 or w < 16 or h < 16:
            raise ValueError(f'input_size must be multiples of 8 and >= 16, got {self.input_size}')
        if not self.keypoint_names:
            raise ValueError('at least one keypoint is needed')
        if not self.norm_std > 0:
            raise ValueError('norm_std must be positive')
        if self.readout not in READOUTS:
            raise ValueError(f'readout must be one of {READOUTS}, got {self.readout!r}')

    @property
    def num_keypoints(self) -> int:
        """K, the number of heatmaps."""
        return len(self.keypoint_names)

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """(W, H) of the output heatmaps."""
        return self.input_size[0] // HEATMAP_STRIDE, self.input_size[1] // HEATMAP_STRIDE

    def to_json(self) -> dict:
        """JSON-serialisable form (lists, not tuples)."""
        d = asdict(self)
        d['input_size'] = list(self.input_size)
        d['widths'] = [int(w) for w in self.widths]
        d['keypoint_names'] = list(self.keypoint_names)
        return d

    @classmethod
    def from_json(cls, d: dict) -> DetectorConfig:
        """Inverse of :meth:`to_json`; unknown keys go to ``extra``."""
        known = {'input_size', 'widths', 'keypoint_names', 'norm_mean', 'norm_std', 'readout'}
        missing = {'input_size', 'widths', 'keypoint_names'} - d.keys()
        if missing:
            raise ValueError(f'architecture is missing {sorted(missing)}')
        kwargs = {k: d[k] for k in known if k in d}
        kwargs['input_size'] = tuple(int(v) for v in kwargs['input_size'])
        kwargs['widths'] = tuple(int(v) for v in kwargs['widths'])
        kwargs['keypoint_names'] = tuple(str(v) for v in kwargs['keypoint_names'])
        extra = dict(d.get('extra') or {})
        extra.update({k: v for k, v in d.items() if k not in known | {'extra'}})
        return cls(**kwargs, extra=extra)

    def with_widths(self, widths: Sequence[int]) -> DetectorConfig:
        """Same architecture with other per-layer widths (after pruning)."""
        return DetectorConfig(
            input_size=self.input_size, widths=tuple(int(w) for w in widths),
            keypoint_names=self.keypoint_names, norm_mean=self.norm_mean,
            norm_std=self.norm_std, readout=self.readout, extra=dict(self.extra),
        )


READOUTS = ('soft-argmax', 'argmax')


class InputNormalization(nn.Module):
    """Fixed ``(x - mean) / std``; an affine map, so it does not cancel brightness/contrast."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean = float(mean)
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:  # noqa: D102
        return f'mean={self.mean}, std={self.std}'


def build_network(config: DetectorConfig) -> nn.Sequential:
    """Build the layer chain for ``config`` (input N×1×H×W in [0,1], output N×K×H/2×W/2)."""
    layers: list[nn.Module] = [InputNormalization(config.norm_mean, config.norm_std)]
    c_in = 1
    for (kind, stride), width in zip(LAYER_PLAN, config.widths, strict=True):
        if kind == 'c':
            layers.append(nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=False))
        else:
            layers.append(nn.ConvTranspose2d(c_in, width, 4, stride=2, padding=1, bias=False))
        layers += [nn.BatchNorm2d(width), nn.ReLU()]
        c_in = width
    layers.append(nn.Conv2d(c_in, config.num_keypoints, 1))
    return nn.Sequential(*layers)


def prunable_layers(net: nn.Sequential) -> list[tuple[int, nn.Module, nn.BatchNorm2d]]:
    """(index, conv, bn) of every hidden conv whose output channels may be pruned."""
    out = []
    for i, m in enumerate(net):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and i + 1 < len(net):
            bn = net[i + 1]
            if isinstance(bn, nn.BatchNorm2d):
                out.append((i, m, bn))
    return out


def layer_widths(net: nn.Sequential) -> tuple[int, ...]:
    """Current per-layer widths (read from the BatchNorm layers)."""
    return tuple(bn.num_features for _, _, bn in prunable_layers(net))


def count_parameters(net: nn.Module) -> int:
    """Number of learnable parameters."""
    return sum(p.numel() for p in net.parameters())


def count_macs(net: nn.Sequential, input_size: tuple[int, int]) -> int:
    """Multiply-accumulates of one forward pass at ``input_size`` (W, H)."""
    macs = 0
    hooks = []

    def conv_hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        k = m.weight.shape[2] * m.weight.shape[3]
        if isinstance(m, nn.ConvTranspose2d):
            macs += inp[0].numel() * m.out_channels * k
        else:
            macs += out.numel() * (m.in_channels // m.groups) * k

    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            hooks.append(m.register_forward_hook(conv_hook))
    try:
        with torch.no_grad():
            p = next(net.parameters())
            net(torch.zeros(1, 1, input_size[1], input_size[0], dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    return int(macs)
