"""Every plot of every module reads on its own: a title, both axes labelled with words, a legend in
words (never a metric key such as ``rm/loss``) wherever an axis holds several curves, one unit per
axis, every seed of a multi-seed run drawn and said so, and one key curve per module for its brief."""
from __future__ import annotations

import re

import matplotlib
import pytest
from conftest import audit_once

from llmaudit.audit import AuditResult, Series
from llmaudit.registry import all_audits
from llmaudit.report.plots import FEW_POINTS, group_runs, plot_figure, y_label_of

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402

MODULES = [s.name for s in all_audits()]


def is_words(text: str) -> bool:
    """Text a reader can read: some letters, and no '/' or '_' outside $mathtext$ (where they are
    a fraction or a subscript), so no metric key like ``objective/kl`` or ``reward_std``."""
    plain = re.sub(r"\$[^$]*\$", " ", text)
    return bool(re.search(r"[A-Za-z\u4e00-\u9fff]", text)) and "/" not in plain and "_" not in plain


def figure_problems(fig) -> list[str]:
    """What a reader of this figure would miss; empty for a good figure."""
    problems = []
    axes = fig.axes
    title = axes[0].get_title(loc="left")
    if not is_words(title):
        problems.append(f"title {title!r} is not words")
    labelled_x = [ax for ax in axes if ax.get_xlabel().strip()]
    for ax in axes:
        y = ax.get_ylabel()
        if not y.strip() or not is_words(y):
            problems.append(f"y axis label {y!r} is missing or not words")
        if not any(ax is other or ax in other.get_shared_x_axes().get_siblings(other) for other in labelled_x):
            problems.append("an x axis has no label")
    for ax in axes:  # named categories (bars) are words too
        for tick in ax.get_xticklabels():
            if re.search(r"[A-Za-z]", tick.get_text()) and not is_words(tick.get_text()):
                problems.append(f"x tick {tick.get_text()!r} is not words")
    for x in labelled_x:
        if not is_words(x.get_xlabel()):
            problems.append(f"x axis label {x.get_xlabel()!r} is not words")
    in_legends = set()
    for ax in axes:
        legend = ax.get_legend()
        if legend is not None:
            for text in legend.get_texts():
                in_legends.add(text.get_text())
                if not is_words(text.get_text()):
                    problems.append(f"legend entry {text.get_text()!r} is not words")
    named = [line.get_label() for ax in axes for line in ax.get_lines() if not line.get_label().startswith("_")]
    if len(named) > 1:
        problems += [f"curve {n!r} is in no legend" for n in named if n not in in_legends]
    return problems


def problems_of(result: AuditResult | list[AuditResult]) -> list[str]:
    results = result if isinstance(result, list) else [result]
    out = []
    for r in results:  # the record itself names every curve and its unit (old records fall back to keys)
        out += [f"{s.name}: no label in words" for s in r.series.values() if not is_words(s.label)]
        out += [f"{s.name}: no y axis label with a unit" for s in r.series.values() if not is_words(s.y_label)]
    for key, runs in group_runs(results).items():
        fig = plot_figure(key, runs)
        try:
            out += [f"{key}: {p}" for p in figure_problems(fig)]
            units = {y_label_of(s) for _, members in runs for s in members}
            if len(fig.axes) != len(units):
                out.append(f"{key}: {len(units)} units ({sorted(units)}) on {len(fig.axes)} y axes")
            if len(results) > 1 and "seed" not in fig.axes[0].get_title(loc="left"):
                out.append(f"{key}: a {len(results)}-seed plot whose title does not name the seeds")
        finally:
            plt.close(fig)
    return out


def fake_result(seed: int, series: list[Series]) -> AuditResult:
    return AuditResult(module="fake", seed=seed, mode="toy", series={s.name: s for s in series})


