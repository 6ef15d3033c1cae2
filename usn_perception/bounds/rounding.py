"""Forward-mode propagation with the θ-dependent part of every form in float32, rounding tracked.

Float32 convolutions run ~3x faster than float64 ones on this kind of CPU, and the per-frame
certificate is mostly convolutions. Here each form is split at its sub-box's centre θc:

    z(θ) = v0 + Σ_j vj·(θ − θc)_j ± r,

with the centre value ``v0`` in float64 (it is as large as the activation itself, and float32
rounding of it would swamp the small variations a tight certificate resolves) and the
coefficients ``vj`` and the radius ``r`` in float32, where rounding errors scale with the
*variation* over the sub-box, not with the activation. Each float32 step bounds its own error
and widens ``r`` by it, so the stored numbers mean exactly what the float64 engine's forms mean;
the float64 steps carry the same ulp-level error as the rest of the engine (covered by the logit
slack of :mod:`usn_perception.bounds.spec`, docs/certification.md).

The error model is the standard one for round-to-nearest (u = 2⁻²⁴):

* a dot product of n terms computed in *any* summation order, with or without fused
  multiply-adds, is within γ_n·Σ|wᵢ·xᵢ| of the exact one (γ_n = n·u / (1 − n·u)); a
  convolution whose outputs are such dot products (direct or im2col+GEMM algorithms; not
  Winograd or FFT, which transform the operands) obeys it per output;
* the value error of the float32 part on the sub-box is then at most γ·|W|·m, with
  m = Σ_j |vj|·h_j (h the half-widths): one extra image through |W|, folded into the radius'
  own layer call.

Every derived bound is multiplied by a safety factor covering the few roundings of the
bookkeeping itself, and an absolute 2⁻¹⁰⁰ is added per op for flushed subnormals.
:func:`float32_problem` refuses backends that would break the model (TF32 or bfloat16 "fp32"
modes; GPUs, whose libraries pick Winograd or FFT freely; CPUs other than x86-64, whose
convolution backends were not checked) and NNPACK (Winograd) is switched off while the engine
runs. The oneDNN algorithm PyTorch uses on the CPU
(``convolution_direct``) is checked by a test that reads oneDNN's own log.
"""

from __future__ import annotations

import platform
import time

import torch

from usn_perception.bounds.forms import box_view
from usn_perception.bounds.layers import AffineOp, CompiledNetwork, LinearOp
from usn_perception.bounds.propagate import BudgetExceeded

PRECISIONS = ('auto', 'float64', 'float32')
#: Unit roundoff of float32 (round to nearest).
U32 = 2.0 ** -24
#: Unit roundoff of float64.
U64 = 2.0 ** -53
#: Absolute slack per op: covers subnormals flushed to zero (each loses < 2⁻¹²⁶).
TINY = 2.0 ** -100
#: A θ-axis whose terms |vj|·h_j stay below this fraction of the largest centre value on
#: every neuron is folded into the radius instead of propagated: exactly 0 for κ when no
#: bright pixel clips, rounding-level for τ behind a zero-sum first filter when no dark one
#: does (the propagation then moves one coefficient image per layer instead of two).
IDLE_AXIS = 1e-12
#: Lifts a float64 value above itself before rounding it to float32 (2 float32 ulps).
UP32 = 1.0 + 2.0 ** -22


def gamma(n: int, unit: float = U32) -> float:
    """γ_n = n·u / (1 − n·u): the relative error bound of an n-term dot product.

    ``unit``: the unit roundoff, :data:`U32` (default) or :data:`U64`.
    """
    nu = n * unit
    if not nu < 0.5:
        raise ValueError(f'fan-in {n} is too large for error bounds at unit roundoff {unit}')
    return nu / (1.0 - nu)


def safety(n: int) -> float:
    """Factor that lifts a computed non-negative bound above its exact value (n roundings)."""
    return 1.0 + 4.0 * gamma(n + 16)


