"""Plots for reports: a series of more than FEW_POINTS points is drawn raw (thin) with a smoothed line
on top (a debiased EMA run forward and then backward, so the line does not lag behind a falling loss);
a shorter one is drawn as it is, a marker on every point.

A plot is one plot key (a series' group, or its name) over every seed of a run. Its title and legend
are in words (a series' ``label``), its y axes carry units (``y_label``), and the metric names are
printed small above it for TRL/verl readers. Curves of one plot with different units never share an
axis: two units give twin axes, more give one panel per unit. Several seeds are drawn seed by seed
(one curve), or as the mean with a min-max band (several curves), and the figure says which.
"""
from __future__ import annotations

import io
import math
import re
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from llmaudit.audit import Series

PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"]
NOTE = "#6b7280"
FEW_POINTS = 30  # a curve this short is drawn as measured, with markers: smoothing ten PPO iterations moved
# the KL of the first rollout, exactly 0, to 0.8 and shaved the peak from 4.5 to 2.6


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style debiased exponential moving average (NaNs are skipped, not propagated)."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            last = weight * last + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        out.append(last / norm if norm > 0 else float("nan"))
    return out


def smooth(values: list[float], weight: float) -> list[float]:
    """The debiased EMA run forward, then backward over its own output: zero lag (as scipy's filtfilt).

    A forward EMA with n points of memory trails a trend by about n points, so a falling loss is drawn
    above its raw points for the whole descent. The backward pass leads by as much, and the two cancel:
    a straight line comes back unchanged away from the ends. A report draws the whole run at once, so
    the future points it reads are there."""
    return ema(ema(values, weight)[::-1], weight)[::-1]


def smoothing_weight(n: int) -> float:
    """Heavier smoothing for longer curves: about n/25 points of memory each way, between 0.5 and 0.95
    (2 to 20 points). Run forward and back, that averages over about twice as many points."""
    return min(0.95, max(0.5, 1 - 25 / max(n, 1)))


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "plot"


def words(name: str) -> str:
    """A metric name in words, for records written before series carried labels: "objective/kl" ->
    "objective kl"."""
    return re.sub(r"[/_]+", " ", name).strip()


def label_of(s: Series) -> str:
    return s.label or words(s.name)


def y_label_of(s: Series) -> str:
    """The y axis of a series; records from before units were recorded share one axis per plot, as then."""
    return s.y_label or words(s.plot_key)


def group_series(series: dict[str, Series]) -> dict[str, list[Series]]:
    """Series sharing a plot key go on one set of axes, in the order they were recorded."""
    groups: dict[str, list[Series]] = {}
    for s in series.values():
        groups.setdefault(s.plot_key, []).append(s)
    return groups


Run = tuple[int | None, list[Series]]  # (seed, the members of one plot key recorded by that seed)


def group_runs(results: Sequence[Any]) -> dict[str, list[Run]]:
    """Plot key -> [(seed, members)] over every seed of a run (AuditResult-like: ``.seed``,
    ``.series``), keys in the order the first seed recorded them."""
    out: dict[str, list[Run]] = {}
    for r in results:
        for key, members in group_series(r.series).items():
            out.setdefault(key, []).append((r.seed, members))
    return out


def plot_title(key: str, members: list[Series]) -> str:
    """The plot's title in words: a member's ``title``, else the one curve's label, else the labels."""
    explicit = next((s.title for s in members if s.title), "")
    if explicit:
        return explicit
    if len(members) == 1:
        return label_of(members[0])
    labels = [label_of(s) for s in members]
    return " vs ".join(labels) if len(labels) <= 3 else words(key)


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


def seed_text(seeds: list[int | None]) -> str:
    known = [s for s in seeds if s is not None]
    if len(known) <= 1:
        return f"seed {known[0]}" if known else ""
    if known == list(range(known[0], known[-1] + 1)):
        return f"seeds {known[0]}-{known[-1]}"
    return "seeds " + ", ".join(map(str, known))


@dataclass
class _Curve:
    """One line to draw: raw points (thin, when smoothed), the bold line, an optional band."""

    x: list[float]
    raw: list[float] | None
    line: list[float]
    band: tuple[list[float], list[float]] | None
    color: str
    label: str | None
    marker: str | None


def _line_of(s: Series) -> tuple[list[float] | None, list[float]]:
    if s.smooth and len(s.y) > FEW_POINTS:
        return s.y, smooth(s.y, smoothing_weight(len(s.y)))
    return None, s.y


