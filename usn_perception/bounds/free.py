"""Free sub-boxes: no pixel is clipped, so the heatmaps are the nominal ones.

On a (τ, κ) sub-box where no present pixel value is clipped
(:func:`~usn_perception.bounds.thresholds.free_mask`), every network input is
``u_q(τ) = Σ_m w_qm·(v_m − τ) = u_q(0) − τ·S_q`` with ``S_q = Σ_m w_qm ≈ 1`` the resize
weights' sum. The linear prefix P (input normalisation and first convolution, no bias) maps
it to ``P(u(0)) − τ·P(S)``, and a zero-sum first filter with replicate padding makes ``P(S)``
vanish up to rounding: the heatmaps barely move. The rest of the network N (ReLU, linear maps
and scales without bias) is 1-Lipschitz elementwise through |N| (|W| for W, identity for
ReLU), so for every τ in the sub-box

    |logits(τ) − logits(0)| ≤ |τ|·R,   R = |N|(|P(S)|),

where ``logits(0)`` are the heatmaps ``Detector.run`` computes on the unperturbed frame. A free
sub-box is therefore bounded by constant forms (the nominal logits) with radius |τ|max·R and
no propagation at all. R is computed once per network and frame shape; on the shipped models
it is ~2e-10 per unit τ against logits of ~0.1–0.3 (docs/certification.md, "Free
sub-boxes"). A first filter that does not sum to zero only makes R large (the bound stays
sound, and loose).
"""

from __future__ import annotations

import torch

from usn_perception.bounds.inputs import ImageEncoding
from usn_perception.bounds.layers import AffineOp, CompiledNetwork, LinearOp
from usn_perception.bounds.prefix import linear_prefix
from usn_perception.bounds.rounding import U64, gamma

#: Frame shapes whose radius is kept per network (like the resize plans themselves).
MEMO_SHAPES = 8
#: Lifts a float64 sum of non-negative terms above its exact value (generous: ~1e3 ops deep).
SAFETY = 1.0 + 1e-9


def _abs_chain(ops: list, x: torch.Tensor) -> torch.Tensor:
    """|ops|(x) for x ≥ 0: |W| for linear maps, |scale| for affine ones, identity for ReLU."""
    for op in ops:
        if isinstance(op, LinearOp):
            x = op.apply(x) if op.nonneg else op.apply_abs(x)
        elif isinstance(op, AffineOp):
            x = x * torch.as_tensor(op.scale).abs()
    return x


def free_radius(net: CompiledNetwork, enc: ImageEncoding) -> torch.Tensor:
    """(K, Hh·Wh) float64 R ≥ 0: logits on a free sub-box move by at most |τ|·R from nominal.

    Rounding is accounted for: ``S`` is bounded by ``1 ± ε_S`` from the float64 row sums of
    the resize weights, the computed ``P(1)`` by its dot-product error, and the |N| chain (all
    terms non-negative) by a relative safety factor.
    """
    # The resize weights are shared per frame shape (inputs._gather_plan): the memo keeps a
    # reference to them, so their id cannot be reused while the entry lives.
    key = ('free_radius', id(enc.weights), tuple(enc.weights.shape), tuple(enc.shape))
    hit = net.memo.get(key)
    if hit is not None and hit[0] is enc.weights:
        return hit[1]
    rows = enc.weights.sum(1)
    eps_s = float((rows - 1.0).abs().max()) + gamma(enc.weights.shape[1], U64) * float(rows.max())
    n_pre = linear_prefix(net)
    prefix, rest = net.ops[:n_pre], net.ops[n_pre:]
    ones = torch.ones((1, *enc.shape), dtype=torch.float64, device=enc.device)
    signed = ones
    err = 0.0  # relative error of the computed P(1), as a multiple of |P|(1)
    for op in prefix:
        if isinstance(op, LinearOp):
            signed = op.apply(signed)
            err += gamma(op.fan_in + 1, U64)
        elif isinstance(op, AffineOp):
            signed = signed * op.scale
            err += gamma(1, U64)
    magnitude = _abs_chain(prefix, ones) * SAFETY
    dev = signed.abs() + magnitude * (eps_s + 2.0 * err)
    radius = (_abs_chain(rest, dev * SAFETY) * SAFETY).flatten(2)[0] + 1e-300
    stale = [k for k in net.memo if k[0] == 'free_radius']
    for k in stale[:max(0, len(stale) - MEMO_SHAPES + 1)]:  # oldest first (insertion order)
        del net.memo[k]
    net.memo[key] = (enc.weights, radius)
    return radius


def free_forms(logits: torch.Tensor, boxes: torch.Tensor,
               radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant forms for free (τ, κ) sub-boxes ``boxes`` (n, 4): (n, 3, K, P) and (n, 1, K, P).

    ``logits`` (K, Hh, Wh) are the nominal heatmaps, ``radius`` :func:`free_radius`.
    """
    n = boxes.shape[0]
    centre = torch.zeros((n, 3, *radius.shape), dtype=torch.float64, device=radius.device)
    centre[:, 0] = logits.reshape(radius.shape).to(centre)
    return centre, tau_reach(boxes, radius)[:, None]


def tau_reach(boxes: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """(n, K, P) bound |τ|max·R of how far τ alone moves the logits on each (τ, κ) box.

    The input ``clip(x, τ, κ) − τ`` differs from ``clip(x, τ, κ)`` by the constant − τ, whose
    effect on the logits this bounds: :func:`free_forms` (where nothing clips) and the level
    nodes (:mod:`usn_perception.bounds.levels`, run without the − τ) both use it.
    """
    tau = torch.maximum(boxes[:, 0].abs(), boxes[:, 1].abs()).view(-1, 1, 1)
    return tau * radius * SAFETY
