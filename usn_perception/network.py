"""The heatmap keypoint CNN: a plain chain of layers the bound engine can walk.

The network is an ``nn.Sequential`` of Conv2d / BatchNorm2d / ReLU blocks (strided convs
down, ConvTranspose2d up) ending in a 1x1 conv with one heatmap per keypoint. No skip
connections and no per-image normalisation: a fixed :class:`InputNormalization` is the only
input transform, so brightness and contrast reach the network unchanged and every layer is
one the bound engine supports. Widths are per layer so pruning can change them.

Two architectures share that chain (``DetectorConfig.arch``):

* ``plain``: biased BatchNorm, zero padding, biased head (the first shipped model).
* ``homogeneous`` (default): certifiable by construction. The first conv's filters have zero
  mean and replicate padding, so it ignores a brightness offset β exactly; nothing after it
  has a shift (:class:`ScaleNorm2d` instead of BatchNorm's centring, no biases), and ReLU is
  positively homogeneous, so without clipping ``net(α·x + β) = α·net(x)``: every ReLU keeps
  its sign over the whole θ box, the bound engine's forms are exact, and the ``centroid``
  readout does not move at all. Only pixels that the clip to [0, 1] reaches make bounds
  loose. Soundness never relies on this: the engine bounds any network; this makes it tight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
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
    norm_mean: float = 0.0
    norm_std: float = 0.25
    readout: str = 'centroid'
    arch: str = 'homogeneous'
    #: A ReLU after the first conv (False: the first two convs compose into one linear stage,
    #: so the first sign changes, which the certificates pay for most, come a layer later).
    first_relu: bool = True
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
        if self.arch not in ARCHS:
            raise ValueError(f'arch must be one of {ARCHS}, got {self.arch!r}')
        if self.arch == 'homogeneous' and self.norm_mean != 0.0:
            raise ValueError('the homogeneous architecture needs norm_mean = 0 (no input shift)')
        if not isinstance(self.first_relu, bool):
            raise ValueError(f'first_relu must be true or false, got {self.first_relu!r}')

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
        known = {'input_size', 'widths', 'keypoint_names', 'norm_mean', 'norm_std', 'readout',
                 'arch', 'first_relu'}  # files without first_relu have the ReLU
        missing = {'input_size', 'widths', 'keypoint_names'} - d.keys()
        if missing:
            raise ValueError(f'architecture is missing {sorted(missing)}')
        kwargs = {k: d[k] for k in known if k in d}
        # Files written before ``arch`` existed hold the plain network and its defaults.
        if 'arch' not in kwargs:
            kwargs = {'arch': 'plain', **PLAIN_DEFAULTS, **kwargs}
        kwargs['input_size'] = tuple(int(v) for v in kwargs['input_size'])
        kwargs['widths'] = tuple(int(v) for v in kwargs['widths'])
        kwargs['keypoint_names'] = tuple(str(v) for v in kwargs['keypoint_names'])
        extra = dict(d.get('extra') or {})
        extra.update({k: v for k, v in d.items() if k not in known | {'extra'}})
        return cls(**kwargs, extra=extra)

    def with_widths(self, widths: Sequence[int]) -> DetectorConfig:
        """Same architecture with other per-layer widths (after pruning)."""
        # replace(): every other field carries over, including ones added later (first_relu
        # was nearly lost on pruning because this listed the fields by hand).
        return replace(self, widths=tuple(int(w) for w in widths), extra=dict(self.extra))


READOUTS = ('centroid', 'local-centroid', 'soft-argmax', 'argmax')
ARCHS = ('homogeneous', 'plain')
#: What differs from the defaults for the plain architecture (and old files without ``arch``).
PLAIN_DEFAULTS = {'norm_mean': 0.5, 'readout': 'soft-argmax'}


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


class ZeroMeanConv2d(nn.Conv2d):
    """A Conv2d whose filters are kept at zero mean (with replicate padding: β-invariant).

    The forward pass is the plain convolution, so the bound engine and torch-pruning see an
    ordinary Conv2d; training keeps the constraint by projecting after every optimiser step
    (:func:`apply_constraints`).
    """

    def project_(self) -> None:
        """Subtract each filter's mean, in place."""
        with torch.no_grad():
            self.weight -= self.weight.mean(dim=(1, 2, 3), keepdim=True)