def _curves(members: list[str], runs: list[Run], label: dict[str, str], names: list[str]) -> list[_Curve]:
    """What to draw for the members (by name) of one axis over every seed. One curve in the plot:
    every seed drawn and labelled by seed; several curves: per curve, the mean over seeds with a
    min-max band (every seed in one colour where the seeds were sampled at different x)."""
    curves = []
    for name in members:
        per_seed = [(seed, s) for seed, ms in runs for s in ms if s.name == name]
        marker = "o" if max(len(s.y) for _, s in per_seed) <= FEW_POINTS else None
        color = PALETTE[names.index(name) % len(PALETTE)]
        if len(runs) == 1:
            raw, line = _line_of(per_seed[0][1])
            curves.append(_Curve(per_seed[0][1].x, raw, line, None, color, label[name], marker))
        elif len(names) == 1:
            for j, (seed, s) in enumerate(per_seed):
                raw, line = _line_of(s)
                curves.append(_Curve(s.x, raw, line, None, PALETTE[j % len(PALETTE)], f"seed {seed}", marker))
        elif all(s.x == per_seed[0][1].x for _, s in per_seed):
            cols = list(zip(*(s.y for _, s in per_seed)))
            mean = Series(name, per_seed[0][1].x, [_nanmean(c) for c in cols], smooth=per_seed[0][1].smooth)
            raw, line = _line_of(mean)
            band = ([_nanmin(c) for c in cols], [_nanmax(c) for c in cols])
            curves.append(_Curve(mean.x, raw, line, band, color, f"{label[name]} (mean of {len(per_seed)} seeds)",
                                 marker if raw is None else None))
        else:
            for j, (seed, s) in enumerate(per_seed):
                curves.append(_Curve(s.x, None, _line_of(s)[1], None, color,
                                     f"{label[name]} ({len(per_seed)} seeds)" if j == 0 else None, None))
    return curves


def _finite(c: Sequence[float]) -> list[float]:
    return [v for v in c if math.isfinite(v)]


def _nanmean(c: Sequence[float]) -> float:
    f = _finite(c)
    return sum(f) / len(f) if f else float("nan")


def _nanmin(c: Sequence[float]) -> float:
    f = _finite(c)
    return min(f) if f else float("nan")


def _nanmax(c: Sequence[float]) -> float:
    f = _finite(c)
    return max(f) if f else float("nan")


def _bars(ax: Any, s: Series, runs: list[Run]) -> None:
    """A categorical series (``ticks``) as bars: the value per category, the mean over seeds with
    min-max whiskers when there are several."""
    per_seed = [m.y for _, ms in runs for m in ms if m.name == s.name]
    cols = list(zip(*per_seed))
    mean = [_nanmean(c) for c in cols]
    xs = list(range(len(mean)))
    ax.bar(xs, mean, color=PALETTE[0], width=0.65)
    if len(per_seed) > 1:
        ax.errorbar(xs, mean, yerr=[[m - _nanmin(c) for m, c in zip(mean, cols)],
                                    [_nanmax(c) - m for m, c in zip(mean, cols)]],
                    fmt="none", ecolor="#111827", capsize=3, linewidth=1)
    crowded = max(map(len, s.ticks)) * len(s.ticks) > 48
    ax.set_xticks(xs, s.ticks, fontsize=8, rotation=20 if crowded else 0, ha="right" if crowded else "center")


def _style(ax: Any) -> None:
    ax.tick_params(labelsize=8.5)
    ax.grid(alpha=0.25, linewidth=0.6)
    ax.spines["top"].set_visible(False)


