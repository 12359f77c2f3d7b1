"""rlhf: the KL-penalised token rewards (kernel), the pipeline's roles, stages and memory, and mutants that
break each check."""
from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params
from hypothesis import given, settings
from hypothesis import strategies as st

from llmaudit.registry import get_audit
from modules import reward_model as RM
from modules.ppo import core as C
from modules.ppo import ppo as PPO
from modules.rlhf import rlhf as M

# a tiny pipeline for mutants of invariants that need the stage-3 models: they do not depend on how well it learned
QUICK = {"sft_steps": "5", "rm_steps": "5", "iterations": "1", "rollout_batch": "16", "eval_prompts": "32",
         "rm_eval_pairs": "32"}


@pytest.fixture(scope="module")
def toy():
    return audit_once("rlhf")


def test_toy_audit_passes(toy):
    assert toy.passed, [(c.name, c.measured, c.error) for c in toy.checks if not c.passed] or toy.error
    assert set(toy.tables) == {"Stages: data flow and model roles", "PPO memory, measured (floats after one update)",
                               "Model copies by algorithm (hand count, not measured)"}
    stages = toy.tables["Stages: data flow and model roles"]["rows"]
    assert [r[5] for r in stages] == [1, 1, 4]  # models in memory, counted from the live objects
    memory = toy.tables["PPO memory, measured (floats after one update)"]["rows"]
    assert [r[0] for r in memory] == ["actor", "critic", "reference", "reward model"]
    assert [r[5] for r in memory] == [4, 4, 1, 1]  # copies of its own weights, measured


def test_checks_that_do_not_call_the_kernel_do_not_claim_it():
    spec = get_audit("rlhf")
    for name in ("ppo_holds_four_distinct_models", "reference_and_reward_model_frozen_through_ppo",
                 "kl_anchor_is_the_sft_policy", "kl_is_zero_at_the_first_rollout", "critic_starts_as_the_reward_model",
                 "ppo_memory_matches_hand_count", "sft_policy_ends_answers_with_eos",
                 "reward_model_ranks_heldout_pairs"):
        assert spec.check_spec(name).kernels == (), name
    assert len(spec.checks_of_kernel("kl_penalized_rewards", "toy")) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_full_audit_passes(seed):
    result = audit_once("rlhf", mode="full", seed=seed)
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error


def test_same_seed_same_record():
    first, second = (audit_once("rlhf", "toy", 2, QUICK).deterministic_dict() for _ in range(2))
    assert first == second


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=5), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_rewards_sum_to_score_minus_beta_kl_and_stay_in_the_mask(lengths, beta, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), 6
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).double()
    lp, ref = -3 * torch.rand(2, B, T, generator=g, dtype=torch.float64)
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    nan = torch.full_like(lp, float("nan"))
    r = M.kl_penalized_rewards(torch.where(mask.bool(), lp, nan), ref, scores, mask, beta)
    assert torch.all(r[mask == 0] == 0)
    has = torch.tensor(lengths) > 0
    torch.testing.assert_close(r.sum(1), torch.where(has, scores, 0.0) - beta * ((lp - ref) * mask).sum(1))
    rows, last = torch.arange(B)[has], (torch.tensor(lengths) - 1)[has]
    torch.testing.assert_close(r[rows, last] + beta * (lp - ref)[rows, last], scores[has])


def test_memory_hand_count_and_measurement():
    assert M.memory_in_model_copies(2, 2) == 10  # PPO: actor + critic with grads and Adam, reference + RM
    assert M.memory_in_model_copies(1, 1) == 5  # DPO
    a = torch.nn.Linear(2, 2)
    assert M.distinct_models(a, a, copy.deepcopy(a)) == 2
    trained, frozen = torch.nn.Linear(3, 2), torch.nn.Linear(4, 1)
    opt = PPO._optimizer(trained, 1e-3, 1)[0]
    trained(torch.ones(1, 3)).sum().backward()
    opt.step()
    rows = M.adam_memory({"trained": trained, "frozen": frozen}, [opt])
    assert [(r["params"], r["grads"], r["optimizer_state"], r["total"]) for r in rows] == [(8, 8, 16, 32), (5, 0, 0, 5)]


# ---- mutants -------------------------------------------------------------------------------------

def _nan_leaking(logprobs, ref_logprobs, scores, response_mask, beta):
    r = -beta * (logprobs - ref_logprobs) * response_mask  # NaN * 0 = NaN on padding
    last = response_mask.sum(1).long() - 1
    r[torch.arange(r.shape[0]), last] += scores
    return r


def _score_on_empty_rows(logprobs, ref_logprobs, scores, response_mask, beta):  # the argmax of an all-0 row is 0
    rewards = -beta * torch.where(response_mask.bool(), logprobs - ref_logprobs, torch.zeros_like(logprobs))
    rows = torch.arange(rewards.shape[0])
    return rewards.index_put((rows, C.last_valid_index(response_mask)), scores, accumulate=True)


