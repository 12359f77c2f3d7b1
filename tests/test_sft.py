"""SFT: the sft_loss kernel (CE = NLL, mask, shift), the ChatML labels, and the audit with its mutants."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.sft import sft as M
from modules.tokenizer import IM_END, IM_START, PAD
from modules.training import IGNORE_INDEX


def _case(seed: int, B: int, T: int, V: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 4).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.5] = IGNORE_INDEX
    labels[:, 1] = torch.randint(0, V, (B,), generator=g)  # at least one supervised token per row
    return logits, labels


def _slow_sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> float:
    """Loop over every (b, t) with math.log / math.exp: the definition, no tensor tricks."""
    total, n = 0.0, 0
    B, T, V = logits.shape
    for b in range(B):
        for t in range(T - 1):
            y = int(labels[b, t + 1])
            if y == ignore_index:
                continue
            row = [float(v) for v in logits[b, t]]
            top = max(row)
            total += top + math.log(sum(math.exp(v - top) for v in row)) - row[y]
            n += 1
    return total / n


# --- kernel: unit and property tests ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(3, 9), st.integers(2, 13))
def test_sft_loss_equals_slow_loop_and_hand_nll(seed, B, T, V):
    logits, labels = _case(seed, B, T, V)
    loss = M.sft_loss(logits, labels).item()
    assert loss == pytest.approx(_slow_sft_loss(logits, labels), abs=1e-10)
    assert loss == pytest.approx(M.nll_by_hand(logits, labels).item(), abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_cross_entropy_is_log_softmax_then_nll(seed):
    logits, labels = _case(seed, 3, 7, 11)
    shifted = logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1)
    nll = F.nll_loss(F.log_softmax(shifted[0], dim=-1), shifted[1], ignore_index=IGNORE_INDEX)
    assert M.sft_loss(logits, labels).item() == pytest.approx(nll.item(), abs=1e-12)


def test_sft_loss_shifts_by_one_hand_example():
    # one row, T = 3: logits[0] predicts labels[1], logits[1] predicts labels[2], logits[2] predicts nothing
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]]], dtype=torch.float64)
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 2
    assert M.sft_loss(logits, labels).item() == pytest.approx(expected, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(-30, 30))
def test_sft_loss_is_invariant_to_a_constant_added_to_the_logits(seed, c):
    logits, labels = _case(seed, 2, 6, 9)
    assert M.sft_loss(logits + c, labels).item() == pytest.approx(M.sft_loss(logits, labels).item(), abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_masked_positions_do_not_matter_and_get_zero_gradient(seed):
    logits, labels = _case(seed, 3, 8, 7)
    masked = torch.zeros_like(labels, dtype=torch.bool)
    masked[:, :-1] = labels[:, 1:] == IGNORE_INDEX
    masked[:, -1] = True
    noisy = torch.where(masked[..., None], torch.randn_like(logits) * 100, logits)
    assert M.sft_loss(noisy, labels).item() == M.sft_loss(logits, labels).item()
    other = torch.where(labels == IGNORE_INDEX, torch.full_like(labels, -1), labels)
    assert M.sft_loss(logits, other, ignore_index=-1).item() == M.sft_loss(logits, labels).item()
    leaf = logits.clone().requires_grad_(True)
    M.sft_loss(leaf, labels).backward()
    assert leaf.grad[masked].abs().max().item() == 0.0
    # at a supervised position the gradient is (softmax - onehot) / N
    N = M.supervised_count(labels).item()
    b, t = (~masked).nonzero()[0].tolist()
    expected = (logits[b, t].softmax(-1) - F.one_hot(labels[b, t + 1], 7)) / N
    torch.testing.assert_close(leaf.grad[b, t], expected, atol=1e-12, rtol=0)


def test_uniform_logits_give_log_vocab_and_perplexity_vocab():
    V = 32
    logits = torch.zeros(2, 5, V)
    labels = torch.randint(0, V, (2, 5))
    loss = M.sft_loss(logits, labels)
    assert loss.item() == pytest.approx(math.log(V), abs=1e-6)
    assert math.exp(loss.item()) == pytest.approx(V, rel=1e-6)


def test_no_supervised_token_gives_nan():
    labels = torch.full((2, 4), IGNORE_INDEX)
    assert math.isnan(M.sft_loss(torch.randn(2, 4, 5), labels).item())


# --- data: facts, ChatML labels, batches ---------------------------------------------------------


def test_arithmetic_facts_are_correct_and_complete():
    facts = M.arithmetic_facts("+-")
    assert len(facts) == 100 + 55
    for q, a in facts:
        assert eval(q[:-1]) == int(a)  # noqa: S307 (our own digits)
    assert len(M.arithmetic_facts("+", 4)) == 25


@pytest.fixture(scope="module")
def tok():
    return M.build_tokenizer(M.arithmetic_facts("+-"), "calculator", 24)


def test_assistant_labels_keep_only_the_reply_and_its_im_end(tok):
    ids, labels = M.encode_chat(M.chat_messages(("3+4=", "7"), "calculator"), tok)
    kept = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(kept) == f"3+4=7{IM_END}"
    assert ids[-1] == tok.token_id(IM_END) and labels[-1] == ids[-1]
    assert labels[0] == IGNORE_INDEX  # so the count over labels[:, 1:] is the count over all labels
    assert tok.decode([t for t, y in zip(ids, labels) if y == IGNORE_INDEX]).endswith(f"{IM_START}assistant\n")
    bare_ids, bare = M.encode_chat(M.chat_messages(("3+4=", "7"), "calculator", echo_question=False), tok)
    assert tok.decode([t for t in bare if t != IGNORE_INDEX]) == f"7{IM_END}"
    _, unmasked = M.encode_chat(M.chat_messages(("3+4=", "7"), "calculator"), tok, mask_prompt=False)
    assert unmasked == ids


def test_assistant_labels_handle_several_assistant_turns(tok):
    messages = [("system", "calculator"), ("user", "1+1="), ("assistant", "2"), ("user", "2+2="), ("assistant", "4")]
    ids, labels = M.encode_chat(messages, tok)
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == f"2{IM_END}4{IM_END}"


def test_pad_batch_pads_right_with_ignored_labels(tok):
    a = M.encode_chat(M.chat_messages(("3+4=", "7"), "calculator"), tok)
    b = M.encode_chat(M.chat_messages(("9+9=", "18"), "calculator"), tok)
    ids, labels = M.pad_batch([a, b], tok.token_id(PAD))
    short = min(len(a[0]), len(b[0]))
    row = 0 if len(a[0]) == short else 1
    assert (ids[row, short:] == tok.token_id(PAD)).all() and (labels[row, short:] == IGNORE_INDEX).all()


def test_chat_prompts_have_one_length_and_end_with_the_assistant_header(tok):
    facts = M.arithmetic_facts("+-")
    prompts = M.chat_prompts(facts, tok, "calculator")
    assert prompts.shape[0] == len(facts)
    assert tok.decode(prompts[0].tolist()).endswith(f"{IM_START}assistant\n")


def test_pretrain_stream_has_no_special_tokens_unless_asked(tok):
    facts = M.arithmetic_facts("+")
    g = torch.Generator().manual_seed(0)
    specials = set(tok.special_tokens.values())
    plain = M.pretrain_stream(facts, tok, 500, 0.0, 0.3, "calculator", True, g)
    assert not specials & set(plain.tolist())
    chatty = M.pretrain_stream(facts, tok, 500, 0.5, 0.0, "calculator", True, g)
    assert tok.token_id(IM_END) in set(chatty.tolist())


def test_line_starts_are_where_lines_begin(tok):
    facts = M.arithmetic_facts("+-")
    stream = M.pretrain_stream(facts, tok, 300, 0.2, 0.3, "calculator", True, torch.Generator().manual_seed(1))
    starts = M.line_starts(stream, tok)
    assert starts[0] == 0 and bool((starts[1:] > starts[:-1]).all())
    assert all(tok.decode(stream[:int(p)].tolist()).endswith("\n") for p in starts[1:])
    # every line start is found: one per newline in the text (a final newline starts no line)
    text = tok.decode(stream.tolist())
    assert len(starts) == text.count("\n") + (not text.endswith("\n"))
    # chat transcripts are cut into lines too: a row can start at the user's turn
    assert any(tok.decode(stream[int(p):int(p) + 2].tolist()).startswith(f"{IM_START}user") for p in starts)


def test_stream_batch_rows_begin_at_a_line_and_targets_are_inputs_moved_by_one():
    stream, starts = torch.arange(100), torch.tensor([0, 7, 30, 55, 88, 95])
    x, y = M.stream_batch(stream, starts, 64, 10, torch.Generator().manual_seed(0))
    assert torch.equal(y, x + 1)
    assert set(x[:, 0].tolist()) == {0, 7, 30, 55, 88}  # 95 leaves no room for 11 tokens


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5))
def test_sft_loss_is_unchanged_by_extra_ignored_columns(seed, extra):
    logits, labels = _case(seed, 3, 6, 7)
    wide_logits = torch.cat([logits, torch.randn(3, extra, 7, dtype=logits.dtype) * 9], dim=1)
    wide_labels = torch.cat([labels, torch.full((3, extra), IGNORE_INDEX)], dim=1)
    assert M.sft_loss(wide_logits, wide_labels).item() == pytest.approx(M.sft_loss(logits, labels).item(), abs=1e-12)


def test_run_uses_the_kernel_it_is_given():
    cfg = M.SFTConfig.toy()
    cfg = M.SFTConfig(**{**cfg.__dict__, "pretrain_steps": 2, "sft_steps": 3, "eval_every": 2})
    calls = []

    def spy(logits, labels, ignore_index=-100):
        calls.append(logits.shape)
        return M.sft_loss(logits, labels, ignore_index)

    torch.manual_seed(0)
    result = M.run(cfg, torch.Generator().manual_seed(0), sft_loss=spy)
    assert len(result.sft_history) == 3 and [e[0] for e in result.evals] == [0, 2, 3]
    assert len(calls) == 3 + 3  # one per SFT step, one per held-out evaluation


# --- the audit -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_result():
    return audit_once("sft", "toy", 0)


def test_audit_passes_toy(toy_result):
    assert toy_result.passed, [(c.name, c.measured) for c in toy_result.checks if not c.passed] or toy_result.error
    assert {c.kind for c in toy_result.checks} == {"invariant", "outcome"}
    assert {"pretrain/loss", "train/loss", "eval/loss", "eval/exact_match"} <= set(toy_result.series)


@pytest.mark.slow
def test_audit_passes_full():
    result = audit_once("sft", "full", 1)
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error


def test_same_seed_same_result(toy_result):
    assert audit_once("sft", "toy", 0).deterministic_dict() == toy_result.deterministic_dict()


def test_full_bars_are_at_least_as_strict_as_toy():
    toy, full = M.SFTConfig.toy(), M.SFTConfig.full()
    assert full.max_loss_ratio <= toy.max_loss_ratio and full.max_base_format_rate <= toy.max_base_format_rate
    assert full.min_format_rate >= toy.min_format_rate
    assert full.min_raw_accuracy >= toy.min_raw_accuracy and full.min_exact_match >= toy.min_exact_match


# --- mutants: each check must fail for a plausible bug, on every seed --------------------------------------


def no_shift(logits, labels, ignore_index=-100):
    """Scores logits[:, t] against labels[:, t]: trains the model to copy its input."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)


