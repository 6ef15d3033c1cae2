"""The fused linear prefix: the same map as its ops, and a rounding bound that holds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from usn_perception.bounds.fused import _pad, fused_prefix
from usn_perception.bounds.layers import LinearOp, compile_network
from usn_perception.bounds.prefix import apply_prefix
from usn_perception.bounds.rounding import U32, U64
from usn_perception.network import InputNormalization

F64 = torch.float64


def _stack(first: nn.Conv2d, second: nn.Module, *, scale: bool = True,
           channels: int = 1) -> nn.Sequential:
    layers = ([InputNormalization(0.0, 0.25)] if scale and channels == 1 else [])
    layers += [first, nn.BatchNorm2d(first.out_channels), second, nn.ReLU(),
               nn.Conv2d(second.out_channels, 2, 1)]
    net = nn.Sequential(*layers).double().eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=F64))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=F64) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen, dtype=F64))
    return net


def _op_by_op(net, x: torch.Tensor) -> torch.Tensor:
    """The prefix's linear part in float64, one op after the other."""
    compiled = compile_network(net, tuple(x.shape[1:]))
    return apply_prefix(compiled, fused_prefix(compiled).stop, x.double(), linear=True)


GEOMETRIES = [  # (first conv, second conv, input H, W)
    (dict(kernel_size=3, padding=1, padding_mode='replicate'),
     dict(kernel_size=3, stride=2, padding=1), 24, 32),  # the shipped detector's
    (dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1), 23, 17),
    (dict(kernel_size=5, padding=2, padding_mode='reflect'),
     dict(kernel_size=4, stride=2, padding=1), 20, 21),
    (dict(kernel_size=3, padding=1, padding_mode='circular'),
     dict(kernel_size=3, stride=3, padding=2), 19, 22),
    (dict(kernel_size=3, padding=0), dict(kernel_size=3, stride=1, padding=0), 16, 16),
    (dict(kernel_size=1), dict(kernel_size=3, stride=1, padding=1), 12, 9),
    (dict(kernel_size=(3, 5), padding=(1, 2), padding_mode='replicate'),
     dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0)), 18, 15),
]


@pytest.mark.parametrize('first, second, h, w', GEOMETRIES)
@pytest.mark.parametrize('channels', [1, 3])
def test_fused_prefix_is_the_prefix_and_its_rounding_bound_holds(first, second, h, w, channels):
    net = _stack(nn.Conv2d(channels, 5, bias=True, **first),
                 nn.Conv2d(5, 6, bias=False, **second), channels=channels)
    compiled = compile_network(net, (channels, h, w))
    fused = fused_prefix(compiled)
    assert fused is not None and fused.stop == (3 if channels == 1 else 2)
    gen = torch.Generator().manual_seed(h * w + channels)
    # Deviations as the level pass sees them: sparse, mixed signs, very different scales.
    x = torch.randn((4, channels, h, w), generator=gen, dtype=F64)
    x *= (torch.rand((4, channels, h, w), generator=gen, dtype=F64) < 0.4) * 10.0 ** (
        torch.randint(-6, 2, (4, 1, 1, 1), generator=gen))
    want = _op_by_op(net, x)
    torch.testing.assert_close(fused.apply(x), want, rtol=1e-12, atol=1e-14)
    for layout in (torch.contiguous_format, torch.channels_last):
        x32 = x.float().contiguous(memory_format=layout)
        exact = _op_by_op(net, x32.double())  # the float32 input's own map, in float64
        m = x32.abs().amax(0, keepdim=True)
        bound = fused.radius(torch.zeros_like(m), m, U32).double()
        error = (fused.apply(x32).double() - exact).abs()
        assert bool((error <= bound).all()), float((error - bound).max())
        assert float(bound.max()) < 1e-3 * float(exact.abs().max())  # and not vacuous
    m64 = x.abs().amax(0, keepdim=True)
    bound64 = fused.radius(torch.zeros_like(m64), m64, U64)
    assert float(bound64.max()) < 1e-11 * float(want.abs().max())  # float64: ulp-level
    # A radius r moves through |W2|·|W1| (op by op, with each convolution's own padding).
    r = torch.rand((1, channels, h, w), generator=gen, dtype=F64)
    reach = r
    for op in compile_network(net, (channels, h, w)).ops[:fused.stop]:
        reach = op.apply_abs(reach) if isinstance(op, LinearOp) else reach * op.scale.abs()
    moved = fused.radius(r.float(), torch.zeros_like(r).float(), U32).double()
    assert bool((moved >= reach).all()) and float((moved / reach).max()) < 2.0


@pytest.mark.parametrize('mode', ['zeros', 'replicate', 'reflect', 'circular'])
def test_padding_is_torchs(mode):
    x = torch.randn((2, 3, 7, 9), generator=torch.Generator().manual_seed(2))
    for pad in [(1, 1, 1, 1), (2, 0, 1, 3), (0, 2, 2, 0), (3, 3, 3, 3), (0, 0, 0, 0)]:
        want = F.pad(x, pad) if mode == 'zeros' else F.pad(x, pad, mode=mode)
        assert torch.equal(_pad(x, pad, mode), want), pad


@pytest.mark.parametrize('second, why', [
    (nn.Conv2d(5, 6, 3, padding=1, padding_mode='replicate'), 'second pads by replication'),
    (nn.Conv2d(5, 6, 3, padding=2, dilation=2), 'dilated'),
    (nn.Conv2d(5, 6, 3, padding=1, stride=2), None),  # the shipped kind: fuses
    (nn.ConvTranspose2d(5, 6, 4, stride=2, padding=1), 'transposed'),
])
def test_only_two_plain_convolutions_fuse(second, why):
    net = _stack(nn.Conv2d(1, 5, 3, padding=1), second)
    fused = fused_prefix(compile_network(net, (1, 16, 16)))
    assert (fused is None) == (why is not None), why


def test_other_prefixes_are_left_alone():
    three = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()).double().eval()
    strided_first = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1),
                                  nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()).double().eval()
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2),
                            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()).double().eval()
    one = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1)).double().eval()
    for net, c in ((three, 1), (strided_first, 1), (grouped, 2), (one, 1)):
        assert fused_prefix(compile_network(net, (c, 12, 12))) is None
