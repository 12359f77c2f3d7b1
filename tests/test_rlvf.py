"""rlvf module: the verifiers (unit vectors + hypothesis adversarial strings: never crash, never execute,
deterministic, bounded), tokenizer-free encode/decode, reward placement, tasks and demonstrations, the audit
in toy/full mode, determinism, and mutants that break each check."""
from __future__ import annotations

import builtins
import re

import pytest
import torch
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params, patched
from hypothesis import given, settings
from hypothesis import strategies as st

from llmaudit.registry import get_audit
from modules.rlvf import rlvf as V

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
    assert V.extract_answer("#### 12" + "x" * 293) == "12"  # starts 300 characters from the end
    assert V.extract_answer("#### 12" + "x" * 294) is None
    assert V.math_answer_reward("#### 12" + "x" * 293, "12") == 1.0
    assert V.math_answer_reward("#### 12" + "x" * 294, "12") == 0.0
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
@given(prefix=adversarial, filler=st.integers(0, 400), truth=st.integers(0, 10 ** 6).map(str))
def test_math_reward_reads_only_the_last_300_characters(prefix, filler, truth):
    text = f"{prefix}#### {truth}" + "x" * filler
    visible = len(text) - text.rindex("#### ") <= V.SOLUTION_CLIP_CHARS
    assert (V.math_answer_reward(text, truth) == 1.0) == visible


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
    assert result.scalars["attack strings"] == 140


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_audit_passes_in_full_mode(seed):
    result = audit_once("rlvf", "full", seed)
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error


def test_same_seed_gives_identical_result_and_quick_invariants_pass():
    a, b = audit_once("rlvf", "toy", 3, QUICK), audit_once("rlvf", "toy", 3, QUICK)
    assert a.deterministic_dict() == b.deterministic_dict()
    assert all(c.passed for c in a.checks if c.kind == "invariant"), [c.name for c in a.checks if not c.passed]


def test_math_answer_reward_is_credited_only_with_checks_that_call_it():
    spec = get_audit("rlvf")
    credited = {c.name for c in spec.checks_of_kernel("math_answer_reward", "toy")}
    assert credited == {"verifier_matches_gsm8k_vectors", "verifier_is_deterministic_and_in_range",
                        "verifier_never_executes_model_text", "verifier_resists_adversarial_completions",
                        "answer_beyond_the_last_300_chars_is_invisible", "truncated_responses_score_zero",
                        "reward_sits_on_the_last_valid_token"}


def test_a_kernel_without_the_window_fails_the_window_check():
    """The defect that started this: a math_answer_reward reading the whole completion was told it passed."""
    result = audit_once("rlvf", "toy", 0, only=[c.name for c in get_audit("rlvf").checks_of_kernel(
        "math_answer_reward", "toy")], math_answer_reward=reward_with(window=None))
    assert [c.name for c in result.checks if not c.passed] == ["answer_beyond_the_last_300_chars_is_invisible"]


# ---------------------------------------------------------------------------------------------------
# Mutants


def reward_with(*, window=V.SOLUTION_CLIP_CHARS, strip_commas=True, compare="string", any_number=False, first=False):
    """A configurable wrong math_answer_reward (the reference when every option is left at its default)."""
    def fn(completion, ground_truth, method="strict", format_score=0.0, score=1.0):
        text = completion if window is None else completion[-window:]
        if any_number:  # pay if the truth appears anywhere
            return score if ground_truth in re.findall(r"-?[0-9]+", text) else format_score
        pattern = r"#### (-?[0-9.,]+)" if method == "strict" else r"(-?[0-9.,]+)"
        found = [s for s in re.findall(pattern, text) if method == "strict" or s.replace(",", "") not in ("", ".")]
        if not found:
            return 0.0
        answer = found[0 if first else -1].replace("$", "")
        answer = answer.replace(",", "") if strip_commas else answer
        if compare == "float":
            try:
                return score if float(answer) == float(ground_truth) else format_score
            except ValueError:
                return format_score
        return score if answer == ground_truth else format_score
    return fn


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


def scores_cut_responses(ids):
    text, _ = _decode_response(ids)
    return text, True  # treats a response cut at the limit as finished


_decode_response = V.decode_response


def reward_after_eos(scores, mask):  # TRL PPO's sequence_lengths + 1, clamped into the tensor
    out = torch.zeros(mask.shape)
    idx = mask.sum(-1).long().clamp(max=mask.shape[1] - 1)
    out[torch.arange(len(scores)), idx] = scores
    return out


def reward_on_eos_column(scores, mask):  # the reward on the first padding column of the longest row
    out = torch.zeros(mask.shape)
    out[:, -1] = scores
    return out


_encode = V.encode


def encode_dropping_padding(text):
    return _encode(text.replace("<pad>", ""))


def keyword_search(completion, ground_truth, format_score=0.0, score=1.0):
    return score if ground_truth in completion else format_score


def format_by_search(completion, task):
    return V.ANSWER_FORMATS[task].search(completion) is not None


LOOP = "grpo_with_verifier_reward_raises_logic_accuracy"
MUTANTS = [
    Mutant("verifier_matches_gsm8k_vectors", "commas kept", {"math_answer_reward": reward_with(strip_commas=False)}),
    Mutant("verifier_matches_gsm8k_vectors", "first marker", {"math_answer_reward": reward_with(first=True)}),
    Mutant("verifier_is_deterministic_and_in_range", "partial credit", {"math_answer_reward": partial_credit}),
    Mutant("verifier_never_executes_model_text", "eval of the answer", {"math_answer_reward": evaluates_answers}),
    Mutant("verifier_resists_adversarial_completions", "any number matches",
           {"math_answer_reward": reward_with(any_number=True)}),
    Mutant("verifier_resists_adversarial_completions", "float comparison",
           {"math_answer_reward": reward_with(compare="float")}),
    Mutant("answer_beyond_the_last_300_chars_is_invisible", "no window",
           {"math_answer_reward": reward_with(window=None)}),
    Mutant("answer_beyond_the_last_300_chars_is_invisible", "window of 299",
           {"math_answer_reward": reward_with(window=299)}),
    Mutant("truncated_responses_score_zero", "cut responses scored", patch=patched(V, "decode_response",
                                                                                  scores_cut_responses)),
    Mutant("reward_sits_on_the_last_valid_token", "one slot after EOS", patch=patched(V, "place_outcome_reward",
                                                                                     reward_after_eos)),
    Mutant("reward_sits_on_the_last_valid_token", "last column", patch=patched(V, "place_outcome_reward",
                                                                              reward_on_eos_column)),
    Mutant("logic_verifier_needs_the_exact_word", "keyword search", patch=patched(V, "yes_no_reward", keyword_search)),
    Mutant("format_check_accepts_exactly_the_answer_format", "search, not fullmatch",
           patch=patched(V, "follows_format", format_by_search)),
    Mutant("encode_decode_round_trip", "padding dropped", patch=patched(V, "encode", encode_dropping_padding)),
    Mutant(LOOP, "format score = score", overrides={"format_score": "1.0"}),
    Mutant(LOOP, "untrained policy (lr 0)", overrides={"lr": "0"}),
]


def test_reference_options_reproduce_the_reference():
    ref = reward_with()
    for c, t, m, _ in [("#### 1,000", "1000", "strict", 0), ("x #### 7 y 8", "8", "flexible", 0),
                       ("#### 12" + "x" * 294, "12", "strict", 0), ("72", "72", "strict", 0)]:
        assert ref(c, t, m, 0.1) == V.math_answer_reward(c, t, m, 0.1)


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("rlvf", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("rlvf", MUTANTS)
