"""rlhf: the KL-penalised token rewards (kernel), the pipeline's roles and stages, one mutant per check."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_check_fails, audit_once
from modules.ppo import ppo as PPO
from modules.rlhf import rlhf as M


@pytest.fixture(scope="module")
def toy():
    return audit_once("rlhf")


def test_toy_audit_passes(toy):
    assert toy.passed, [(c.name, c.measured) for c in toy.checks if not c.passed] or toy.error
    assert set(toy.tables) == {"Stages: data flow and model roles", "Model copies by algorithm"}
    stages = toy.tables["Stages: data flow and model roles"]["rows"]
    assert [r[5] for r in stages] == [1, 1, 4]  # models in memory, counted from the live objects


def test_full_audit_passes_on_two_seeds():
    for seed in (0, 1):
        result = audit_once("rlhf", mode="full", seed=seed)
        assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error


def test_same_seed_same_record(toy):
    assert audit_once("rlhf").deterministic_dict() == toy.deterministic_dict()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_rewards_sum_to_score_minus_beta_kl_and_stay_in_the_mask(lengths, beta, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), 6
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).double()
    lp, ref = -3 * torch.rand(B, T, generator=g, dtype=torch.float64), -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    r = M.kl_penalized_rewards(lp, ref, scores, mask, beta)
    assert torch.all(r[mask == 0] == 0)
    torch.testing.assert_close(r.sum(1), scores - beta * ((lp - ref) * mask).sum(1))
    last = torch.tensor(lengths) - 1
    torch.testing.assert_close(r[torch.arange(B), last] + beta * (lp - ref)[torch.arange(B), last], scores)


def test_memory_bookkeeping():
    assert M.memory_in_model_copies(2, 2) == 10  # PPO: actor + critic with grads and Adam, reference + RM
    assert M.memory_in_model_copies(1, 1) == 5  # DPO
    a = torch.nn.Linear(2, 2)
    assert M.distinct_models(a, a, copy.deepcopy(a)) == 2


# ---- mutants: one per check ----------------------------------------------------------------------

def _nan_leaking(logprobs, ref_logprobs, scores, response_mask, beta):
    r = -beta * (logprobs - ref_logprobs) * response_mask  # NaN * 0 = NaN on padding
    last = response_mask.sum(1).long() - 1
    r[torch.arange(r.shape[0]), last] += scores
    return r


def _wrong_sign(logprobs, ref_logprobs, scores, response_mask, beta):
    return M.kl_penalized_rewards(ref_logprobs, logprobs, scores, response_mask, beta)


def _score_on_last_column(logprobs, ref_logprobs, scores, response_mask, beta):
    r = M.kl_penalized_rewards(logprobs, ref_logprobs, torch.zeros_like(scores), response_mask, beta)
    r[:, -1] += scores
    return r


def _beta_ignored(logprobs, ref_logprobs, scores, response_mask, beta):
    return M.kl_penalized_rewards(logprobs, ref_logprobs, scores, response_mask, 0.1)


@pytest.mark.parametrize("mutant, check", [
    (_nan_leaking, "no_reward_outside_the_response_mask"),
    (_wrong_sign, "token_rewards_sum_to_score_minus_beta_kl"),
    (_score_on_last_column, "score_on_the_last_valid_token"),
    (_beta_ignored, "beta_zero_leaves_only_the_score"),
])
def test_kernel_mutants(mutant, check):
    assert_check_fails(audit_once("rlhf", kl_penalized_rewards=mutant), check)


def test_reference_aliasing_the_actor_breaks_four_models(monkeypatch):
    def aliased(sft):
        actor = copy.deepcopy(sft)
        return actor, actor
    monkeypatch.setattr(PPO, "actor_and_reference", aliased)
    assert_check_fails(audit_once("rlhf"), "ppo_holds_four_distinct_models")


def test_critic_sharing_the_reward_model_breaks_frozen_weights(monkeypatch):
    def shared(rm):
        for p in rm.parameters():
            p.requires_grad_(True)
        return rm
    monkeypatch.setattr(M, "critic_from_reward_model", shared)
    assert_check_fails(audit_once("rlhf"), "reference_and_reward_model_frozen_through_ppo")


def test_a_reference_that_is_not_the_sft_model(monkeypatch):
    def perturbed(sft):
        actor, reference = copy.deepcopy(sft), PPO.frozen_copy(sft)
        with torch.no_grad():
            reference.lm_head.weight.add_(0.3 * torch.randn_like(reference.lm_head.weight))
        return actor, reference
    monkeypatch.setattr(PPO, "actor_and_reference", perturbed)
    result = audit_once("rlhf")
    assert_check_fails(result, "kl_anchor_is_the_sft_policy")
    assert_check_fails(result, "kl_is_zero_at_the_first_rollout")


def test_critic_from_scratch_breaks_the_rm_initialisation(monkeypatch):
    monkeypatch.setattr(M, "critic_from_reward_model", lambda rm: PPO.new_critic(rm))
    assert_check_fails(audit_once("rlhf"), "critic_starts_as_the_reward_model")


def test_a_reward_model_trained_on_flipped_labels(monkeypatch):
    train = M.RM.train_reward_model

    def flipped(rm, cfg, generator, **kw):
        return train(rm, cfg, generator, loss_fn=lambda c, r, margin=None: M.RM.bradley_terry_loss(r, c, margin), **kw)
    monkeypatch.setattr(M.RM, "train_reward_model", flipped)
    assert_check_fails(audit_once("rlhf"), "reward_model_ranks_heldout_pairs")


@pytest.mark.parametrize("overrides, checks", [
    ({"sft_steps": "2"}, ["sft_policy_ends_answers_with_eos"]),
    ({"iterations": "1"}, ["ppo_raises_the_gold_reward", "ppo_raises_the_reward_model_score"]),
    ({"kl_coef": "0", "actor_lr": "0.01", "iterations": "20"}, ["ppo_kl_to_sft_bounded"]),
])
def test_outcome_mutants(overrides, checks):
    result = audit_once("rlhf", overrides=overrides)
    for check in checks:
        assert_check_fails(result, check)