def mean_over_all_positions(logits, labels, ignore_index=-100):
    """Counts masked positions as label 0 and divides by B*(T-1)."""
    y = labels[:, 1:].clamp_min(0)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y.reshape(-1))


def masked_after_averaging(logits, labels, ignore_index=-100):
    """Per-token losses with the mask, but averaged over every position (B*(T-1))."""
    y = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y.clamp_min(0).reshape(-1), reduction="none")
    return (nll * (y != ignore_index).reshape(-1)).mean()


def hard_coded_ignore(logits, labels, ignore_index=-100):
    """Ignores the ignore_index argument."""
    return M.sft_loss(logits, labels, -100)


def sum_not_mean(logits, labels, ignore_index=-100):
    return M.sft_loss(logits, labels, ignore_index) * M.supervised_count(labels, ignore_index)


def detached(logits, labels, ignore_index=-100):
    return M.sft_loss(logits.detach(), labels, ignore_index)


ORIGINAL_PAD_BATCH = M.pad_batch


def pad_labels_with_pad_id(examples, pad_id):
    """The classic bug: padding written into the labels as the pad token, so the model learns to pad."""
    input_ids, labels = ORIGINAL_PAD_BATCH(examples, pad_id)
    return input_ids, torch.where(input_ids == pad_id, input_ids, labels)


