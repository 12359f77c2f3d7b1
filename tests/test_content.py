"""Rules the shipped study material must keep: what a learner reads agrees with the code, gives no answer
away by its shape, and cites only sources a learner can open."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmaudit.learn.load import load_content
from llmaudit.practice import KernelFileError, check_signature
from llmaudit.registry import all_kernels

ROOT = Path(__file__).resolve().parent.parent
LANGS = ("zh", "en")


@pytest.fixture(scope="module")
def shipped():
    return load_content()


def stated_parameters(text: str, name: str) -> list[str] | None:
    """The parameter names of ``name(a, b, ...)`` as an item writes them, or None if it does not."""
    found = re.search(rf"\b{re.escape(name)}\(([^()]*)\)", text)
    if found is None:
        return None
    return [p.strip().split("=")[0].split(":")[0].strip() for p in found.group(1).split(",") if p.strip()]


def test_every_code_item_states_its_kernels_exact_signature(shipped):
    """A code item names the parameters, in order, that `llmaudit check` calls its kernel with, in both languages,
    so a function written to the item's words is never refused for its signature."""
    kernels = all_kernels()
    checked, wrong = 0, []
    for item in shipped.items():
        if item.type != "code" or shipped.cards[item.module].status != "built":
            continue  # planned modules have no kernel yet; the quiz skips their code items
        want = list(kernels[item.kernel].signature.parameters)
        for lang in LANGS:
            said = stated_parameters(item.q.get(lang), item.kernel)
            if said != want:
                wrong.append(f"{item.id} [{lang}]: states {item.kernel}({', '.join(said or ['?'])}), "
                             f"the kernel is {item.kernel}({', '.join(want)})")
                continue
            namespace: dict = {}
            exec(f"def {item.kernel}({', '.join(said)}): pass", namespace)  # what a learner following the item writes
            try:
                check_signature(namespace[item.kernel], kernels[item.kernel], Path(f"{item.id}.py"))
            except KernelFileError as exc:
                wrong.append(f"{item.id} [{lang}]: {exc}")
        checked += 1
    assert wrong == []
    assert checked >= 20  # every built module's code items, not a vacuous pass


def test_stated_parameters_reads_what_an_item_writes():
    assert stated_parameters("手撕 f(q, k, v, block_size)：按块", "f") == ["q", "k", "v", "block_size"]
    assert stated_parameters("Write f: given q and k", "f") is None
    assert stated_parameters("g(x: Tensor, eps=1e-6)", "g") == ["x", "eps"]


def key_length_rank(item, lang: str) -> int:
    """1 + the number of options strictly longer than the keyed one in ``lang`` (1: the key is, or ties for, longest)."""
    lengths = [len(c.get(lang)) for c in item.choices]
    return sorted(lengths, reverse=True).index(lengths[item.answer]) + 1


def rank_shares(items, lang: str) -> dict[int, float]:
    """For each length rank r, the fraction of items whose keyed option has rank r."""
    ranks = [key_length_rank(i, lang) for i in items]
    return {r: round(ranks.count(r) / len(ranks), 3) for r in sorted(set(ranks))}


def test_the_correct_option_is_not_given_away_by_its_length(shipped):
    """Picking by length must not pass the quiz: the keyed option is the longest in at most 40 % of choice items,
    and no other length rank (second longest, shortest, ...) finds it more often either, in either language."""
    choice = [i for i in shipped.items() if i.type == "choice"]
    assert len(choice) >= 100
    for lang in LANGS:
        shares = rank_shares(choice, lang)
        assert shares.get(1, 0.0) <= 0.40, (lang, shares)
        assert max(shares.values()) <= 0.40, (lang, shares)


def test_key_length_rank_counts_ties_as_longest(shipped):
    item = next(i for i in shipped.items() if i.type == "choice" and len(i.choices) == 4)
    def with_key(text: str):
        choices = [c.model_copy(update={"en": "y" * 20}) for c in item.choices]
        choices[item.answer] = choices[item.answer].model_copy(update={"en": text})
        return item.model_copy(update={"choices": choices})
    assert key_length_rank(with_key("y" * 20), "en") == 1  # a tie counts as longest
    assert key_length_rank(with_key("x" * 99), "en") == 1
    assert key_length_rank(with_key("x"), "en") == 4  # rank = 1 + the number of strictly longer options
    assert rank_shares([with_key("x" * 99), with_key("x")], "en") == {1: 0.5, 4: 0.5}


