"""Reports: Markdown with PNGs beside it, self-contained HTML, the index, EMA smoothing."""
from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmaudit.report.plots import ema, smooth
from llmaudit.report.render import render_index, render_smoke, save_and_render
from llmaudit.runner import run_audit


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    reports = tmp_path_factory.mktemp("reports")
    rec = run_audit("mdp", mode="toy", seeds=[0, 1])
    return reports, rec, save_and_render(rec, reports)


def test_markdown_images_exist_beside_it(rendered):
    _, rec, paths = rendered
    md = paths["markdown"].read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert any(i.endswith(".png") for i in images) and any(i.endswith(".svg") for i in images)
    for image in images:
        assert (paths["markdown"].parent / image).is_file(), image
    for c in rec.checks:
        assert f"`{c.name}`" in md
    assert "vi/sup_norm_change_log10" in md


def test_html_is_self_contained_with_inline_plots(rendered):
    _, rec, paths = rendered
    html = paths["html"].read_text()
    n_plots = len({s.plot_key for s in rec.results[0].series.values()})
    assert html.count('src="data:image/png;base64,') == n_plots
    assert html.count("<svg") >= len(rec.formulas)
    assert not re.search(r'(src|href)="https?://', html)  # no network
    assert "PASS" in html and "seeds 0, 1" in html
    for name in rec.results[0].scalars:  # a long key may break at its underscores, not spill out of its card
        if "_" in name:
            assert f'<div class="k">{name.replace("_", "_<wbr>")}</div>' in html


def test_index_and_smoke_pages(rendered):
    reports, rec, paths = rendered
    index, warnings = render_index(reports, [("mdp", 1, "MDP"), ("later", 9, "Not yet")])
    html = index.read_text()
    assert "not run" in html and 'href="runs/mdp/' in html and warnings == []
    md, page = render_smoke([rec], reports, 1.5)
    link = re.search(r"\[html\]\(([^)]+)\)", md.read_text()).group(1)
    assert (md.parent / link).resolve() == paths["html"].resolve()


def test_failed_checks_show_hints(tmp_path):
    mean_backup = lambda P, R, gamma, V: (R + gamma * P @ V).mean(-1)  # noqa: E731
    rec = run_audit("mdp", mode="toy", kernels={"bellman_optimality_backup": mean_backup},
                    kernel_sources={"bellman_optimality_backup": "my_file.py"})
    html = save_and_render(rec, tmp_path)["html"].read_text()
    assert "FAIL" in html and "hint:" in html and "my_file.py" in html


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.floats(0.0, 0.99))
def test_ema_stays_within_the_range_of_the_data(values, weight):
    smoothed = ema(values, weight)
    assert len(smoothed) == len(values)
    assert all(min(values) - 1e-6 <= v <= max(values) + 1e-6 for v in smoothed)
    assert ema([3.0] * len(values), weight) == pytest.approx([3.0] * len(values))
    both_ways = smooth(values, weight)
    assert len(both_ways) == len(values)
    assert all(min(values) - 1e-6 <= v <= max(values) + 1e-6 for v in both_ways)


def test_smoothed_line_does_not_lag_behind_a_trend():
    """A falling loss: the forward EMA trails it (drawn above the raw points by about one memory of
    slope), the forward-backward line sits on it away from the ends."""
    ramp = [10.0 - 0.1 * t for t in range(400)]
    weight = 0.9  # 10 points of memory
    middle = slice(100, 300)
    assert min(e - r for e, r in zip(ema(ramp, weight)[middle], ramp[middle])) > 0.8  # lags by ~9 points of slope
    assert max(abs(s - r) for s, r in zip(smooth(ramp, weight)[middle], ramp[middle])) < 1e-3  # edges fade as 0.9^100


def test_tables_round_trip_and_render(tmp_path):
    from llmaudit.audit import AuditResult, Check, Context
    from llmaudit.record import RunRecord

    ctx = Context("mdp", seed=3)
    ctx.result.checks.append(Check("a_check", True, 1.0, "== 1", "why"))
    ctx.table("Stages", ["stage", "trainable", "gold"], [["SFT", "policy", 1.5], ["PPO | RL", "actor, critic", 6.25]])
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        ctx.table("Bad", ["a", "b", "c"], [[1, 2]])
    result = AuditResult.from_dict(ctx.result.to_dict())
    assert result.tables == ctx.result.tables and result.deterministic_dict()["tables"]["Stages"]["rows"][1][2] == 6.25
    rec = run_audit("mdp", mode="toy", seeds=[0])
    rec = RunRecord.from_dict(rec.to_dict() | {"results": [result.to_dict()]})
    paths = save_and_render(rec, tmp_path)
    md, html = paths["markdown"].read_text(), paths["html"].read_text()
    assert "## Stages\n\n| stage | trainable | gold | \n|---|---|---|\n| SFT | policy | 1.5 | \n" in md
    assert "PPO \\| RL" in md and "<th>trainable</th>" in html and "<td>actor, critic</td>" in html


def _count_colour(png: bytes, hex_colour: str) -> int:
    import io

    import matplotlib.image as mpimg
    import numpy as np

    rgb = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    want = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(rgb - want).max(axis=-1) < 0.02).sum())


def test_drawn_tables_become_pictures_in_both_pages(tmp_path):
    from llmaudit.audit import AuditResult, Context
    from llmaudit.record import RunRecord
    from llmaudit.report.plots import PALETTE, table_png

    ctx = Context("mdp", seed=0)
    gantt = [["stage 0", "F0", "F1", "·", "·", "B0", "B1"], ["stage 1", "·", "F0", "B0", "F1", "B1", "·"]]
    ctx.table("Pipeline", ["stage"] + [str(t) for t in range(6)], gantt, draw="gantt")
    ctx.table("Attention", ["row", "left", "right"], [["top", 10.0, 70.0], ["bottom", 5.0, 15.0]], draw="heatmap")
    ctx.table("Plain", ["a"], [[1]])
    with pytest.raises(ValueError, match="draw must be one of"):
        ctx.table("Bad", ["a"], [[1]], draw="pie")
    result = AuditResult.from_dict(ctx.result.to_dict())
    assert result.tables == ctx.result.tables and result.tables["Pipeline"]["draw"] == "gantt"
    assert "draw" not in result.tables["Plain"]  # undrawn tables keep the old record layout
    # every forward slot has its backward: as much blue (F) as orange (B) in the timeline
    png = table_png("Pipeline", result.tables["Pipeline"])
    blue, orange = _count_colour(png, PALETTE[0]), _count_colour(png, PALETTE[3])
    assert blue > 500 and abs(blue - orange) < 0.1 * blue
    rec = run_audit("mdp", mode="toy", seeds=[0])
    paths = save_and_render(RunRecord.from_dict(rec.to_dict() | {"results": [result.to_dict()]}), tmp_path)
    md, html = paths["markdown"].read_text(), paths["html"].read_text()
    pictures = [i for i in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) if i.startswith("table-")]
    assert pictures == ["table-pipeline.png", "table-attention.png"]
    for p in pictures:
        assert (paths["markdown"].parent / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert html.count('alt="Pipeline" src="data:image/png;base64,') == 1 and html.count("<summary>the numbers") == 2