MUTANTS = [
    Mutant("labels_cover_only_assistant_replies", "prompt not masked", overrides={"mask_prompt": "false"}),
    Mutant("sft_loss_equals_nll_by_hand", "summed, not averaged", {"sft_loss": sum_not_mean}),
    Mutant("sft_loss_equals_nll_by_hand", "no shift", {"sft_loss": no_shift}),
    Mutant("loss_ignores_masked_positions", "mean over every position", {"sft_loss": mean_over_all_positions}),
    Mutant("loss_ignores_masked_positions", "ignore_index hard-coded", {"sft_loss": hard_coded_ignore}),
    Mutant("masked_positions_get_zero_gradient", "no shift", {"sft_loss": no_shift}),
    Mutant("masked_positions_get_zero_gradient", "logits detached", {"sft_loss": detached}),
    Mutant("padding_does_not_change_the_loss", "pad labelled with the pad id",
           patch=lambda: mock.patch.object(M, "pad_batch", pad_labels_with_pad_id)),
    Mutant("padding_does_not_change_the_loss", "masked after averaging", {"sft_loss": masked_after_averaging}),
    Mutant("sft_loss_decreases", "learning rate 0", overrides={"sft_lr": "0"}),
    Mutant("chat_format_comes_from_sft", "no shift", {"sft_loss": no_shift}),
    Mutant("chat_format_comes_from_sft", "chat transcripts in pretraining",
           overrides={"pretrain_chat_fraction": "0.5"}),
    Mutant("pretrained_model_knows_the_facts_as_raw_text", "no pretraining", overrides={"pretrain_steps": "0"},
           mode="full"),
    Mutant("sft_exact_match_on_held_out_prompts", "no pretraining", overrides={"pretrain_steps": "0"}, mode="full"),
]


@mutant_params([m for m in MUTANTS if m.mode == "toy"])
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("sft", mutant)


@pytest.mark.slow
@mutant_params([m for m in MUTANTS if m.mode == "full"])
def test_full_mode_mutant_breaks_its_check(mutant):
    assert_mutant_fails("sft", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("sft", MUTANTS)
