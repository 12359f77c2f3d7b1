"""Plots for reports: every series drawn raw (thin) with a debiased EMA on top, titled by its metric name."""
from __future__ import annotations

import io
import math
import re

from llmaudit.audit import Series

PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"]


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style debiased exponential moving average (NaNs are skipped, not propagated)."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            last = weight * last + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        out.append(last / norm if norm > 0 else float("nan"))
    return out


def smoothing_weight(n: int) -> float:
    """Heavier smoothing for longer curves: about n/10 points of memory, between 0.5 and 0.95."""
    return min(0.95, max(0.5, 1 - 10 / max(n, 1)))


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "plot"


def group_series(series: dict[str, Series]) -> dict[str, list[Series]]:
    """Series sharing a plot key go on one set of axes, in the order they were recorded."""
    groups: dict[str, list[Series]] = {}
    for s in series.values():
        groups.setdefault(s.plot_key, []).append(s)
    return groups


def focus_limits(members: list[Series]) -> tuple[float, float] | None:
    """Y limits that ignore an early transient (a learning curve starting at -1700 and settling near
    -20 would otherwise hide the difference that matters), or None when the full range reads fine."""
    everything, later = [], []
    for s in members:
        ys = [y for y in s.y if math.isfinite(y)]
        everything += ys
        later += ys[len(ys) // 10:]
    if len(later) < 20:
        return None
    later.sort()
    lo, hi = later[int(0.01 * (len(later) - 1))], later[int(0.99 * (len(later) - 1))]
    full = max(everything) - min(everything)
    if hi <= lo or (hi - lo) > full / 4:
        return None
    pad = 0.15 * (hi - lo)
    return lo - pad, hi + pad


def plot_png(title: str, members: list[Series], *, dpi: int = 110) -> bytes:
    """One figure for one plot key; returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.3), dpi=dpi)
    try:
        for i, s in enumerate(members):
            color = PALETTE[i % len(PALETTE)]
            label = s.name if len(members) > 1 else None
            if s.smooth and len(s.y) >= 5:
                ax.plot(s.x, s.y, color=color, alpha=0.25, linewidth=0.9)
                ax.plot(s.x, ema(s.y, smoothing_weight(len(s.y))), color=color, linewidth=1.8,
                        label=label)
            else:
                marker = "o" if len(s.y) <= 30 else None
                ax.plot(s.x, s.y, color=color, linewidth=1.6, marker=marker, markersize=3.5, label=label)
        limits = focus_limits(members)
        if limits is not None:
            ax.set_ylim(*limits)
            ax.text(0.0, -0.3, "y zoomed past the early transient", transform=ax.transAxes, fontsize=7,
                    color="#6b7280")
        ax.set_title(title, fontsize=10, loc="left", family="monospace")
        ax.set_xlabel(members[0].x_label, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25, linewidth=0.6)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if len(members) > 1:
            ax.legend(fontsize=7.5, frameon=False)
        if any(s.smooth and len(s.y) >= 5 for s in members):
            ax.text(1.0, 1.02, "thin: raw · bold: EMA", transform=ax.transAxes, ha="right", va="bottom",
                    fontsize=7, color="#6b7280")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        return buf.getvalue()
    finally:
        plt.close(fig)
