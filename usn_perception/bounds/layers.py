"""Turn an ``nn.Sequential`` into the engine's three operation kinds, or refuse it.

The engine only ever sees: a *linear* map (with a weight-free ``apply`` for W·x and
``apply_abs`` for |W|·x, plus a bias), an *elementwise affine* map (BatchNorm in eval mode,
the fixed input normalisation) and *ReLU*. Every supported layer is one of these; anything
else raises :class:`UnsupportedLayerError` naming the layer, because a bound engine that
silently guesses is worse than none. BatchNorm that directly follows a convolution is folded
into it (one op less per layer). Compilation is cached per network object and redone when any
parameter or buffer changes in place or a module switches train/eval.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from usn_perception.errors import UnsupportedLayerError
from usn_perception.network import InputNormalization

SUPPORTED_LAYERS = (
    'InputNormalization', 'Conv2d', 'ConvTranspose2d', 'BatchNorm2d (eval mode)', 'ReLU',
    'AvgPool2d', 'Linear', 'Flatten (start_dim >= 1)', "Upsample (mode='nearest')",
    'Identity', 'Sequential (nested)',
)


@dataclass(frozen=True)
class LinearOp:
    """y = W·x + b for a layer whose weight is fixed; ``nonneg`` when W ≥ 0 elementwise.

    ``apply`` and ``apply_abs`` run in the dtype of their input (float64 weights for float64
    input, the weights rounded to float32 for float32). ``fan_in`` is the most products any
    output sums (plus one for a division, as in average pooling); 0 marks an op that only
    moves or copies values (nearest upsampling, flatten), which rounds nothing. The float32
    engine sizes its rounding terms from it (:mod:`usn_perception.bounds.rounding`).
    """

    name: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    apply_abs: Callable[[torch.Tensor], torch.Tensor]
    bias: torch.Tensor | None
    nonneg: bool = False
    fan_in: int = 0
    #: A Conv2d's geometry and float64 weight (BatchNorm folded in), for code that composes
    #: convolutions (:mod:`usn_perception.bounds.fused`) or runs their adjoint
    #: (:mod:`usn_perception.bounds.backward`); None for every other layer.
    conv: ConvGeometry | None = None
    #: The same for a ConvTranspose2d (weight (C_in, C_out / groups, kh, kw)); None otherwise.
    conv_transpose: ConvGeometry | None = None


@dataclass(frozen=True)
class ConvGeometry:
    """What F.conv2d needs besides the input: float64 ``weight`` (O, C, kh, kw) and the rest."""

    weight: torch.Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    padding_mode: str
    dilation: tuple[int, int]
    groups: int


@dataclass(frozen=True)
class AffineOp:
    """y = scale·x + shift elementwise (per channel); the sign of ``scale`` matters."""

    name: str
    scale: torch.Tensor
    shift: torch.Tensor


@dataclass(frozen=True)
class ReluOp:
    """y = max(x, 0)."""

    name: str


Op = LinearOp | AffineOp | ReluOp


@dataclass
class CompiledNetwork:
    """The op list plus the shapes the engine needs to plan memory."""

    ops: list[Op]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    max_numel: int
    fingerprint: tuple = field(repr=False, default=())
    #: Image-independent quantities derived from the ops (e.g. :mod:`.free`'s radius).
    memo: dict = field(repr=False, compare=False, default_factory=dict)
    #: Per op, the module (index into :func:`module_outputs`) whose output the op's output is.
    sources: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain evaluation through the compiled ops (used to check the compilation)."""
        for op in self.ops:
            x = apply_point(op, x)
        return x

    def trace(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The value after every op on a concrete batch (the last is :meth:`forward`'s)."""
        out = []
        for op in self.ops:
            x = apply_point(op, x)
            out.append(x)
        return out

    def op_values(self, outputs: list[torch.Tensor] | tuple) -> list[torch.Tensor]:
        """The value after every op, read from the module's own :func:`module_outputs`.

        Equal to :meth:`trace` up to float64 rounding (a folded BatchNorm rounds differently).
        """
        if len(outputs) <= max(self.sources, default=-1):
            raise ValueError(f'{len(outputs)} module outputs given; the network has '
                             f'{max(self.sources) + 1}')
        return [outputs[i] for i in self.sources]


def module_outputs(net: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every module of ``net`` on ``x`` (nested Sequentials walked through).

    The last is ``net(x)``, computed the same way; the others are what the engine's ops
    produce (:attr:`CompiledNetwork.sources`), so a caller that already ran the network can
    hand them on instead of the engine running it again.
    """
    out = []
    for _, m in _walk(net):
        x = m(x)
        out.append(x)
    return out


def apply_point(op: Op, x: torch.Tensor) -> torch.Tensor:
    """Evaluate one op on a concrete batch."""
    if isinstance(op, LinearOp):
        y = op.apply(x)
        return y if op.bias is None else y + op.bias
    if isinstance(op, AffineOp):
        return x * op.scale + op.shift
    return torch.relu(x)


def _unsupported(name: str, module: nn.Module, why: str = '') -> UnsupportedLayerError:
    detail = f' ({why})' if why else ''
    return UnsupportedLayerError(
        f'layer {name} ({type(module).__name__}) is not supported by the bound engine{detail}; '
        f'supported layers: {", ".join(SUPPORTED_LAYERS)}')


def _walk(net: nn.Module, prefix: str = '') -> Iterator[tuple[str, nn.Module]]:
    for i, m in enumerate(net):
        name = f'{prefix}{i}'
        if isinstance(m, nn.Sequential):
            yield from _walk(m, name + '.')
        else:
            yield name, m


def _bn_affine(name: str, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode BatchNorm, refusing batch statistics."""
    if bn.training:
        raise _unsupported(name, bn, 'BatchNorm in training mode uses batch statistics; '
                           'call .eval() first')
    if bn.running_mean is None or bn.running_var is None:
        raise _unsupported(name, bn, 'BatchNorm without running statistics')
    var = bn.running_var.detach().double()
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _conv_op(name: str, m: nn.Module, bn: tuple | None) -> LinearOp:
    w = m.weight.detach().double()
    b = m.bias.detach().double() if m.bias is not None else None
    if isinstance(m, nn.ConvTranspose2d):
        if bn is not None:
            w = w * bn[0].view(1, -1, 1, 1)
        stride, pad, opad, groups, dil = (m.stride, m.padding, m.output_padding, m.groups,
                                          m.dilation)

        def conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return F.conv_transpose2d(x, weight, None, stride, pad, opad, groups, dil)
    else:
        if bn is not None:
            w = w * bn[0].view(-1, 1, 1, 1)

        def conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return m._conv_forward(x, weight, None)  # honours padding_mode
        if _pointwise(m):
            conv = _pointwise_conv(conv)
    if bn is not None:
        b = (b * bn[0] if b is not None else 0.0) + bn[1]
    bias = b.view(-1, 1, 1) if b is not None else None
    # Terms per output: input channels per group times the kernel area (an upper bound for
    # a transposed convolution, whose strides leave some taps out).
    per_group = w.shape[0] // m.groups if isinstance(m, nn.ConvTranspose2d) else w.shape[1]
    fan_in = int(per_group * w.shape[2] * w.shape[3])
    apply, apply_abs = _by_dtype(conv, w)
    geometry = transposed = None
    if isinstance(m, nn.ConvTranspose2d):
        transposed = ConvGeometry(w, _pair(m.stride), _pair(m.padding), m.padding_mode,
                                  _pair(m.dilation), m.groups)
    elif isinstance(m, nn.Conv2d) and not isinstance(m.padding, str):
        geometry = ConvGeometry(w, _pair(m.stride), _pair(m.padding), m.padding_mode,
                                _pair(m.dilation), m.groups)
    return LinearOp(name, apply, apply_abs, bias, bool((w >= 0).all()), fan_in, geometry,
                    transposed)


def _pointwise(m: nn.Conv2d) -> bool:
    """Whether ``m`` is a 1×1 convolution that only mixes channels (no stride, pad, groups)."""
    return (_pair(m.kernel_size) == (1, 1) and _pair(m.stride) == (1, 1)
            and _pair(m.dilation) == (1, 1) and m.groups == 1
            and m.padding in ((0, 0), 'valid', 'same'))


def _pointwise_conv(fallback: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A 1×1 convolution as one matrix product with the (O, C) weight.

    Measured on the default detector's head (16 → 5 channels, 48×64, 14 images): a
    channels-last batch took 0.78 ms through the convolution and 0.19 ms as W @ X^T (the
    product's output is (O, N·H·W): returned as an (N, O, H, W) view of it); a contiguous
    float64 batch 0.72 → 0.57 ms. Every output is still a dot product of C terms, so the
    rounding bounds keyed to ``fan_in`` hold. Other layouts take ``fallback``.
    """
    def conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            return fallback(x, weight)
        n, c, h, w = x.shape
        mix = weight.view(weight.shape[0], c)
        if x.is_contiguous():
            return torch.matmul(mix, x.view(n, c, h * w)).view(n, -1, h, w)
        if x.is_contiguous(memory_format=torch.channels_last):
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view
            return (mix @ rows.t()).view(-1, n, h, w).permute(1, 0, 2, 3)
        return fallback(x, weight)
    return conv


def _by_dtype(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              w: torch.Tensor) -> tuple[Callable, Callable]:
    """``fn(x, W)`` and ``fn(x, |W|)`` with the weight in x's dtype (float64 or float32)."""
    weights = {torch.float64: (w, w.abs())}
    w32 = w.float()
    weights[torch.float32] = (w32, w32.abs())

    def apply(x: torch.Tensor) -> torch.Tensor:
        return fn(x, weights[x.dtype][0])

    def apply_abs(x: torch.Tensor) -> torch.Tensor:
        return fn(x, weights[x.dtype][1])
    return apply, apply_abs


def _compile_ops(net: nn.Module) -> tuple[list[Op], tuple[int, ...]]:
    """The ops, and per op the walked module whose output it is (a folded BatchNorm's)."""
    if not isinstance(net, nn.Sequential):
        raise _unsupported('<root>', net, 'the engine walks an nn.Sequential')
    items = list(_walk(net))
    ops: list[Op] = []
    sources: list[int] = []
    i = 0
    while i < len(items):
        name, m = items[i]
        nxt = items[i + 1][1] if i + 1 < len(items) else None
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fold = isinstance(nxt, nn.BatchNorm2d) and not (
                isinstance(m, nn.ConvTranspose2d) and m.groups != 1)
            bn = _bn_affine(items[i + 1][0], nxt) if fold else None
            ops.append(_conv_op(name + ('+bn' if fold else ''), m, bn))
            i += 2 if fold else 1
            sources.append(i - 1)
            continue
        if isinstance(m, nn.BatchNorm2d):
            scale, shift = _bn_affine(name, m)
            ops.append(AffineOp(name, scale.view(-1, 1, 1), shift.view(-1, 1, 1)))
        elif isinstance(m, InputNormalization):
            if not m.std > 0:
                raise _unsupported(name, m, 'std must be positive')
            one = torch.ones((), dtype=torch.float64)
            ops.append(AffineOp(name, one / m.std, -one * m.mean / m.std))
        elif isinstance(m, nn.ReLU):
            ops.append(ReluOp(name))
        elif isinstance(m, nn.Linear):
            w = m.weight.detach().double()
            b = m.bias.detach().double() if m.bias is not None else None
            apply, apply_abs = _by_dtype(F.linear, w)
            ops.append(LinearOp(name, apply, apply_abs, b, bool((w >= 0).all()),
                                int(w.shape[1])))
        elif isinstance(m, nn.AvgPool2d):
            if m.divisor_override is not None and not m.divisor_override > 0:
                raise _unsupported(name, m, 'divisor_override must be positive')
            kh, kw = _pair(m.kernel_size)
            ops.append(LinearOp(name, m, m, None, True, int(kh * kw) + 1))
        elif isinstance(m, nn.Upsample):
            if m.mode not in ('nearest', 'nearest-exact'):
                raise _unsupported(name, m, f'mode {m.mode!r}; only nearest is supported')
            ops.append(LinearOp(name, m, m, None, True))
        elif isinstance(m, nn.Flatten):
            if m.start_dim == 0:
                raise _unsupported(name, m, 'start_dim=0 would flatten the batch')
            ops.append(LinearOp(name, m, m, None, True))
        elif isinstance(m, nn.Identity):
            pass
        else:
            raise _unsupported(name, m)
        if len(ops) > len(sources):  # an Identity adds no op
            sources.append(i)
        i += 1
    return ops, tuple(sources)


def _fingerprint(net: nn.Module, input_shape: tuple[int, ...]) -> tuple:
    """Identity, version counter and a checksum of every tensor, plus train/eval flags.

    The checksum catches in-place edits through ``.data``, which bypass version counters.
    One walk over the modules' own tensor dicts (``parameters()``, ``buffers()`` and
    ``modules()`` each walk the tree again): a frame pays for this on every certificate.
    """
    tensors, training = [], []
    for m in net.modules():
        training.append(m.training)
        tensors.extend(t for t in m._parameters.values() if t is not None)
        tensors.extend(t for t in m._buffers.values() if t is not None)
    with torch.no_grad():  # one flat copy, integer buffers (counters) included exactly
        flat = (torch.cat([t.reshape(-1).double() for t in tensors]) if tensors
                else torch.zeros(1, dtype=torch.float64))
        sums = (float(flat.abs().sum()), float(flat.sum()))
    return (tuple(input_shape), tuple((id(t), t.data_ptr(), t._version) for t in tensors), sums,
            tuple(training))


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_network(net: nn.Module, input_shape: tuple[int, ...]) -> CompiledNetwork:
    """Compile (or fetch from the cache) ``net`` for inputs of ``input_shape`` (C, H, W).

    The compiled ops are checked against ``net`` itself on a random input, so a layer whose
    configuration the engine misreads fails here rather than producing a wrong certificate.
    """
    key = _fingerprint(net, input_shape)
    hit = _CACHE.get(net)
    if hit is not None and hit.fingerprint == key:
        return hit
    ops, sources = _compile_ops(net)
    param = next(iter(net.parameters()), None)
    device = param.device if param is not None else torch.device('cpu')
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((2, *input_shape), generator=gen, dtype=torch.float64).to(device)
    max_numel = x[0].numel()
    y = x
    values = []
    with torch.no_grad():
        for op in ops:
            y = apply_point(op, y)
            if y.shape[0] != 2:
                raise UnsupportedLayerError(f'layer {op.name} changes the batch dimension')
            max_numel = max(max_numel, y[0].numel())
            values.append(y)
        double = param is None or param.dtype == torch.float64
        outputs = module_outputs(net if double else _reference(net), x)
    # Every op against the module output it stands for (callers may hand those on).
    for op, value, src in zip(ops, values, sources, strict=True):
        ref = outputs[src]
        err = float((value - ref).abs().max()) if value.shape == ref.shape else float('inf')
        scale = 1.0 + float(ref.abs().max())
        if not err <= 1e-9 * scale:
            raise UnsupportedLayerError(
                f'compiled network disagrees with the module by {err:.3g} after layer '
                f'{op.name}; some layer is not what the engine assumes')
    compiled = CompiledNetwork(ops, tuple(input_shape), tuple(y.shape[1:]), int(max_numel), key,
                               sources=sources)
    _CACHE[net] = compiled
    return compiled


def _reference(net: nn.Module) -> nn.Module:
    """A float64 copy of a network whose parameters are not float64."""
    import copy

    return copy.deepcopy(net).to(torch.float64)