def _wrong_sign(logprobs, ref_logprobs, scores, response_mask, beta):
    return M.kl_penalized_rewards(ref_logprobs, logprobs, scores, response_mask, beta)


def _score_on_last_column(logprobs, ref_logprobs, scores, response_mask, beta):
    r = M.kl_penalized_rewards(logprobs, ref_logprobs, torch.zeros_like(scores), response_mask, beta)
    r[:, -1] += scores
    return r


def _beta_ignored(logprobs, ref_logprobs, scores, response_mask, beta):
    return M.kl_penalized_rewards(logprobs, ref_logprobs, scores, response_mask, 0.1)


def _score_subtracted(logprobs, ref_logprobs, scores, response_mask, beta):  # a sign slip on the score
    return M.kl_penalized_rewards(logprobs, ref_logprobs, -scores, response_mask, beta)


def _kl_term_dropped(logprobs, ref_logprobs, scores, response_mask, beta):  # beta accepted, never used
    return M.kl_penalized_rewards(logprobs, ref_logprobs, scores, response_mask, 0.0)


def _aliased(sft):
    actor = copy.deepcopy(sft)
    return actor, actor


def _perturbed_reference(sft):
    actor, reference = copy.deepcopy(sft), PPO.frozen_copy(sft)
    with torch.no_grad():
        reference.lm_head.weight.add_(0.3 * torch.randn_like(reference.lm_head.weight))
    return actor, reference


def _rm_shared_with_the_critic(rm):
    for p in rm.parameters():
        p.requires_grad_(True)
    return rm


def _critic_optimizer_over_the_actor(policy, critic, cfg, iterations):
    updates = iterations * cfg.ppo_epochs * cfg.n_minibatches  # copy-paste: both optimizers built on the actor
    return {"actor": PPO._optimizer(policy, cfg.actor_lr, updates),
            "critic": PPO._optimizer(policy, cfg.critic_lr, updates)}


def _flipped_training(rm, cfg, generator, **kw):
    return _train_rm(rm, cfg, generator, loss_fn=lambda c, r, margin=None: RM.bradley_terry_loss(r, c, margin), **kw)


_train_rm = RM.train_reward_model

MUTANTS = [
    Mutant("no_reward_outside_the_response_mask", "NaN times mask", {"kl_penalized_rewards": _nan_leaking}),
    Mutant("no_reward_outside_the_response_mask", "score on an empty row",
           {"kl_penalized_rewards": _score_on_empty_rows}),
    Mutant("token_rewards_sum_to_score_minus_beta_kl", "k1 sign flipped", {"kl_penalized_rewards": _wrong_sign}),
    Mutant("score_on_the_last_valid_token", "score on the last column",
           {"kl_penalized_rewards": _score_on_last_column}),
    Mutant("beta_zero_leaves_only_the_score", "beta ignored", {"kl_penalized_rewards": _beta_ignored}),
    Mutant("ppo_holds_four_distinct_models", "reference aliases the actor", overrides=QUICK,
           patch=lambda: mock.patch.object(PPO, "actor_and_reference", _aliased)),
    Mutant("reference_and_reward_model_frozen_through_ppo", "critic is the RM itself", overrides=QUICK,
           patch=lambda: mock.patch.object(M, "critic_from_reward_model", _rm_shared_with_the_critic)),
    Mutant("kl_anchor_is_the_sft_policy", "reference is not the SFT model", overrides=QUICK,
           patch=lambda: mock.patch.object(PPO, "actor_and_reference", _perturbed_reference)),
    Mutant("kl_is_zero_at_the_first_rollout", "reference is not the SFT model", overrides=QUICK,
           patch=lambda: mock.patch.object(PPO, "actor_and_reference", _perturbed_reference)),
    Mutant("critic_starts_as_the_reward_model", "critic from scratch", overrides={**QUICK, "critic_from_rm": "false"}),
    Mutant("ppo_memory_matches_hand_count", "critic optimizer built over the actor", overrides=QUICK,
           patch=lambda: mock.patch.object(PPO, "ppo_optimizers", _critic_optimizer_over_the_actor)),
    Mutant("sft_policy_ends_answers_with_eos", "two SFT steps", overrides={"sft_steps": "2"}),
    Mutant("reward_model_ranks_heldout_pairs", "RM trained on flipped labels",
           patch=lambda: mock.patch.object(RM, "train_reward_model", _flipped_training)),
    # one PPO iteration already gains 0.5-2.7: across seeds and CPU kernels the toy cannot tell it from ten
    Mutant("ppo_raises_the_gold_reward", "the policy never updated (actor lr 0)", overrides={"actor_lr": "0"}),
    Mutant("ppo_raises_the_reward_model_score", "score subtracted", {"kl_penalized_rewards": _score_subtracted}),
    Mutant("ppo_kl_to_sft_bounded", "KL term dropped", {"kl_penalized_rewards": _kl_term_dropped}),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("rlhf", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("rlhf", MUTANTS)