def test_the_checker_flags_metric_keys_and_missing_units():
    """The rule below can fail: series recorded the old way (no words, no units) are flagged."""
    bare = [Series("objective/scores", [0, 1, 2], [0.1, 0.5, 0.9], group="g"),
            Series("objective/gold_reward", [0, 1, 2], [1.0, 2.0, 1.5], group="g"),
            Series("rm/loss", [0, 1, 2], [0.7, 0.6, 0.5], x_label="")]
    found = problems_of(fake_result(0, bare))
    assert "objective/gold_reward: no label in words" in found, found
    assert "rm/loss: no y axis label with a unit" in found, found
    assert any("x axis has no label" in p for p in found), found
    assert not is_words("hacking/proxy_score") and not is_words("reward_std") and is_words(r"ratio $\pi/\pi_{old}$")


def test_different_units_get_different_axes_and_seeds_are_named():
    members = lambda seed: [  # noqa: E731
        Series("hacking/proxy_score", [0, 1, 2, 3], [1.0, 5.0, 9.0, 14.0 + seed], group="hack", label="proxy score",
               y_label="proxy score (points)", smooth=False),
        Series("hacking/gold_reward", [0, 1, 2, 3], [2.0, 3.0, 1.0, 0.2], group="hack", label="gold reward",
               y_label="gold reward (targets per answer)", smooth=False),
        Series("hacking/kl", [0, 1, 2, 3], [0.0, 4.0, 9.0, 18.0], group="hack", label="KL to the SFT policy",
               y_label="KL per answer (nats)", smooth=False)]
    results = [fake_result(seed, members(seed)) for seed in (0, 1, 2)]
    assert problems_of(results) == []
    (key, runs), = group_runs(results).items()
    fig = plot_figure(key, runs)
    try:
        assert sorted(ax.get_ylabel().replace("\n", " ") for ax in fig.axes) == sorted(s.y_label for s in members(0))
        assert "seeds 0-2" in fig.axes[0].get_title(loc="left")
        legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        assert "proxy score (mean of 3 seeds)" in legends, legends
        gold_axis = next(ax for ax in fig.axes if ax.get_ylabel().startswith("gold"))
        lo, hi = gold_axis.get_ylim()
        assert hi - lo < 4, "the gold reward's rise and fall must fill its own axis, not share the KL's 0-18"
    finally:
        plt.close(fig)


def test_a_short_curve_is_drawn_as_measured_and_a_long_one_smoothed():
    """Ten PPO iterations smoothed put the first rollout's KL, exactly 0, at 0.8: a short curve is drawn
    point for point (with markers); only a long one gets a smoothed bold line over its thin raw one."""
    def lines(n):
        ys = [0.0] + [1.0 + (i % 3) for i in range(1, n)]
        result = fake_result(0, [Series("objective/kl", list(range(n)), ys, label="KL to the SFT policy",
                                        y_label="KL per answer (nats)", smooth=True)])
        (key, runs), = group_runs([result]).items()
        fig = plot_figure(key, runs)
        try:
            return ys, [(list(line.get_ydata()), line.get_marker()) for line in fig.axes[0].get_lines()]
        finally:
            plt.close(fig)

    ys, drawn = lines(FEW_POINTS)
    assert drawn == [(ys, "o")]
    ys, drawn = lines(FEW_POINTS + 1)
    (raw, _), (bold, marker) = drawn
    assert raw == ys and bold != ys and marker in ("None", "", None)


def test_integer_steps_get_integer_ticks():
    """Twenty GRPO steps were labelled 0, 2.5, 5, 7.5 ...: an axis of whole steps shows whole numbers."""
    result = fake_result(0, [Series("loss", list(range(20)), [float(i % 4) for i in range(20)], label="loss",
                                    y_label="loss (nats)", smooth=False)])
    (key, runs), = group_runs([result]).items()
    fig = plot_figure(key, runs)
    try:
        fig.canvas.draw()
        ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t <= fig.axes[0].get_xlim()[1]]
        assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


