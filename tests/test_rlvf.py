"""rlvf module: the verifiers (unit vectors + hypothesis adversarial strings: never crash, never execute,
deterministic, bounded), tokenizer-free encode/decode, reward placement, tasks and demonstrations, the audit
in toy/full mode, determinism, and one mutant per check."""
from __future__ import annotations

import builtins
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_check_fails, audit_once
from llmaudit.runner import configure_torch
from modules.rlvf import rlvf as V

configure_torch()

FAST = settings(max_examples=200, deadline=None)
QUICK = {"warmup_steps": "5", "steps": "1", "n_adversarial": "14"}

# adversarial text: anything, plus pieces that look like answers, markers and code
pieces = st.sampled_from(["####", "#### ", "1,000", "-", ".", "$", "9" * 400, "__import__('os').system('x')",
                          "eval(", "exec(", "\n", " ", "72", "72.0", "yes", "no", "<eos>"])
adversarial = st.lists(st.one_of(st.text(max_size=20), pieces), max_size=12).map("".join)
truths = st.one_of(st.integers(-10 ** 6, 10 ** 6).map(str), st.just("9" * 250), st.text(max_size=5))


# ---------------------------------------------------------------------------------------------------
# Verifiers


@pytest.mark.parametrize("completion, truth, method, want", [
    ("#### 72", "72", "strict", 1.0), ("#### 1,000", "1000", "strict", 1.0), ("#### 72.0", "72", "strict", 0.1),
    ("72", "72", "strict", 0.0), ("a #### 5 b #### 12", "12", "strict", 1.0), ("#### 12 #### 5", "12", "strict", 0.1),
    ("#### -3", "-3", "strict", 1.0), ("the answer is 1,000", "1000", "flexible", 1.0),
    ("nothing", "1", "flexible", 0.0), ("####12", "12", "strict", 0.0), ("#### $1,000", "1000", "strict", 0.0),
])
def test_math_reward_gsm8k_vectors(completion, truth, method, want):
    assert V.math_answer_reward(completion, truth, method=method, format_score=0.1) == want


def test_answer_beyond_300_characters_is_invisible():
    assert V.extract_answer("#### 12" + " x" * 146) == "12"
    assert V.extract_answer("#### 12" + " x" * 147) is None
    with pytest.raises(ValueError, match="method"):
        V.extract_answer("#### 1", "loose")


@FAST
@given(completion=adversarial, truth=truths, method=st.sampled_from(["strict", "flexible"]))
def test_math_reward_is_pure_bounded_and_never_executes(completion, truth, method):
    with V.forbid_code_execution() as calls:
        first = V.math_answer_reward(completion, truth, method=method, format_score=0.1)
        second = V.math_answer_reward(completion, truth, method=method, format_score=0.1)
    assert calls == [] and first == second and first in (0.0, 0.1, 1.0)
    if first == 1.0:  # full score only when the answer at the agreed place IS the truth
        assert V.extract_answer(completion, method) == truth


@FAST
@given(truth=st.integers(0, 10 ** 6), others=st.lists(st.integers(0, 10 ** 6), max_size=6))
def test_listing_numbers_without_the_marker_earns_nothing(truth, others):
    text = " ".join(str(n) for n in others + [truth] + others)
    assert V.math_answer_reward(text, str(truth)) == 0.0


def test_huge_numbers_are_compared_as_strings():
    big = "9" * 250
    assert V.math_answer_reward(f"#### {big}", big) == 1.0
    assert V.math_answer_reward(f"#### {big}", big[:-1] + "8", format_score=0.1) == 0.1  # float() says equal


def test_forbid_code_execution_restores_builtins():
    original = builtins.eval
    with V.forbid_code_execution() as calls:
        assert eval("1 + 1") == 0
    assert calls == ["builtins.eval"] and builtins.eval is original and eval("1 + 1") == 2


@pytest.mark.parametrize("completion, truth, want", [
    ("yes", "yes", 1.0), ("no", "yes", 0.1), (" no ", "no", 1.0), ("yes no", "yes", 0.0), ("y", "yes", 0.0),
    ("is 7>2? yes", "yes", 0.0), ("", "no", 0.0)])
def test_yes_no_reward_needs_the_exact_word(completion, truth, want):
    assert V.yes_no_reward(completion, truth, format_score=0.1) == want


@FAST
@given(text=adversarial)
def test_yes_no_reward_pays_only_the_exact_word(text):
    r = V.yes_no_reward(text, "yes", format_score=0.1)
    assert r in (0.0, 0.1, 1.0) and (r == 1.0) == (text.strip() == "yes")


