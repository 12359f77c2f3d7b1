"""Terminal output at common widths and under load: identifiers are never cut, prose wraps at spaces,
progress bars count in the unit they move in, long commands show progress, multi-seed output names
its seeds."""
from __future__ import annotations

import io
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.cells import cell_len
from rich.progress import Progress
from typer.testing import CliRunner

from llmaudit.cli import app
from llmaudit.cli.common import AmountColumn, progress_bar
from llmaudit.record import RunRecord

WIDTHS = (80, 200)


def runner(columns: int) -> CliRunner:
    return CliRunner(env={"COLUMNS": str(columns), "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"})


@pytest.mark.parametrize("columns", WIDTHS)
def test_list_never_splits_a_kernel_name(columns, tmp_path):
    from llmaudit.registry import all_kernels

    res = runner(columns).invoke(app, ["list", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert all(cell_len(line.rstrip()) <= columns for line in lines), max(lines, key=len)
    words = {w for line in lines for w in re.findall(r"[A-Za-z0-9_]+", line)}
    cut = [k for k in all_kernels() if k not in words]
    assert not cut, f"kernel names split across lines at {columns} columns: {cut}"


def _asked_items(output: str):
    from llmaudit.learn.load import content

    by_id = {item.id: item for item in content().items()}
    return [by_id[i] for i in re.findall(r"^\d+/\d+ \S+ · \S+ · (\S+)$", output, flags=re.M)]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_quiz_answers_wrap_at_spaces_at_80_columns(lang, tmp_path, monkeypatch):
    """A mid-word cut ("goa" / "l") shows as a word missing once the lines are joined again with spaces.
    Chinese may break between any two characters, so its lines only have to fit."""
    monkeypatch.setenv("LLMAUDIT_HOME", str(tmp_path / "home"))
    res = runner(80).invoke(app, ["quiz", "--day", "1", "-n", "3", "--lang", lang, "--seed", "0", "--cram"],
                            input="\n3\n" * 3)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    too_wide = [line for line in lines if cell_len(line.rstrip()) > 80]
    assert not too_wide, too_wide
    items = _asked_items(res.stdout)
    assert len(items) == 3, res.stdout
    if lang == "en":
        joined = " ".join(line.strip() for line in lines)
        for item in items:
            answer = " ".join(item.a.en.split())
            assert answer in joined, f"{item.id}: its answer is cut mid-word at 80 columns"


def _first_token_width(line: str) -> int:
    from llmaudit.cli.common import break_tokens

    start, end = break_tokens(line.lstrip())[0]
    return cell_len(line.lstrip()[start:end].rstrip())


def test_chinese_answers_fill_their_lines_and_respect_closing_marks(tmp_path, monkeypatch):
    """rich breaks only at spaces: a Chinese run between two spaces went whole to the next line and
    left a short line behind. Now every line of a wrapped paragraph is full: the next line's first
    piece would not have fitted. No line starts with a closing mark (，。）)."""
    monkeypatch.setenv("LLMAUDIT_HOME", str(tmp_path / "home"))
    res = runner(80).invoke(app, ["quiz", "--day", "15", "-n", "6", "--lang", "zh", "--seed", "0", "--cram"],
                            input="\n3\nA\n\n3\n" * 6)
    assert res.exit_code == 0, res.output
    items = _asked_items(res.stdout)
    assert len(items) >= 4, res.stdout
    lines = res.stdout.splitlines()
    checked = 0
    for item in items:
        target = "".join(item.a.zh.split())  # the answer without spaces, as the lines will rejoin
        for i, line in enumerate(lines):
            if len("".join(line.split())) > 10 and target.startswith("".join(line.split())):
                para = [line]  # the answer's first line, then its continuation lines
                while (i + len(para) < len(lines) and "".join("".join(para).split()) != target
                       and target.startswith("".join("".join(para + [lines[i + len(para)]]).split()))):
                    para.append(lines[i + len(para)])
                assert "".join("".join(para).split()) == target, para
                for a, b in zip(para, para[1:]):
                    assert cell_len(a.rstrip()) + 1 + _first_token_width(b) > 80, (a, b)
                    assert b.strip()[0] not in "，。、；：！？）」』", b
                    checked += 1
                break
    assert checked >= 4, res.stdout


@given(st.lists(st.sampled_from(list("ab 中文字，。（）「」x1=+(") + ["a_long_identifier_name", "  "]), max_size=120),
       st.integers(8, 100), st.integers(0, 6))
def test_wrap_offsets_cut_nothing_and_fit(parts, width, hang):
    from llmaudit.cli.common import wrap_offsets

    text = "".join(parts)

    offsets = wrap_offsets(text, width, hang)
    assert offsets == sorted(set(offsets)) and all(0 < o < len(text) for o in offsets)
    pieces = [text[a:b] for a, b in zip([0, *offsets], [*offsets, len(text)])]
    assert "".join(pieces) == text
    indent = hang if hang <= width // 2 else 0
    for k, piece in enumerate(pieces):
        assert cell_len(piece.rstrip()) + (indent if k else 0) <= width, (piece, width, hang)


def test_rich_breaks_chinese_between_characters_in_tables_too():
    """rich on its own pushes "误差如何引导价值函数收敛" whole to the next line after "TD" (roadmap, day 2)
    or cuts it with an ellipsis; the CLI makes rich break between Chinese characters."""
    from rich.console import Console
    from rich.table import Table

    import llmaudit.cli.common  # noqa: F401  (installs the line breaking)

    table = Table("day", "must explain", width=40)
    table.add_row("2", "TD 误差如何引导价值函数收敛，以及为什么 TD(0) 的方差比 MC 小")
    console = Console(width=40, record=True, file=io.StringIO())
    console.print(table)
    lines = [line.rstrip() for line in console.export_text().splitlines()]
    assert any("TD 误差" in line for line in lines), lines  # "TD" no longer alone on its line
    assert "…" not in "".join(lines), lines


def test_the_checker_of_wrapping_can_fail():
    """What the quiz test would see if the terminal cut words (soft wrap): the joined text differs."""
    answer = "the discount gives an effective horizon of about 1/(1-gamma)"
    hard_cut = [answer[:17], answer[17:]]  # "...effective horiz" / "on ..."
    assert answer not in " ".join(hard_cut)


def _amount(total: float, completed: float) -> str:
    bar = Progress(AmountColumn(), disable=True)
    task = bar.add_task("x", total=total, completed=completed)
    return str(AmountColumn().render(bar.tasks[task]))


def test_progress_counts_items_or_shows_percent_of_the_work():
    assert _amount(1.0, 0.5) == " 50%"  # an audit: a cost-weighted fraction, never "0/1" while half full
    assert _amount(1.0, 1.0) == "100%"
    assert _amount(17, 3.6) == "3/17"  # smoke: modules done
    assert progress_bar(json_mode=True).disable and progress_bar(json_mode=False).disable  # not a terminal here


class RecordingBar(Progress):
    """A progress bar that remembers every update (descriptions and completed fractions)."""

    def __init__(self) -> None:
        super().__init__(disable=True)
        self.seen: list[dict] = []

    def update(self, task_id, **fields) -> None:  # noqa: D401
        self.seen.append(fields)
        super().update(task_id, **fields)


def test_brief_shows_progress_card_by_card(tmp_path, monkeypatch):
    import llmaudit.cli.brief as cli_brief

    bar = RecordingBar()
    monkeypatch.setattr(cli_brief, "progress_bar", lambda json_mode: bar)
    res = runner(200).invoke(app, ["brief", "--day", "3", "-f", "md", "--lang", "en", "--reports", str(tmp_path),
                                   "-o", str(tmp_path / "b.md")])
    assert res.exit_code == 0, res.output
    done = [u["completed"] for u in bar.seen if "completed" in u]
    descriptions = [u.get("description", "") for u in bar.seen]
    assert len(done) >= 3 and done == sorted(done) and done[-1] == pytest.approx(1.0), done
    assert any("actor_critic" in d for d in descriptions) and any("cards)" in d for d in descriptions), descriptions


def test_pdf_brief_reports_its_layout_and_writing_stages(tmp_path):
    pytest.importorskip("weasyprint")
    from llmaudit.learn import brief as briefs
    from llmaudit.learn.load import content

    c = content()
    ctx = briefs.build_context(c, briefs.select(c, module="gae"), "en", {})
    stages: list[str] = []
    briefs.write(ctx, "pdf", tmp_path / "gae.pdf", on_stage=stages.append)
    assert stages == ["layout", "write"]


def _three_seed_record(fail_seed: int) -> RunRecord:
    from llmaudit.audit import AuditResult, Check

    def result(seed: int) -> AuditResult:
        r = AuditResult(module="ppo", seed=seed, mode="full")
        value = 11.2 if seed == fail_seed else 0.5 + seed / 10
        r.checks.append(Check("kl_estimates_track_exact_kl", passed=seed != fail_seed, measured=value,
                              expected="< 4", why="k3 is an unbiased estimate of the KL"))
        r.scalars["gold reward gain"] = 3.0 + seed
        return r
    return RunRecord("ppo", "PPO", 7, "full", [0, 1, 2], {}, {}, {}, [result(s) for s in (0, 1, 2)])


@pytest.mark.parametrize("columns", WIDTHS)
def test_multi_seed_output_labels_seeds_and_names_the_failing_one(columns, capsys, monkeypatch):
    from llmaudit.cli.run import print_record

    monkeypatch.setenv("COLUMNS", str(columns))
    print_record(_three_seed_record(fail_seed=2))
    text = " ".join(capsys.readouterr().out.split())
    assert "seed 0: 0.5" in text and "seed 1: 0.6" in text and "seed 2 ✗: 11.2" in text, text
    assert "fails on seed 2" in text, text
    assert "seed 0: 3 · seed 1: 4 · seed 2: 5" in text, text


def test_sweep_names_the_seeds_a_check_fails_on():
    res = runner(100).invoke(app, ["sweep", "mdp", "--seeds", "2", "-j", "1", "--set", "max_iters=2"])
    assert res.exit_code == 1, res.output
    line = next(x for x in res.stdout.splitlines() if "value_iteration_reaches_bellman_fixed_point" in x)
    assert "0/2 (fails on seeds 0, 1)" in line, line