def float32_problem(device: torch.device) -> str | None:
    """Why float32 bounds would not be sound on ``device`` with the current settings, or None."""
    if torch.device(device).type != 'cpu':
        return (f'float32 bounds run on the CPU only ({device} libraries may use TF32, '
                'Winograd or FFT convolutions)')
    if platform.machine().lower() not in ('x86_64', 'amd64'):
        return (f'float32 bounds are checked on x86-64 CPUs only, this is '
                f'{platform.machine()!r} (other backends may pick Winograd convolutions)')
    if torch.get_float32_matmul_precision() != 'highest':
        return ('torch.get_float32_matmul_precision() is '
                f'{torch.get_float32_matmul_precision()!r}, not \'highest\'')
    mkldnn = torch.backends.mkldnn
    for name, part in (('mkldnn', mkldnn), ('mkldnn.conv', getattr(mkldnn, 'conv', None)),
                       ('mkldnn.matmul', getattr(mkldnn, 'matmul', None))):
        precision = getattr(part, 'fp32_precision', 'none') if part is not None else 'none'
        if precision not in ('none', 'ieee'):
            return f'torch.backends.{name}.fp32_precision is {precision!r}'
    return None


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' → 'float32' where :func:`float32_problem` finds none, else 'float64'."""
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
    if precision == 'float64':
        return precision
    problem = float32_problem(device)
    if problem is None:
        return 'float32'
    if precision == 'float32':
        raise ValueError(f'float32 bounds are not available: {problem}')
    return 'float64'


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every element of every tensor is finite (no NaN, no ±inf).

    Tested on the tensors' sum: a NaN or an infinity makes it non-finite, so the answer is
    never wrong in that direction; a sum that overflows (elements near the dtype's largest)
    reports False too, which the callers treat as an overflow (they bound another way).
    ``isfinite(t).all()`` took 0.44 ms on a node frame's channels-last logits, the sum 0.03.
    """
    return bool(torch.isfinite(sum(t.sum() for t in tensors)))


def _up32(x: torch.Tensor) -> torch.Tensor:
    """A float32 tensor ≥ the non-negative float64 ``x`` elementwise."""
    return (x * UP32).float()


def _half_widths(boxes: torch.Tensor, k: int, ndim: int) -> torch.Tensor:
    """(N, k − 1, 1, …) float32 h_j ≥ |θ − θc|_j on each sub-box (1 for generators)."""
    ac, ar, bc, br = box_view(boxes, 1)
    # The float64 centre is itself rounded: cover |θc − fl(θc)| too.
    half = torch.stack([ar + ac.abs() * 2.0 ** -50, br + bc.abs() * 2.0 ** -50], 1)
    ones = torch.ones((boxes.shape[0], k - 3), dtype=half.dtype, device=half.device)
    h = _up32(torch.cat([half, ones], 1))
    return h.view(*h.shape, *(1,) * (ndim - 1))


def _variation(v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The variation m = Σ_j |vj|·h_j: bounds |Σ_j vj·(θ − θc)_j| on the sub-box (float32)."""
    return (v.abs() * h).sum(1)


def to_centred(centre: torch.Tensor, radius: torch.Tensor, boxes: torch.Tensor, *,
               drop_idle: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Engine forms (C, R) in float64 → (v0 float64, V float32, r float32, kept) at the centre.

    With ``drop_idle`` a θ-axis whose terms |vj|·h_j stay below :data:`IDLE_AXIS` of the
    largest |v0| on every neuron and sub-box is folded into the radius (a sound bound of its
    contribution) and left out of V; ``kept`` lists the coefficient channels V holds.
    """
    if radius.shape[1] != 1 or centre.shape[1] < 3:
        raise ValueError('float32 propagation needs θ-forms (k >= 3) and a constant radius')
    ac, _, bc, _ = box_view(boxes, centre.ndim - 1)
    v0 = centre[:, 0] + centre[:, 1] * ac + centre[:, 2] * bc
    v = centre[:, 1:]
    h = _half_widths(boxes, centre.shape[1], centre.ndim - 1).double()
    terms = v.abs() * h
    kept = list(range(v.shape[1]))
    if drop_idle:
        limit = IDLE_AXIS * float(v0.abs().max())
        peak = terms[:, :2].transpose(0, 1).flatten(1).amax(1)
        idle = [j for j in (0, 1) if float(peak[j]) <= limit]
        if len(idle) < len(kept):  # keep at least one channel
            kept = [j for j in kept if j not in idle]
    # Rounding V to float32 moves each term by ≤ u·|vj|·h_j; a dropped axis moves z by ≤ |vj|·h_j.
    extra = terms.sum(1) * (2.0 * U32)
    for j in range(v.shape[1]):
        if j not in kept:
            extra = extra + terms[:, j]
    return v0, v[:, kept].float(), _up32((radius[:, 0] + extra) * safety(8) + TINY), kept


def from_centred(v0: torch.Tensor, v: torch.Tensor, r: torch.Tensor, boxes: torch.Tensor,
                 kept: list | None = None, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(v0, V, r) → the engine's float64 (C, R) forms (k components) in absolute θ.

    ``kept``: the coefficient channels V holds (the others are 0: folded into r).
    """
    ac, _, bc, _ = box_view(boxes, v0.ndim)
    if kept is None or len(kept) == k - 1:
        coeff = v.double()
    else:
        coeff = v0.new_zeros((v0.shape[0], k - 1, *v0.shape[1:]))
        coeff[:, kept] = v.double()
    c0 = v0 - coeff[:, 0] * ac - coeff[:, 1] * bc
    return torch.cat([c0[:, None], coeff], 1), r.double()[:, None]


def _linear32(op: LinearOp, v0: torch.Tensor, v: torch.Tensor, r: torch.Tensor,
              m: torch.Tensor | None, h: torch.Tensor) -> tuple:
    n, k = v.shape[:2]
    if op.fan_in == 0:  # moves values only: exact in any precision
        out = op.apply(v.flatten(0, 1))
        return (op.apply(v0), out.view(n, k, *out.shape[1:]), op.apply(r),
                None if m is None else op.apply(m))
    g = gamma(op.fan_in + 1)  # + 1: the weights' own rounding to float32
    if m is None:
        m = _variation(v, h)
    src = m.mul_(g).add_(r)
    v0 = op.apply(v0)
    if op.bias is not None:
        v0 = v0 + op.bias
    out = op.apply(v.flatten(0, 1))
    r = op.apply(src) if op.nonneg else op.apply_abs(src)
    return v0, out.view(n, k, *out.shape[1:]), r.mul_(safety(op.fan_in)).add_(TINY), None


def _affine32(op: AffineOp, v0: torch.Tensor, v: torch.Tensor, r: torch.Tensor,
              m: torch.Tensor | None, h: torch.Tensor) -> tuple:
    scale = torch.as_tensor(op.scale)
    scale32 = scale.float()
    if m is None:
        m = _variation(v, h)
    src = m.mul_(gamma(2)).add_(r)  # the scale's rounding and the product's
    v0 = v0 * scale + op.shift
    return v0, v * scale32, (src * scale32.abs()).mul_(safety(2)).add_(TINY), None


def _relu32(v0: torch.Tensor, v: torch.Tensor, r: torch.Tensor, h: torch.Tensor) -> tuple:
    """The parallel relaxation (see ``propagate._parallel_relu``), all decisions rounded outward.

    The pre-activation range v0 ± (m + r) is evaluated in float32 and widened by everything
    that rounding can hide: v0's own rounding to float32 (≤ u·|v0|), the variation's (≤ 2k
    roundings) and the subtraction's. The slope is rounded up (an upper line steeper than the
    chord through (lo, 0) is still above ReLU on [lo, up]) and capped at 1 (the lower line
    s·z ≤ ReLU(z) needs s ≤ 1); the offset o is rounded up, and centre and radius get the same
    o, so the lower line stays s·(C − R) and the upper one s·(C + R) + 2·o ≥ s·(C + R − lo).
    Returns (v0, V, r, m of the new V, unstable counts).
    """
    k = v.shape[1]
    m = _variation(v, h)
    c32 = v0.float()
    span = (m + r).mul_(1.0 + 4.0 * gamma(2 * k + 4))
    span += c32.abs().mul_(4.0 * U32)
    span += TINY
    lo_neg = (c32 - span).clamp_(max=0.0)
    up_pos = c32.add_(span).clamp_(min=0.0)
    n_unstable = ((lo_neg < 0) & (up_pos > 0)).flatten(1).sum(1)
    s32 = up_pos / (up_pos - lo_neg).clamp_(min=torch.finfo(torch.float32).tiny)
    s32 = s32.mul_(1.0 + 4.0 * U32).clamp_(max=1.0)
    offset = lo_neg.mul_(s32).mul_(-0.5 * (1.0 + 4.0 * U32))
    v0 = torch.addcmul(offset.double(), v0, s32.double())
    v = v * s32[:, None]
    m = m.mul_(s32)  # |vj·s| rounds to within u: the next layer's safety factor covers it
    r = (r * s32).add_(offset).add_(m * gamma(2)).mul_(safety(2)).add_(TINY)
    # The next m: |vj·s| ≤ (1 + u)·s·|vj|, and m itself was rounded (≤ 2k roundings).
    return v0, v, r, m.mul_(1.0 + 2.0 * gamma(2 * k + 2)), n_unstable


def propagate_float32(net: CompiledNetwork, centre: torch.Tensor, radius: torch.Tensor,
                      boxes: torch.Tensor, *, deadline: float | None = None,
                      start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`~usn_perception.bounds.propagate.propagate` (parallel ReLU), mixed precision.

    Takes and returns the engine's float64 forms (C with k >= 3, R with k = 1); the caller
    checks :func:`float32_problem` first. Returns None when a float32 value overflowed (the
    caller falls back to float64 for those sub-boxes).
    """
    k = centre.shape[1]
    v0, v, r, kept = to_centred(centre, radius, boxes, drop_idle=True)
    h = _half_widths(boxes, k, v0.ndim)[:, kept]
    unstable = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
    m = None  # Σ_j |vj|·h_j when the previous op provides it
    with torch.backends.nnpack.flags(enabled=False):  # NNPACK convolutions are Winograd
        for op in net.ops[start:]:
            if deadline is not None and time.perf_counter() > deadline:
                raise BudgetExceeded
            if h.ndim != v.ndim:
                h = _half_widths(boxes, k, v0.ndim)[:, kept]
            if isinstance(op, LinearOp):
                v0, v, r, m = _linear32(op, v0, v, r, m, h)
            elif isinstance(op, AffineOp):
                v0, v, r, m = _affine32(op, v0, v, r, m, h)
            else:
                v0, v, r, m, n = _relu32(v0, v, r, h)
                unstable += n
    if not all_finite(r, v):
        return None
    return (*from_centred(v0, v, r, boxes, kept, k), unstable)