def test_format_check_is_a_fullmatch():
    assert V.follows_format("#### 12", "arithmetic") and V.follows_format("no", "logic")
    assert not V.follows_format("#### 12 ", "arithmetic") and not V.follows_format("x#### 12", "arithmetic")
    assert not V.follows_format("#### 1.5", "arithmetic") and not V.follows_format("nope", "logic")


def test_adversarial_completions_are_seeded_and_cover_every_kind():
    a = V.adversarial_completions(21, torch.Generator().manual_seed(0))
    b = V.adversarial_completions(21, torch.Generator().manual_seed(0))
    assert a == b and len({k.split(" (")[0] for _, _, k in a}) == 7


# ---------------------------------------------------------------------------------------------------
# Tokens, placement, tasks


@FAST
@given(parts=st.lists(st.sampled_from(list(V.VOCAB)), max_size=15))
def test_encode_decode_round_trip(parts):
    text = "".join(parts)
    assert V.decode(V.encode(text)) == text


def test_encode_rejects_unknown_characters():
    with pytest.raises(ValueError, match="vocabulary"):
        V.encode("#### 1a")


def test_decode_response_stops_at_eos():
    ids = V.encode("#### 11<eos><pad>")
    assert V.decode_response(ids) == ("#### 11", True)
    assert V.decode_response(V.encode("#### 11")) == ("#### 11", False)


@FAST
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_outcome_reward_sits_on_the_last_valid_token(lengths, seed):
    lengths = torch.tensor(lengths)
    mask = (torch.arange(6)[None] < lengths[:, None]).float()
    scores = torch.rand(len(lengths), generator=torch.Generator().manual_seed(seed))
    placed = V.place_outcome_reward(scores, mask)
    assert torch.allclose(placed.sum(-1), scores)
    assert torch.equal(placed[torch.arange(len(lengths)), lengths - 1], scores)
    assert (placed * (1 - mask)).abs().max().item() == 0.0


def test_truncated_response_scores_zero():
    eos = V.VOCAB.index(V.EOS)
    ended = torch.tensor([V.encode("#### 12") + [eos]])
    cut = torch.tensor([V.encode("#### 12") + V.encode("3")])
    assert V.score_responses("arithmetic", ended, ["12"])[0].item() == 1.0
    r, done, texts = V.score_responses("arithmetic", cut, ["123"])
    assert r.item() == 0.0 and not bool(done) and texts == ["#### 123"]


def test_tasks_answers_and_difficulty():
    arith, logic = V.all_problems("arithmetic"), V.all_problems("logic")
    assert arith.prompts.shape == logic.prompts.shape == (100, 5)
    assert V.decode(arith.prompts[38]) == "<bos>3+8=" and arith.answers[38] == "11" and arith.difficulty[38] == 1
    assert V.decode(logic.prompts[72]) == "<bos>7>2?" and logic.answers[72] == "yes" and logic.difficulty[72] == 0
    assert int(arith.difficulty.sum()) == 45 and int(logic.difficulty.sum()) == 44


def test_demonstrator_mistakes_are_the_level_typical_ones():
    problems = V.all_problems("arithmetic")
    demos = V.demonstrations("arithmetic", problems, (0.0, 0.0), torch.Generator().manual_seed(0))
    for truth, hard, demo in zip(problems.answers, problems.difficulty.tolist(), demos):
        assert demo == (f"#### {int(truth) - 10}" if hard else truth)
    assert V.demonstrations("logic", V.all_problems("logic"), (1.0, 1.0), torch.Generator()) == \
        V.all_problems("logic").answers


# ---------------------------------------------------------------------------------------------------
# The audit


def test_audit_passes_in_toy_mode():
    result = audit_once("rlvf", "toy", 0)
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error
    assert {"reward", "frac_reward_zero_std", "eval/accuracy"} <= set(result.series)


@pytest.mark.parametrize("seed", [0, 1])
def test_audit_passes_in_full_mode(seed):
    result = audit_once("rlvf", "full", seed)
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error


def test_same_seed_gives_identical_result_and_quick_invariants_pass():
    a, b = audit_once("rlvf", "toy", 3, QUICK), audit_once("rlvf", "toy", 3, QUICK)
    assert a.to_dict() == b.to_dict()
    assert all(c.passed for c in a.checks if c.kind == "invariant"), [c.name for c in a.checks if not c.passed]


# ---------------------------------------------------------------------------------------------------
# Mutants: one per check


