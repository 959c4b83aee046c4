"""The value axes of the figures: ranges set by the means, intervals clipped at the frame
and marked where they are.

With two or three seeds a 95% interval can be wider than every difference between the
means: an axis scaled to the intervals (matplotlib's autoscale) runs 0-100% and flattens
the means onto one line. So the means set the range (with a margin), an error bar that
runs past it stops at the frame, and a small triangle on the frame, its tip on the
frame, says that the interval goes on beyond it. A band (training curves) is cut at the
range the curves set.

An error axis may be logarithmic (``normbench plot --log-error``): it spreads small
errors (1% against 2%) that a linear axis set by a 30% error puts on one line. A mean
of 0% error has no place on it and is left out of the range.

matplotlib is imported inside the functions, as in :mod:`normbench.views.figures`.
"""

from __future__ import annotations

import numpy as np

#: The margin around the means: this share of their span, at least ``MIN_PAD`` points
#: (linear) or the factor ``MIN_FACTOR`` (logarithmic), so that one point or equal means
#: still get a range.
PAD = 0.12
MIN_PAD = 0.5
MIN_FACTOR = 1.15

#: The gid of the marks of a clipped interval: the upper end (a triangle pointing up at
#: the top of the frame) and the lower one.
CLIPPED_HIGH = "clipped-high"
CLIPPED_LOW = "clipped-low"

_MARK_SIZE = 5.5  # points


def mean_range(
    means,
    *,
    log: bool = False,
    bounds: tuple[float, float] = (0.0, 100.0),
    headroom: float = 0.0,
) -> tuple[float, float] | None:
    """The value range of an axis that shows ``means`` (a percentage): their span with a
    margin (``PAD``), within ``bounds``; on a log axis the margin is a factor and only
    positive means count. ``headroom``: a further share of the range above, for marks
    drawn at the top. None when no mean can be shown (the caller keeps its default)."""
    values = np.asarray(means, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if log:
        values = values[values > 0]
    if not len(values):
        return None
    low, high = float(values.min()), float(values.max())
    if log:
        factor = max((high / low) ** PAD, MIN_FACTOR)
        bottom, top = low / factor, high * factor
        top *= (top / bottom) ** headroom
    else:
        pad = max(PAD * (high - low), MIN_PAD)
        bottom, top = low - pad, high + pad
        top += headroom * (top - bottom)
    return max(bottom, bounds[0]), min(top, bounds[1])


def clip_bars(mean, half, limits: tuple[float, float] | None):
    """Error bars of ``mean ± half`` stopped at ``limits``: ``(yerr, low, high)``, with
    ``yerr`` the (below, above) lengths matplotlib's ``errorbar`` takes and ``low``,
    ``high`` the points whose interval ran past the lower or the upper limit. NaN
    half-widths (one seed) stay NaN: no bar. ``limits`` None: nothing is clipped."""
    mean = np.asarray(mean, dtype=float)
    half = np.asarray(half, dtype=float)
    if limits is None:
        limits = (-np.inf, np.inf)
    bottom, top = limits
    with np.errstate(invalid="ignore"):
        below = np.clip(np.minimum(half, mean - bottom), 0.0, None)
        above = np.clip(np.minimum(half, top - mean), 0.0, None)
        low = np.isfinite(half) & (mean - half < bottom)
        high = np.isfinite(half) & (mean + half > top)
    below[~np.isfinite(half)] = np.nan
    above[~np.isfinite(half)] = np.nan
    return np.vstack([below, above]), low, high


def _triangle(up: bool):
    """A filled triangle whose tip is the marker's point: it sits inside the frame, its
    tip on it."""
    from matplotlib.path import Path

    sign = 1.0 if up else -1.0
    return Path([(-1.0, -1.6 * sign), (0.0, 0.0), (1.0, -1.6 * sign), (-1.0, -1.6 * sign)])


def mark_clipped(ax, x, low, high, color: str) -> None:
    """Triangles on the frame of ``ax`` at ``x`` where an interval was clipped: pointing
    up at the top (``high``), down at the bottom (``low``). Placed in axes coordinates
    (y = 1 or 0), so that they stay on the frame whatever the scale."""
    from matplotlib.transforms import blended_transform_factory

    frame = blended_transform_factory(ax.transData, ax.transAxes)
    x = np.asarray(x, dtype=float)
    for mask, y, up, gid in ((high, 1.0, True, CLIPPED_HIGH), (low, 0.0, False, CLIPPED_LOW)):
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            continue
        (line,) = ax.plot(
            x[mask], np.full(int(mask.sum()), y), marker=_triangle(up), markersize=_MARK_SIZE,
            color=color, linestyle="none", transform=frame, clip_on=False, zorder=4,
        )  # fmt: skip
        line.set_gid(gid)


def clipped_errorbar(ax, x, mean, half, limits, **style):
    """``ax.errorbar`` of ``mean ± half`` with the bars stopped at ``limits`` and their
    clipped ends marked (:func:`mark_clipped`). Returns the ErrorbarContainer and
    whether any bar was clipped."""
    yerr, low, high = clip_bars(mean, half, limits)
    bars = ax.errorbar(x, mean, yerr=yerr, **style)
    mark_clipped(ax, x, low, high, style.get("color", "0.2"))
    return bars, bool(low.any() or high.any())


def set_value_axis(ax, limits: tuple[float, float] | None, log: bool = False) -> None:
    """The y axis of ``ax``: logarithmic or not, with ``limits`` (None: left as it is)."""
    if log:
        ax.set_yscale("log")
        # matplotlib's choice of which ticks to label (minor ones too, on a range of less
        # than a decade or two), written as plain numbers: 0.6, not 6e-01
        ax.yaxis.set_major_formatter(_plain_log(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(_plain_log(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    if limits is not None:
        ax.set_ylim(*limits)


def _plain_log(**options):
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            return f"{x:g}"

    return PlainLog(**options)


def clip_band(low, high, limits: tuple[float, float] | None):
    """A band's edges cut at ``limits``, and whether any part of it was."""
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    if limits is None:
        return low, high, False
    with np.errstate(invalid="ignore"):
        cut = bool(((low < limits[0]) | (high > limits[1])).any())
    return np.clip(low, *limits), np.clip(high, *limits), cut


def batch_size_axis(ax, sizes) -> None:
    """The x axis of batch sizes: log2, ticked at the sizes run, written as integers."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
    ax.xaxis.set_minor_locator(NullLocator())