def plot_figure(key: str, runs: list[Run]):
    """The matplotlib figure for one plot key over every seed; the caller closes it."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    first = runs[0][1]
    names = list(dict.fromkeys(s.name for _, ms in runs for s in ms))
    by_name = {s.name: s for _, ms in reversed(runs) for s in ms}
    label = {n: label_of(by_name[n]) for n in names}
    units = list(dict.fromkeys(y_label_of(by_name[n]) for n in names))
    panels = 1 if len(units) <= 2 else len(units)
    fig, axes = plt.subplots(panels, 1, figsize=(6.4, 3.5 if panels == 1 else 1.2 + 1.9 * panels), dpi=110,
                             sharex=True, squeeze=False)
    axes = [row[0] for row in axes]
    if len(units) == 2:
        axes.append(axes[0].twinx())
    on_axis = dict(zip(units, axes))
    smoothed = zoomed = False
    handles: dict[Any, list] = {}
    for unit, ax in on_axis.items():
        members = [n for n in names if y_label_of(by_name[n]) == unit]
        if by_name[members[0]].ticks:
            _bars(ax, by_name[members[0]], runs)
            ax.set_ylabel(unit, fontsize=9)
            _style(ax)
            ax.spines["right"].set_visible(False)
            continue
        curves = _curves(members, runs, label, names)
        for c in curves:
            if c.raw is not None:
                ax.plot(c.x, c.raw, color=c.color, alpha=0.25, linewidth=0.9)
                smoothed = True
            if c.band is not None:
                ax.fill_between(c.x, *c.band, color=c.color, alpha=0.15, linewidth=0)
            h, = ax.plot(c.x, c.line, color=c.color, linewidth=1.8 if c.raw is not None else 1.6,
                         marker=c.marker if c.raw is None else None, markersize=3.5, label=c.label)
            if c.label:
                handles.setdefault(ax if panels > 1 else axes[0], []).append(h)
        limits = focus_limits([s for _, ms in runs for s in ms if s.name in members])
        if limits is not None:
            ax.set_ylim(*limits)
            zoomed = True
        twin_colour = len(units) == 2 and len(members) == 1
        wrapped = unit if len(unit) <= (40 if panels == 1 else 26) else unit.replace(" (", "\n(", 1)
        ax.set_ylabel(wrapped, fontsize=9, color=curves[0].color if twin_colour else "black")
        _style(ax)
        if len(units) != 2:
            ax.spines["right"].set_visible(False)
    axes[panels - 1].set_xlabel(first[0].x_label, fontsize=9)
    steps = [v for _, ms in runs for s in ms if s.name in names and not s.ticks for v in s.x]
    if steps and all(float(v).is_integer() for v in steps):  # steps, iterations, epochs: no "2.5" ticks
        from matplotlib.ticker import MaxNLocator

        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, hs in handles.items():  # a lone curve of a lone seed is named by the title instead
        if len(hs) > 1 or panels > 1:
            ax.legend(handles=hs, labels=[h.get_label() for h in hs], fontsize=8, frameon=False)
    title = plot_title(key, first)
    title = title[:1].upper() + title[1:]
    if len(runs) > 1:
        title += f" ({seed_text([seed for seed, _ in runs])})"
    axes[0].set_title(title, fontsize=10.5, loc="left")
    notes = []
    if smoothed:
        notes.append("thin: raw · bold: smoothed (EMA forward and back, no lag)")
    if len(runs) > 1 and len(label) > 1:
        notes.append(f"line: mean over {len(runs)} seeds · band: min to max")
    if len(runs) > 1 and first[0].ticks:
        notes.append(f"bar: mean over {len(runs)} seeds · whisker: min to max")
    if zoomed:
        notes.append("y zoomed past the early transient")
    fig.tight_layout()
    height = fig.get_figheight()
    fig.subplots_adjust(bottom=fig.subplotpars.bottom + (0.3 if notes else 0.15) / height)  # room for the notes
    metrics = ", ".join(names)
    if len(metrics) > 95:
        metrics = f"{key} ({len(names)} metrics: {names[0]}, ...)"
    fig.text(0.01, 0.02 / height, metrics, fontsize=7, color=NOTE, ha="left", va="bottom", family="monospace")
    if notes:
        fig.text(0.01, 0.17 / height, " · ".join(notes), fontsize=7.5, color=NOTE, ha="left", va="bottom")
    return fig


def plot_png(key: str, runs: list[Run] | list[Series], *, dpi: int = 110) -> bytes:
    """One figure for one plot key, as PNG bytes. ``runs`` is [(seed, members)] over seeds, or the
    members of a single run."""
    import matplotlib.pyplot as plt

    if runs and isinstance(runs[0], Series):
        runs = [(None, list(runs))]
    fig = plot_figure(key, runs)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
        return buf.getvalue()
    finally:
        plt.close(fig)


def bar_png(title: str, labels: list[str], values: list[float], *, x_label: str, y_label: str,
            y_max: float | None = None, dpi: int = 110) -> bytes:
    """A bar chart (reviews per date, mastery per roadmap day) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.3), dpi=dpi)
    try:
        ax.bar(range(len(values)), values, color=PALETTE[0], width=0.7)
        crowded = len(values) * max(map(len, labels)) > 60
        ax.set_xticks(range(len(values)), labels, fontsize=8, rotation=45 if crowded else 0,
                      ha="right" if crowded else "center")
        if y_max is not None:
            ax.set_ylim(0, y_max)
        ax.set_title(title, fontsize=10.5, loc="left")
        ax.set_xlabel(x_label, fontsize=9)
        ax.set_ylabel(y_label, fontsize=9)
        _style(ax)
        ax.spines["right"].set_visible(False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        return buf.getvalue()
    finally:
        plt.close(fig)


def _gantt(ax: Any, columns: list[str], rows: list[list[Any]]) -> None:
    """One row per stage (stage 0 on top), one unit slot per column: forward slots blue, backward
    orange, each marked with its micro-batch; idle slots stay blank (the bubble)."""
    colours = {"F": PALETTE[0], "B": PALETTE[3]}
    for y, row in enumerate(rows):
        for t, cell in enumerate(row[1:]):
            text = str(cell)
            if text[:1] in colours and text[1:].isdigit():
                ax.broken_barh([(t, 1)], (y - 0.4, 0.8), facecolors=colours[text[0]], edgecolor="white")
                ax.text(t + 0.5, y, text[1:], ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(rows)), [str(r[0]) for r in rows], fontsize=8.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, len(columns) - 1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("time slot (one forward or backward of one micro-batch)", fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=PALETTE[0], label="forward (micro-batch i)"),
                       Patch(color=PALETTE[3], label="backward (micro-batch i)"),
                       Patch(facecolor="white", edgecolor=NOTE, label="idle (bubble)")],
              fontsize=7.5, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)