def test_categories_are_bars_named_in_words():
    results = [fake_result(s, [Series("variance/trace_cov", [0, 1, 2], [3.0 + s, 0.6, 0.5], smooth=False,
                                      label="gradient variance per estimator", y_label="tr Cov",
                                      x_label="estimator", ticks=["no baseline", "RLOO", "no_baseline"])])
               for s in (0, 1)]
    assert any("x tick 'no_baseline' is not words" in p for p in problems_of(results))
    (key, runs), = group_runs(results).items()
    fig = plot_figure(key, runs)
    try:
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["no baseline", "RLOO", "no_baseline"]
        assert len(fig.axes[0].patches) == 3 and fig.axes[0].patches[0].get_height() == 3.5  # the mean of seeds
    finally:
        plt.close(fig)


def test_a_lone_curve_over_seeds_draws_every_seed_labelled():
    results = [fake_result(s, [Series("eval/accuracy", [0, 1, 2], [0.1, 0.4 + s / 10, 0.8], label="accuracy",
                                      y_label="accuracy (fraction)", smooth=False)]) for s in (3, 5)]
    (key, runs), = group_runs(results).items()
    fig = plot_figure(key, runs)
    try:
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert legend == ["seed 3", "seed 5"]
        assert "seeds 3, 5" in fig.axes[0].get_title(loc="left")
    finally:
        plt.close(fig)


@pytest.mark.parametrize("module", MODULES)
def test_every_plot_of_every_module_reads_on_its_own(module):
    result = audit_once(module, "toy", 0)
    assert result.error is None, result.error
    assert problems_of(result) == []
    if result.series:
        keys = [s.name for s in result.series.values() if s.key]
        assert len(keys) == 1, f"{module} marks {keys or 'no series'} as the key curve of its brief (want one)"
        if module in ("ppo", "rlhf"):  # the brief's curve of PPO is the policy's reward, not the RM's loss
            assert keys[0].startswith(("objective/", "policy/")), keys


def test_the_brief_shows_the_marked_key_curve_over_every_seed():
    from llmaudit.learn.brief import key_plot
    from llmaudit.record import RunRecord

    def result(seed):
        return fake_result(seed, [
            Series("rm/loss", [0, 1, 2], [0.7, 0.6, 0.5], label="reward-model loss", y_label="loss (nats)"),
            Series("charts/episodic_return", [0, 1, 2], [1, 2, 3], label="return", y_label="return"),
            Series("objective/scores", [0, 1, 2], [0.1, 0.5, 0.9 + seed], label="reward-model score",
                   y_label="RM score (logits)", key=True)])
    record = RunRecord("fake", "Fake", 7, "full", [0, 1], {}, {}, {}, [result(0), result(1)])
    title, png = key_plot(record)
    assert title == "reward-model score" and png.startswith(b"\x89PNG")
    record.results = [fake_result(0, [s for s in result(0).series.values() if not s.key])]
    assert key_plot(record)[0] == "return"  # unmarked: a closed-loop chart, as before


def _progress(per_date: dict[str, int]):
    from llmaudit.learn.progress import DayProgress, Progress

    days = [DayProgress(d, f"day {d}", 10, 5 if d == 4 else 0, 3 if d == 4 else 0, 0) for d in range(1, 17)]
    return Progress(streak=len(per_date), reviews=sum(per_date.values()), reviews_today=0, retention=None,
                    days=days, per_date=per_date)


def test_progress_page_draws_reviews_per_day_only_from_two_days_on(tmp_path):
    from llmaudit.report.plots import progress_plots
    from llmaudit.report.render import render_progress

    one_day = _progress({"2026-12-01": 23})
    assert [t for t, _, _ in progress_plots(one_day)] == ["mastery per roadmap day"]
    page = render_progress(one_day, tmp_path).read_text()
    assert "Reviews per day are drawn once you have studied on two different days" in page
    assert page.count("<img") == 1

    two_days = _progress({"2026-12-01": 23, "2026-12-03": 7})
    assert [t for t, _, _ in progress_plots(two_days)] == ["reviews per day", "mastery per roadmap day"]
    page = render_progress(two_days, tmp_path).read_text()
    assert "two different days" not in page and page.count("<img") == 2

    assert progress_plots(_progress({})) == []
    assert "No reviews yet" in render_progress(_progress({}), tmp_path).read_text()