def learner_facing_files() -> list[Path]:
    files = [*sorted((ROOT / "cards").glob("*.yaml")), *sorted((ROOT / "quizzes").glob("*.yaml")),
             *sorted((ROOT / "modules").glob("*/README.md")), ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if f.is_file()]


INTERNAL = re.compile(r"seed[ -]?00\d|issue-\d|seed repositor|seed project|seed guide|seed's (?:metric|calculator)"
                      r"|种子仓库|种子指南|种子项目|种子的指标", re.IGNORECASE)
GENERATED = re.compile(r"^(?:reports/|report\.md$|index\.md$)")  # pages the CLI writes, not shipped files


def cited_markdown(text: str) -> list[str]:
    return re.findall(r"(?<![\w/.-])([\w][\w./-]*\.md)\b", text)


def test_learner_facing_text_cites_no_internal_or_missing_source():
    """Learners cannot open the project's seed repositories, issue tracker or private notes: no card, quiz,
    lesson or doc mentions them, and every Markdown file a text cites exists in the repository."""
    files = learner_facing_files()
    assert len(files) > 40
    problems = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            for hit in INTERNAL.finditer(line):
                problems.append(f"{f.relative_to(ROOT)}:{n}: cites {hit.group(0)!r}")
            for cited in cited_markdown(line):
                if GENERATED.match(cited):
                    continue
                if not ((ROOT / cited).exists() or (f.parent / cited).exists()):
                    problems.append(f"{f.relative_to(ROOT)}:{n}: cites {cited}, which is not in the repository")
    assert problems == []


def test_the_source_rule_catches_what_it_names():
    assert INTERNAL.search("a bug that appeared in seed 002") and INTERNAL.search("see issue-4")
    assert INTERNAL.search("这是种子仓库里真实出现过的 bug")
    assert not INTERNAL.search("toy seeds 0-19, the worst seed keeps 10 % margin")
    assert cited_markdown("see rl-anchors.md §3 and docs/robustness.md.") == ["rl-anchors.md", "docs/robustness.md"]
    assert not (ROOT / "rl-anchors.md").exists()


def sentences(text: str):
    return re.split(r"(?<=[。；;.!?])\s*", text)


def all_texts(shipped):
    texts = [t for card in shipped.cards.values() for t in (card.one_liner, card.must_explain, *card.key_points,
                                                            *card.pitfalls, *(qa.a for qa in card.qa))]
    return texts + [t for i in shipped.items() for t in (i.a, *i.keypoints, *(i.choices or []))]


def test_zero_memory_saving_is_stated_per_stage(shipped):
    """Only ZeRO-3 approaches 1/N of the model states (ZeRO-1 is about 4x, ZeRO-2 about 8x with mixed-precision
    Adam): a text that credits ZeRO with an N-fold saving also gives the stage figures (4x for ZeRO-1)."""
    n_fold = re.compile(r"1/N\b|÷ ?N\b|by N\b|N ?×|N 倍")
    per_stage = re.compile(r"4 ?×|4 倍|4Ψ \+ 12Ψ/N")
    bad = [t.get(lang) for t in all_texts(shipped) for lang in LANGS
           if "ZeRO" in t.get(lang) and n_fold.search(t.get(lang)) and not per_stage.search(t.get(lang))]
    assert bad == []


def test_reward_hacking_is_diagnosed_against_a_gold_signal(shipped):
    """Reward hacking is the proxy (RM) score rising while gold/human quality stalls or falls; a sentence that
    diagnoses it from a stalled reward must say which reward (proxy vs gold), since KL spent with a flat proxy
    is a different problem."""
    stalls = re.compile(r"stall|停滞|no longer improves|不再提高")
    names_the_reward = re.compile(r"proxy|gold|代理|金标准|真实|人工")
    bad = [s for t in all_texts(shipped) for lang in LANGS for s in sentences(t.get(lang))
           if re.search(r"reward hacking", s, re.IGNORECASE) and stalls.search(s) and not names_the_reward.search(s)]
    assert bad == []