def _heatmap(fig: Any, ax: Any, columns: list[str], rows: list[list[Any]]) -> None:
    """Numbers as colour, each cell labelled with its value; the row labels down the side."""
    values = [[float(v) for v in row[1:]] for row in rows]
    image = ax.imshow(values, cmap="viridis", aspect="equal")
    top = max(max(r) for r in values)
    for y, row in enumerate(values):
        for x, v in enumerate(row):
            ax.text(x, y, f"{v:g}", ha="center", va="center", fontsize=8.5,
                    color="black" if v > 0.6 * top else "white")
    ax.set_xticks(range(len(columns) - 1), columns[1:], fontsize=8.5)
    ax.set_yticks(range(len(rows)), [str(r[0]) for r in rows], fontsize=8.5)
    fig.colorbar(image, ax=ax, shrink=0.85).ax.tick_params(labelsize=8)


def table_png(name: str, table: dict[str, Any], *, dpi: int = 110) -> bytes:
    """A table recorded with ``draw`` ("gantt" or "heatmap", see Context.table) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    columns, rows, how = table["columns"], table["rows"], table["draw"]
    if how == "gantt":
        fig, ax = plt.subplots(figsize=(min(2.0 + 0.32 * len(columns), 11.0), 0.9 + 0.45 * len(rows)), dpi=dpi)
        _gantt(ax, columns, rows)
    elif how == "heatmap":
        fig, ax = plt.subplots(figsize=(1.8 + 0.9 * len(columns), 0.9 + 0.75 * len(rows)), dpi=dpi)
        _heatmap(fig, ax, columns, rows)
    else:
        raise ValueError(f"table {name!r}: cannot draw {how!r}")
    try:
        fig.suptitle(textwrap.fill(name, 60 if how == "heatmap" else 100), x=0.02, ha="left", fontsize=9.5)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})  # the legend outside too
        return buf.getvalue()
    finally:
        plt.close(fig)


def run_plots(results: Sequence[Any], *, dpi: int = 110) -> list[tuple[str, str, bytes]]:
    """(title, file name, PNG) for every plot key of a run, each drawn over every seed; the title is
    the plot's words and its key ("KL to the SFT policy · objective/kl", the alt text of the image)."""
    out = []
    for key, runs in group_runs(results).items():
        title = f"{plot_title(key, runs[0][1])} · {key}"
        out.append((title, f"plot-{slug(key)}.png", plot_png(key, runs, dpi=dpi)))
    return out


MIN_DAYS = 2  # reviews per day are drawn from this many distinct study days on


def progress_plots(progress: Any, draw: Callable[[str, Any, Callable[[], bytes]], bytes] | None = None
                   ) -> list[tuple[str, str, bytes]]:
    """(title, file name, PNG) for the progress page: reviews per study day once there are at least
    MIN_DAYS of them, and mastery per roadmap day once anything was reviewed; nothing before.
    ``draw(name, data, make)`` returns the PNG (a cache keyed by the data may skip ``make``)."""
    from datetime import date, timedelta

    draw = draw or (lambda name, data, make: make())
    plots = []
    if len(progress.per_date) >= MIN_DAYS:
        first, last = (date.fromisoformat(d) for d in (min(progress.per_date), max(progress.per_date)))
        first = max(first, last - timedelta(days=59))  # the last 60 days, days without reviews included
        dates = [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
        counts = [float(progress.per_date.get(d, 0)) for d in dates]
        plots.append(("reviews per day", "reviews.png", draw("reviews", [dates, counts], lambda: bar_png(
            "Reviews per day", [d[5:] for d in dates], counts, x_label=f"date (month-day, {dates[0][:4]})",
            y_label="reviews (answers)"))))
    if progress.reviews:
        days, mastery = [str(d.day) for d in progress.days], [100 * d.mastery for d in progress.days]
        plots.append(("mastery per roadmap day", "mastery.png", draw("mastery", [days, mastery], lambda: bar_png(
            "Mastery per roadmap day", days, mastery, x_label="roadmap day",
            y_label="mastered (% of the day's items)", y_max=100))))
    return plots