class ScaleNorm2d(nn.BatchNorm2d):
    """BatchNorm without centring: ``γ·x / sqrt(E[x²] + ε)``, shift fixed at 0.

    Training normalises by the batch's per-channel mean square and tracks it in
    ``running_var`` (``running_mean`` and ``bias`` stay 0, the bias is frozen), so in eval mode
    it *is* an ordinary BatchNorm2d with a zero shift: a per-channel scale, positively
    homogeneous. Loads, prunes and bounds like BatchNorm2d.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.training:
            return super().forward(x)
        ms = x.pow(2).mean(dim=(0, 2, 3))
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else (
                1.0 / float(self.num_batches_tracked))
            self.running_var.lerp_(ms.detach().to(self.running_var.dtype), m)
        scale = self.weight / torch.sqrt(ms + self.eps)
        return x * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def build_network(config: DetectorConfig) -> nn.Sequential:
    """Build the layer chain for ``config`` (input N×1×H×W in [0,1], output N×K×H/2×W/2)."""
    homogeneous = config.arch == 'homogeneous'
    layers: list[nn.Module] = [InputNormalization(config.norm_mean, config.norm_std)]
    c_in = 1
    for i, ((kind, stride), width) in enumerate(zip(LAYER_PLAN, config.widths, strict=True)):
        if kind == 'c' and i == 0 and homogeneous:
            layers.append(ZeroMeanConv2d(c_in, width, 3, stride=stride, padding=1, bias=False,
                                         padding_mode='replicate'))
        elif kind == 'c':
            layers.append(nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=False))
        else:
            layers.append(nn.ConvTranspose2d(c_in, width, 4, stride=2, padding=1, bias=False))
        layers.append(ScaleNorm2d(width) if homogeneous else nn.BatchNorm2d(width))
        if i > 0 or config.first_relu:
            layers.append(nn.ReLU())
        c_in = width
    layers.append(nn.Conv2d(c_in, config.num_keypoints, 1, bias=not homogeneous))
    net = nn.Sequential(*layers)
    apply_constraints(net)
    return net


def forward_with_gain(net: nn.Sequential, x: torch.Tensor,
                      probe_hw: tuple[int, int] = (24, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """``net(x)`` and the network's *radius gain*: the mean of ``|net|`` applied to ones.

    ``|net|`` replaces every weight by its absolute value (norms by |γ|/σ, with the batch's σ
    in training mode so that rescaling weights cannot fake a small gain). It is how much the
    bound engine's forward-mode radius can grow from input to heatmap: a trained net reaches
    ~1e10, which turns a 1e-3 relaxation at a clipped pixel into a vacuous certificate.
    Penalising ``log(gain)`` in training (``TrainOptions.gain_weight``) is the project's
    certified-training term. Positional: the chain of :func:`build_network`.
    """
    gain = torch.ones(1, 1, *probe_hw, dtype=x.dtype, device=x.device)
    for m in net:
        if isinstance(m, nn.BatchNorm2d):
            if m.training:
                var = (x.pow(2) if isinstance(m, ScaleNorm2d) else
                       (x - x.mean(dim=(0, 2, 3), keepdim=True)).pow(2)).mean(dim=(0, 2, 3))
            else:
                var = m.running_var
            gain = gain * (m.weight.abs() / torch.sqrt(var + m.eps)).view(1, -1, 1, 1)
        elif isinstance(m, nn.ConvTranspose2d):
            gain = F.conv_transpose2d(gain, m.weight.abs(), None, m.stride, m.padding,
                                      m.output_padding)
        elif isinstance(m, nn.Conv2d):
            pad = m.padding if isinstance(m.padding, tuple) else (m.padding,) * 2
            gain = F.pad(gain, (pad[1], pad[1], pad[0], pad[0]), mode='replicate')
            gain = F.conv2d(gain, m.weight.abs(), None, m.stride)
        elif isinstance(m, InputNormalization):
            gain = gain / m.std
        x = m(x)
    return x, gain.mean()


@torch.no_grad()
def recalibrate_norms(net: nn.Module, images: torch.Tensor, batch: int = 64) -> None:
    """Re-estimate every norm layer's running statistics as a plain average over ``images``.

    Running averages lag behind fast-moving weights, so eval mode can disagree with training
    mode; one pass with the final weights removes that (done after every epoch).
    """
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms or images.shape[0] == 0:
        return
    was_training = net.training
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    for i in range(0, images.shape[0], batch):
        net(images[i:i + batch])
    for m, mom in zip(norms, saved, strict=True):
        m.momentum = mom
    net.train(was_training)


def apply_constraints(net: nn.Module) -> None:
    """Restore the architecture's constraints after an update: zero-mean filters, zero shifts.

    Called after every optimiser step and after pruning (torch-pruning re-creates parameters
    and would make ScaleNorm2d's frozen shift trainable again).
    """
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ZeroMeanConv2d):
                m.project_()
            elif isinstance(m, ScaleNorm2d):
                m.bias.zero_()
                m.bias.requires_grad_(False)
                m.running_mean.zero_()


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
