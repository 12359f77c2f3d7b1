"""reward_model: the Bradley–Terry kernel and the score position against slow re-implementations,
hypothesis properties, the task's data, the audit in toy and full mode, one mutant per check."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.reward_model import reward_model as M
from modules.transformer import Transformer

rewards = st.lists(st.floats(-30, 30, allow_nan=False), min_size=1, max_size=16)


def _slow_bt(chosen: list[float], rejected: list[float], margin: list[float]) -> float:
    """-log sigmoid(x) = log(1 + e^-x), written per pair so that it never overflows."""
    total = 0.0
    for c, r, m in zip(chosen, rejected, margin):
        x = c - r - m
        total += math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x))
    return total / len(chosen)


def _slow_last_token(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.empty(values.shape[0], dtype=values.dtype)
    for b in range(values.shape[0]):
        last = max(t for t in range(values.shape[1]) if mask[b, t])
        out[b] = values[b, last]
    return out


# --- bradley_terry_loss ------------------------------------------------------------------------------

def test_trl_reference_vectors():
    loss, acc = M.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]))
    assert abs(loss.item() - 0.3132617) < 1e-6 and acc.item() == 1.0
    loss, _ = M.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=1.0)
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert abs(0.01 * M.center_penalty(torch.tensor([2.0]), torch.tensor([1.0])).item() - 0.09) < 1e-7


def test_equal_rewards_give_ln2_and_no_wins():
    r = torch.linspace(-5, 5, 11, dtype=torch.float64)
    loss, acc = M.bradley_terry_loss(r, r.clone())
    assert abs(loss.item() - math.log(2)) < 1e-12
    assert acc.item() == 0.0  # a tie is not a correct ranking


@settings(max_examples=60, deadline=None)
@given(rewards, st.data())
def test_loss_matches_slow_loop(chosen, data):
    rejected = data.draw(st.lists(st.floats(-30, 30, allow_nan=False), min_size=len(chosen), max_size=len(chosen)))
    margin = data.draw(st.lists(st.floats(0, 3, allow_nan=False), min_size=len(chosen), max_size=len(chosen)))
    c, r, m = (torch.tensor(v, dtype=torch.float64) for v in (chosen, rejected, margin))
    loss, acc = M.bradley_terry_loss(c, r, m)
    assert abs(loss.item() - _slow_bt(chosen, rejected, margin)) < 1e-9
    assert abs(acc.item() - sum(a > b for a, b in zip(chosen, rejected)) / len(chosen)) < 1e-6


@settings(max_examples=40, deadline=None)
@given(rewards, st.floats(-100, 100, allow_nan=False), st.floats(0, 2, allow_nan=False))
def test_shift_invariance_and_float_margin(chosen, shift, margin):
    c = torch.tensor(chosen, dtype=torch.float64)
    r = c.flip(0) * 0.5
    base, _ = M.bradley_terry_loss(c, r, margin)
    shifted, _ = M.bradley_terry_loss(c + shift, r + shift, margin)
    as_tensor, _ = M.bradley_terry_loss(c, r, torch.full_like(c, margin))
    assert abs(base.item() - shifted.item()) < 1e-9
    assert base.item() == as_tensor.item()
    assert base.item() >= 0.0


@settings(max_examples=40, deadline=None)
@given(st.floats(-20, 20, allow_nan=False))
def test_swapping_pair_changes_loss_by_the_gap(gap):
    """L(gap) - L(-gap) = -gap: BT is a logistic model of which response wins."""
    a, _ = M.bradley_terry_loss(torch.tensor([gap], dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    b, _ = M.bradley_terry_loss(torch.zeros(1, dtype=torch.float64), torch.tensor([gap], dtype=torch.float64))
    assert abs((a - b).item() + gap) < 1e-9


def test_gradient_is_sigmoid_weight_and_loss_is_stable():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    loss, _ = M.bradley_terry_loss(c, r, 0.3)
    loss.backward()
    w = torch.sigmoid(r.detach() - c.detach() + 0.3) / 8
    assert torch.allclose(c.grad, -w, atol=1e-12) and torch.allclose(r.grad, w, atol=1e-12)
    far, _ = M.bradley_terry_loss(torch.tensor([-300.0]), torch.tensor([300.0]))
    assert far.item() == 600.0


# --- last_token_rewards ------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=8), st.booleans(), st.integers(0, 2**31 - 1))
def test_last_token_matches_slow_loop(lengths, left_padded, seed):
    T = max(lengths) + 2
    pos = torch.arange(T)[None]
    L = torch.tensor(lengths)[:, None]
    mask = pos >= T - L if left_padded else pos < L
    values = torch.randn(len(lengths), T, generator=torch.Generator().manual_seed(seed))
    out = M.last_token_rewards(values, mask.long())
    assert torch.equal(out, _slow_last_token(values, mask))
    assert torch.equal(M.last_token_rewards(values, mask), out)  # bool and int masks agree


# --- the task --------------------------------------------------------------------------------------

def test_sequences_have_the_format_and_gold_counts_the_target():
    cfg = M.RewardModelConfig(target_from_prompt=True)
    bos, sep, eos, pad = M.special_tokens(cfg)
    g = torch.Generator().manual_seed(0)
    targets = M.sample_targets(cfg, 500, g)
    seq = M.sample_sequences(cfg, targets, g)
    assert seq.shape == (500, cfg.max_len + 4) and seq.shape[1] <= 12
    assert (seq[:, 0] == bos).all() and (seq[:, 2] == sep).all() and torch.equal(seq[:, 1], targets)
    for row, gold in zip(seq.tolist(), M.gold_reward(seq).tolist()):
        end = row.index(eos)
        assert cfg.min_len <= end - 3 <= cfg.max_len
        assert all(t == pad for t in row[end + 1:]) and all(t < cfg.n_symbols for t in row[3:end])
        assert gold == sum(t == row[1] for t in row[3:end])
    assert len(set(targets.tolist())) == cfg.n_symbols  # the prompt varies
    assert (M.sample_targets(M.RewardModelConfig(), 50, g) == 0).all()  # toy: always digit 0


def test_pairs_are_ranked_by_gold_with_the_requested_label_noise():
    cfg = M.RewardModelConfig(target_from_prompt=True)
    clean = M.preference_pairs(cfg, 400, torch.Generator().manual_seed(1))
    assert (clean.chosen_gold > clean.rejected_gold).all() and not clean.flipped.any()
    assert torch.equal(clean.chosen[:, 1], clean.rejected[:, 1])  # two responses to the same prompt
    noisy = M.preference_pairs(cfg, 4000, torch.Generator().manual_seed(1), label_noise=0.2)
    assert abs(noisy.flipped.float().mean().item() - 0.2) < 0.03
    assert torch.equal(noisy.chosen_gold < noisy.rejected_gold, noisy.flipped)


def test_ranks_and_correlations():
    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
    assert M.average_ranks(x).tolist() == [3.0, 0.0, 3.0, 1.0, 3.0]  # three-way tie at ranks 2, 3, 4
    y = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert abs(M.spearman(y, y.exp() * 3 + 1) - 1.0) < 1e-12  # any increasing map keeps the ranks
    assert abs(M.spearman(y, -y) + 1.0) < 1e-12
    assert abs(M.pearson(y, 2 * y + 1) - 1.0) < 1e-12


def test_value_head_replaces_lm_head_and_leaves_the_lm_alone():
    cfg = M.RewardModelConfig()
    torch.manual_seed(0)
    lm = Transformer(M.model_config(cfg))
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    rm = M.reward_model_from_lm(lm, 0.02)
    tokens = M.sample_sequences(cfg, M.sample_targets(cfg, 4, torch.Generator().manual_seed(0)),
                                torch.Generator().manual_seed(0))
    assert rm(tokens).shape == (4, tokens.shape[1], 1) and lm(tokens).shape[-1] == cfg.n_symbols + 4
    rm.layers[0].mlp.up_proj.weight.data.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())


def test_margin_reaches_the_loss():
    cfg = M.RewardModelConfig(steps=2, margin_per_gold_gap=0.5, label_noise=0.0)
    seen = []

    def spy(chosen, rejected, margin=None):
        seen.append(margin)
        return M.bradley_terry_loss(chosen, rejected, margin)

    torch.manual_seed(0)
    rm = M.reward_model_from_lm(Transformer(M.model_config(cfg)), 0.02)
    M.train_reward_model(rm, cfg, torch.Generator().manual_seed(0), loss_fn=spy)
    batch = M.preference_pairs(cfg, cfg.batch_pairs, torch.Generator().manual_seed(0), cfg.label_noise)
    assert torch.equal(seen[0], 0.5 * (batch.chosen_gold - batch.rejected_gold))


# --- the closed loop, without the engine -------------------------------------------------------------

def test_run_uses_the_kernels_it_is_given():
    cfg = M.RewardModelConfig(lm_steps=2, steps=3, eval_pairs=16, eval_curve_pairs=8, eval_prompts=2,
                              eval_responses=4)
    calls = {"loss": 0, "reward": 0}

    def loss(chosen_rewards, rejected_rewards, margin=None):
        calls["loss"] += 1
        return M.bradley_terry_loss(chosen_rewards, rejected_rewards, margin)

    def reward(values, attention_mask):
        calls["reward"] += 1
        return M.last_token_rewards(values, attention_mask)

    torch.manual_seed(0)
    result = M.run(cfg, torch.Generator().manual_seed(0), bradley_terry_loss=loss, last_token_rewards=reward)
    assert calls["loss"] == cfg.steps and calls["reward"] >= cfg.steps
    assert result.scores.shape == result.gold.shape == (2, 4) and len(result.history) == cfg.steps


# --- the audit ---------------------------------------------------------------------------------------

def test_audit_passes_toy_and_is_deterministic():
    a = audit_once("reward_model", "toy", 0)
    assert a.passed, [(c.name, c.measured) for c in a.checks if not c.passed] or a.error
    assert {"train/loss", "eval/accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(a.series)
    assert {c.kind for c in a.checks} == {"invariant", "outcome"}
    b = audit_once("reward_model", "toy", 0)
    assert a.deterministic_dict() == b.deterministic_dict()


@pytest.mark.slow
def test_audit_passes_full():
    r = audit_once("reward_model", "full", 1)
    assert r.passed, [(c.name, c.measured) for c in r.checks if not c.passed] or r.error


def test_full_bars_are_at_least_as_strict_as_toy():
    toy, full = M.RewardModelConfig.toy(), M.RewardModelConfig.full()
    assert full.min_accuracy >= toy.min_accuracy and full.min_spearman >= toy.min_spearman


# --- mutants: each check must fail for a plausible bug, on every seed ----------------------------------

def hinge(chosen_rewards, rejected_rewards, margin=None):
    gap = chosen_rewards - rejected_rewards
    return F.relu(1 - gap).mean(), (gap > 0).float().mean()


def plus_margin(chosen_rewards, rejected_rewards, margin=None):
    gap = chosen_rewards - rejected_rewards + (0.0 if margin is None else margin)
    return -F.logsigmoid(gap).mean(), (chosen_rewards > rejected_rewards).float().mean()


def ties_win(chosen_rewards, rejected_rewards, margin=None):
    loss, _ = M.bradley_terry_loss(chosen_rewards, rejected_rewards, margin)
    return loss, (chosen_rewards >= rejected_rewards).float().mean()


def pointwise(chosen_rewards, rejected_rewards, margin=None):  # "chosen high, rejected low", separately
    loss = -(F.logsigmoid(chosen_rewards) + F.logsigmoid(-rejected_rewards)).mean() / 2 + math.log(2) / 2
    return loss, (chosen_rewards > rejected_rewards).float().mean()


def detached_rejected(chosen_rewards, rejected_rewards, margin=None):
    return M.bradley_terry_loss(chosen_rewards, rejected_rewards.detach(), margin)


def summed(chosen_rewards, rejected_rewards, margin=None):
    gap = chosen_rewards - rejected_rewards - (0.0 if margin is None else margin)
    return -F.logsigmoid(gap).sum(), (chosen_rewards > rejected_rewards).float().mean()


def log_of_sigmoid(chosen_rewards, rejected_rewards, margin=None):
    gap = chosen_rewards - rejected_rewards - (0.0 if margin is None else margin)
    return -torch.log(torch.sigmoid(gap)).mean(), (chosen_rewards > rejected_rewards).float().mean()


def swapped_pair(chosen_rewards, rejected_rewards, margin=None):  # the classic chosen/rejected mix-up
    return M.bradley_terry_loss(rejected_rewards, chosen_rewards, margin)


def last_column(values, attention_mask):
    return values[:, -1]


def first_pad(values, attention_mask):  # off by one: mask.sum() is the index of the first pad
    return values.gather(1, attention_mask.long().sum(1, keepdim=True).clamp_max(values.shape[1] - 1)).squeeze(1)


def sum_minus_one(values, attention_mask):  # right for right padding only
    return values.gather(1, attention_mask.long().sum(1, keepdim=True) - 1).squeeze(1)


def mean_over_real_tokens(values, attention_mask):  # pools the prompt (and every response token) in
    m = attention_mask.to(values.dtype)
    return (values * m).sum(1) / m.sum(1)


def end_of_prompt(values, attention_mask):  # <sep>: the prompt alone, the same for both answers of a pair
    return values[:, 2]


def gold_counting_the_prompt(tokens):
    return (tokens[:, 1:] == tokens[:, 1:2]).sum(dim=1).float()


MUTANTS = [
    Mutant("loss_is_ln2_when_rewards_equal", "hinge loss", {"bradley_terry_loss": hinge}),
    Mutant("loss_matches_trl_reference_vector", "margin added", {"bradley_terry_loss": plus_margin}),
    Mutant("loss_matches_trl_reference_vector", "ties count as wins", {"bradley_terry_loss": ties_win}),
    Mutant("loss_is_invariant_to_reward_shift", "pointwise loss", {"bradley_terry_loss": pointwise}),
    Mutant("loss_gradient_is_sigmoid_of_reward_gap", "rejected detached", {"bradley_terry_loss": detached_rejected}),
    Mutant("loss_gradient_is_sigmoid_of_reward_gap", "summed over pairs", {"bradley_terry_loss": summed}),
    Mutant("loss_is_finite_for_large_reward_gaps", "log of sigmoid", {"bradley_terry_loss": log_of_sigmoid}),
    Mutant("reads_the_rightmost_real_token_under_left_and_right_padding", "mask.sum() - 1",
           {"last_token_rewards": sum_minus_one}),
    Mutant("reads_the_rightmost_real_token_under_left_and_right_padding", "last column",
           {"last_token_rewards": last_column}),
    Mutant("reward_ignores_prompt_and_earlier_positions", "mean over real tokens",
           {"last_token_rewards": mean_over_real_tokens}),
    Mutant("padding_does_not_change_reward", "last column", {"last_token_rewards": last_column}),
    Mutant("padding_does_not_change_reward", "first pad", {"last_token_rewards": first_pad}),
    Mutant("gold_reward_counts_the_response_only", "prompt digit counted",
           patch=lambda: mock.patch.object(M, "gold_reward", gold_counting_the_prompt)),
    Mutant("heldout_pairwise_accuracy", "chosen and rejected swapped", {"bradley_terry_loss": swapped_pair}),
    Mutant("heldout_pairwise_accuracy", "score read at the end of the prompt", {"last_token_rewards": end_of_prompt}),
    Mutant("reward_correlates_with_gold", "every label flipped", overrides={"label_noise": "1.0"}),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("reward_model", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("reward_model", MUTANTS)
