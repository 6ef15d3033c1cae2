"""``~/photometric_interval``: the θ box of a frame as a ``geometry_msgs/PolygonStamped``.

The box Θ = [α_lo, α_hi] × [β_lo, β_hi] is a rectangle in the (α, β) plane, so it goes out as
its four corners, counter-clockwise from (α_lo, β_lo): x = α (contrast gain), y = β
(brightness offset), z = 0. The header is the input image's, so the box can be matched to the
keypoints it certifies. Polygon points are float32; the estimator rounds Θ outward to
float32-representable ends *before* certifying, so the published box is exactly the one the
certificates hold for.
"""

from __future__ import annotations

from geometry_msgs.msg import Point32, PolygonStamped


def interval_to_polygon(alpha: tuple[float, float], beta: tuple[float, float],
                        header=None) -> PolygonStamped:
    """The 4-corner polygon of the box ``alpha`` × ``beta``."""
    msg = PolygonStamped()
    if header is not None:
        msg.header = header
    (a0, a1), (b0, b1) = alpha, beta
    msg.polygon.points = [Point32(x=float(a), y=float(b), z=0.0)
                          for a, b in ((a0, b0), (a1, b0), (a1, b1), (a0, b1))]
    return msg


def polygon_to_interval(msg: PolygonStamped) -> tuple[tuple[float, float], tuple[float, float]]:
    """((α_lo, α_hi), (β_lo, β_hi)) from a polygon message (its bounding box)."""
    pts = msg.polygon.points
    if not pts:
        raise ValueError('empty photometric interval polygon')
    xs = [float(p.x) for p in pts]
    ys = [float(p.y) for p in pts]
    return (min(xs), max(xs)), (min(ys), max(ys))