def keeps_commas(completion, ground_truth, method="strict", format_score=0.0, score=1.0):
    found = re.findall(r"#### (-?[0-9.,]+)", completion)
    return 0.0 if not found else (score if found[-1] == ground_truth else format_score)


def partial_credit(completion, ground_truth, method="strict", format_score=0.0, score=1.0):
    r = V.math_answer_reward(completion, ground_truth, method, format_score, score)
    answer = V.extract_answer(completion, method)
    if r == format_score and answer and answer.lstrip("-").isdigit() and ground_truth.lstrip("-").isdigit() \
            and abs(int(answer) - int(ground_truth)) == 1:
        return 0.5  # "close enough"
    return r


def evaluates_answers(completion, ground_truth, method="strict", format_score=0.0, score=1.0):
    found = re.findall(r"#### (\S+)", completion)
    if not found:
        return 0.0
    try:
        value = eval(found[-1])  # noqa: S307 - the bug this mutant exists to catch
    except Exception:  # noqa: BLE001
        return format_score
    return score if str(value) == ground_truth else format_score


def any_number_matches(completion, ground_truth, method="strict", format_score=0.0, score=1.0):
    return score if ground_truth in re.findall(r"-?[0-9]+", completion) else format_score  # seed 002


def test_mutant_keeping_commas_fails_vectors():
    assert_check_fails(audit_once("rlvf", "toy", 0, QUICK, math_answer_reward=keeps_commas),
                       "verifier_matches_gsm8k_vectors")


def test_mutant_partial_credit_fails_range():
    assert_check_fails(audit_once("rlvf", "toy", 0, QUICK, math_answer_reward=partial_credit),
                       "verifier_is_deterministic_and_in_range")


def test_mutant_eval_fails_no_execution():
    assert_check_fails(audit_once("rlvf", "toy", 0, QUICK, math_answer_reward=evaluates_answers),
                       "verifier_never_executes_model_text")


def test_mutant_any_number_matches_fails_adversarial():
    assert_check_fails(audit_once("rlvf", "toy", 0, QUICK, math_answer_reward=any_number_matches),
                       "verifier_resists_adversarial_completions")


def test_mutant_without_clip_fails_300_chars(monkeypatch):
    monkeypatch.setattr(V, "SOLUTION_CLIP_CHARS", 10 ** 6)
    assert_check_fails(audit_once("rlvf", "toy", 0, QUICK), "answer_beyond_the_last_300_chars_is_invisible")


def test_mutant_keyword_search_fails_logic_verifier(monkeypatch):
    monkeypatch.setattr(V, "yes_no_reward", lambda c, t, format_score=0.0, score=1.0: score if t in c else format_score)
    assert_check_fails(audit_once("rlvf", "toy", 0, QUICK), "logic_verifier_needs_the_exact_word")


def test_mutant_search_instead_of_fullmatch_fails_format(monkeypatch):
    monkeypatch.setattr(V, "follows_format", lambda c, task: V.ANSWER_FORMATS[task].search(c) is not None)
    assert_check_fails(audit_once("rlvf", "toy", 0, QUICK), "format_check_accepts_exactly_the_answer_format")


def test_mutant_reward_after_eos_fails_placement(monkeypatch):
    def slot_after(scores, mask):  # TRL PPO's sequence_lengths + 1, clamped into the tensor
        out = torch.zeros(mask.shape)
        idx = mask.sum(-1).long().clamp(max=mask.shape[1] - 1)
        out[torch.arange(len(scores)), idx] = scores
        return out
    monkeypatch.setattr(V, "place_outcome_reward", slot_after)
    assert_check_fails(audit_once("rlvf", "toy", 0, QUICK), "reward_sits_on_the_last_valid_token")


def test_mutant_scoring_cut_responses_fails_truncation(monkeypatch):
    original = V.decode_response
    monkeypatch.setattr(V, "decode_response", lambda ids: (original(ids)[0], True))
    assert_check_fails(audit_once("rlvf", "toy", 0, QUICK), "truncated_responses_score_zero")


def test_mutant_encode_dropping_padding_fails_round_trip(monkeypatch):
    original = V.encode
    monkeypatch.setattr(V, "encode", lambda text: original(text.replace("<pad>", "")))
    assert_check_fails(audit_once("rlvf", "toy", 0, QUICK), "encode_decode_round_trip")


def test_mutant_format_score_equal_to_score_fails_closed_loop():
    assert_check_fails(audit_once("rlvf", "toy", 0, {"format_score": "1.0"}),
                       "grpo_with_verifier_reward_raises_logic_accuracy")
